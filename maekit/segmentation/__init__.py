"""Semantic segmentation with an MAE backbone: transformers' UperNet built from a pretrained maekit folder, data
loading and joint transforms, whole-image / sliding-window inference, mIoU, and the ADE20K recipe.

See docs/segmentation.md.
"""

from .data import TEXTURE_CLASSES, load_segmentation_dataset, load_texture_mosaics
from .inference import evaluate_segmentation, slide_inference, whole_inference
from .metrics import SegmentationMetric, segmentation_metrics
from .modeling import segmentation_image_processor, upernet_from_pretrained
from .recipe import ADE20K_RECIPE
from .transforms import (
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    photometric_distortion,
    reduce_labels,
    segmentation_collate_fn,
)

__all__ = [
    "ADE20K_RECIPE",
    "TEXTURE_CLASSES",
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationMetric",
    "SegmentationTrainTransform",
    "evaluate_segmentation",
    "load_segmentation_dataset",
    "load_texture_mosaics",
    "photometric_distortion",
    "reduce_labels",
    "segmentation_collate_fn",
    "segmentation_image_processor",
    "segmentation_metrics",
    "slide_inference",
    "upernet_from_pretrained",
    "whole_inference",
]
