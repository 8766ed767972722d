"""The building blocks of `examples/segmentation.py`: its argument dataclasses, the offline demo's defaults, the data
(a Hub dataset in the `scene_parse_150` layout, a local folder of image / label-map pairs, or the texture-mosaic
demo), the UperNet model and the transforms. The script only wires these together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .scripts import is_demo

__all__ = [
    "SEGMENTATION_DEMO",
    "SEGMENTATION_DEMO_MODEL",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "build_segmentation_model",
    "default_out_indices",
    "load_segmentation_splits",
    "segmentation_transforms",
]

# The encoder of the demo's from-scratch model: 4 blocks, 64 wide, 8x8 patches.
SEGMENTATION_DEMO_MODEL = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, patch_size=8
)

# `examples/segmentation.py` without data arguments: a tiny model on the texture mosaics, a few CPU minutes.
SEGMENTATION_DEMO = dict(
    output_dir="outputs/mae-segmentation-default",
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    max_steps=600,
    warmup_steps=30,
    learning_rate=1e-3,
    layer_decay=0.9,
    eval_steps=200,
    eval_on_start=True,
    eval_crop_size=64,
    eval_stride=43,
    logging_steps=20,
    save_total_limit=1,
    crop_size=64,
    scale=[128, 128],
    ratio_range=[0.75, 1.5],
    photometric_distortion=False,
    drop_path_rate=0.0,
    pyramid_channels=32,
    upernet_hidden_size=32,
    auxiliary_channels=16,
)


@dataclass
class SegmentationModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A maekit pretraining / encoder folder or a transformers vit_mae one (folder or Hub id); its "
            "encoder starts the UperNet backbone. Without it: a tiny encoder from scratch (the demo's)."
        },
    )
    out_indices: list[int] | None = field(
        default=None,
        metadata={
            "help": "Encoder blocks feeding the pyramid, one per scale (default: depth/3, depth/2, 2 depth/3, depth: "
            "blocks 4, 6, 8, 12 of a ViT-B, as the official recipe)."
        },
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the encoder (official: 0.1)."})
    pyramid_channels: int = field(default=256, metadata={"help": "Channels of every feature-pyramid level."})
    upernet_hidden_size: int = field(default=768, metadata={"help": "UperNet channels (official: 768)."})
    auxiliary_channels: int = field(default=256, metadata={"help": "Auxiliary FCN head channels (official: 256)."})
    auxiliary_loss_weight: float = field(default=0.4, metadata={"help": "Auxiliary loss weight (official: 0.4)."})


@dataclass
class SegmentationDataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset with image + label-map columns (scene_parse_150 layout), or a local folder."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local folder with images/ and annotations/ (or masks/, labels/) of the same file names, "
            "optionally split into training/ and validation/ (as ADEChallengeData2016) or train/ and val/."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of the Hub dataset."})
    label_column: str = field(default="annotation", metadata={"help": "Label-map column of the Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split."})
    train_val_split: float | None = field(
        default=None, metadata={"help": "Hold out this fraction of the training split when there is no eval split."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes (150 for scene_parse_150 with --reduce_labels); or give --label_names."},
    )
    label_names: list[str] | None = field(default=None, metadata={"help": "Class names, in class-id order."})
    reduce_labels: bool = field(
        default=False,
        metadata={
            "help": "ADE20K's reduce_zero_label: 0 ('other') is ignored, ids 1..N become 0..N-1 (ADE20K: true)."
        },
    )
    crop_size: int = field(default=512, metadata={"help": "Training crop size (official: 512)."})
    scale: list[int] = field(
        default_factory=lambda: [2048, 512],
        metadata={"help": "Keep-ratio resize target (long edge, short edge) of training and evaluation images."},
    )
    ratio_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0], metadata={"help": "Random resize ratio range of training images."}
    )
    cat_max_ratio: float = field(
        default=0.75, metadata={"help": "Re-draw training crops where one class covers this fraction or more."}
    )
    photometric_distortion: bool = field(
        default=True, metadata={"help": "Random brightness, contrast, saturation and hue (official: on)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation images."})
    demo_train_images: int = field(default=64, metadata={"help": "Demo (no data arguments): training mosaics."})
    demo_eval_images: int = field(default=16, metadata={"help": "Demo: evaluation mosaics."})
    demo_image_size: int = field(default=128, metadata={"help": "Demo: side of the square mosaics."})


def default_out_indices(depth: int) -> list[int]:
    """Blocks `depth/3, depth/2, 2 depth/3, depth` (rounded): 4, 6, 8, 12 for ViT-B and 8, 12, 16, 24 for ViT-L, the
    official recipe's (BEiT's `out_indices` [3, 5, 7, 11] / [7, 11, 15, 23], 0-based); under 4 blocks, the last block
    alone (every pyramid level built from it, as ViTDet)."""
    indices = [round(depth * k) for k in (1 / 3, 1 / 2, 2 / 3)] + [depth]
    return indices if len(set(indices)) == 4 and min(indices) >= 1 else [depth]


def load_segmentation_splits(data_args: SegmentationDataArguments, seed: int):
    """`(train, eval, id2label)`: the demo's texture mosaics (no data arguments), else `load_segmentation_dataset`
    of `--data_dir` / `--dataset_name`; trimmed to `max_*_samples`."""
    from ..segmentation import TEXTURE_CLASSES, load_segmentation_dataset, load_texture_mosaics

    if is_demo(data_args):
        splits = load_texture_mosaics(
            data_args.demo_train_images, data_args.demo_eval_images, data_args.demo_image_size, seed=seed
        )
        names = list(TEXTURE_CLASSES)
    else:
        kwargs = {"name": data_args.dataset_config_name} if data_args.dataset_config_name else {}
        splits = load_segmentation_dataset(
            data_args.data_dir or data_args.dataset_name,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            **kwargs,
        )
        names = _label_names(data_args)
    if data_args.train_split not in splits:
        raise ValueError(f"No split {data_args.train_split!r} (--train_split); splits: {sorted(splits)}.")
    train, evaluation = splits[data_args.train_split], splits.get(data_args.eval_split)
    if evaluation is None and data_args.train_val_split:
        held_out = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
        train, evaluation = held_out["train"], held_out["test"]
    if evaluation is None:
        raise ValueError(
            f"No evaluation split {data_args.eval_split!r} (--eval_split) in {sorted(splits)}: pass --train_val_split "
            "to hold out part of the training split."
        )
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation, dict(enumerate(names))


def _label_names(data_args: SegmentationDataArguments) -> list[str]:
    names, count = data_args.label_names, data_args.num_labels
    if names is None and count is None:
        raise ValueError(
            "Pass --num_labels (150 for scene_parse_150 with --reduce_labels true) or --label_names: the number of "
            "classes cannot be read from label maps without scanning every one."
        )
    if names is not None and count is not None and len(names) != count:
        raise ValueError(f"--num_labels {count} but --label_names has {len(names)} names.")
    return list(names) if names is not None else [str(i) for i in range(count)]


def build_segmentation_model(args: SegmentationModelArguments, id2label: dict[int, str], image_size: int):
    """A `UperNetForSemanticSegmentation` on an MAE backbone with the ViTDet pyramid (scales 4, 2, 1, 1/2): the
    encoder of `model_name_or_path`, or the demo's tiny encoder from scratch at `image_size`."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    from ..configuration_backbone import PYRAMID_SCALES, MAEBackboneConfig
    from ..segmentation import upernet_from_pretrained

    head = dict(
        hidden_size=args.upernet_hidden_size,
        auxiliary_channels=args.auxiliary_channels,
        auxiliary_loss_weight=args.auxiliary_loss_weight,
    )
    if args.model_name_or_path is not None:
        depth = MAEBackboneConfig.from_pretrained(args.model_name_or_path).num_hidden_layers
        return upernet_from_pretrained(
            args.model_name_or_path,
            id2label=id2label,
            out_indices=args.out_indices or default_out_indices(depth),
            pyramid_scales=PYRAMID_SCALES,
            pyramid_channels=args.pyramid_channels,
            drop_path_rate=args.drop_path_rate,
            **head,
        )
    encoder = SEGMENTATION_DEMO_MODEL
    backbone = MAEBackboneConfig(
        **encoder,
        image_size=image_size,
        drop_path_rate=args.drop_path_rate,
        out_indices=args.out_indices or default_out_indices(encoder["num_hidden_layers"]),
        pyramid_scales=list(PYRAMID_SCALES),
        pyramid_channels=args.pyramid_channels,
    )
    labels = dict(id2label=id2label, label2id={name: i for i, name in id2label.items()})
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, **labels, **head))


def segmentation_transforms(
    data_args: SegmentationDataArguments, ignore_index: int = 255, num_labels: int | None = None
) -> dict[str, Any]:
    """`{"train", "eval", "image_processor"}`: mmsegmentation's ADE20K training and evaluation pipelines with the
    data arguments, and the image processor saved with the model. `pipeline("image-segmentation")` resizes every
    image to the processor's fixed square: the short edge of `scale` (512 for ADE20K), the scale the model saw."""
    from ..segmentation import SegmentationEvalTransform, SegmentationTrainTransform, segmentation_image_processor

    common = dict(ignore_index=ignore_index, reduce_labels=data_args.reduce_labels, num_labels=num_labels)
    scale = tuple(data_args.scale)
    train = SegmentationTrainTransform(
        crop_size=data_args.crop_size,
        scale=scale,
        ratio_range=tuple(data_args.ratio_range),
        cat_max_ratio=data_args.cat_max_ratio,
        photometric_distortion=data_args.photometric_distortion,
        **common,
    )
    evaluation = SegmentationEvalTransform(scale=scale, **common)
    processor = segmentation_image_processor(min(scale), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return {"train": train, "eval": evaluation, "image_processor": processor}
