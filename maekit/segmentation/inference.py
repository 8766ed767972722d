"""Whole-image and sliding-window inference for semantic segmentation models, and evaluation with mIoU.

Models are transformers segmentation models whose output has `logits` of shape `(batch, num_labels, h, w)` (UperNet
returns them at the input size). Sliding-window inference follows mmsegmentation's `slide_inference`: windows of
`crop_size` every `stride` pixels, the last one aligned with the image border, overlapping logits averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..validation import pair
from .metrics import SegmentationMetric

__all__ = ["evaluate_segmentation", "slide_inference", "whole_inference"]


def _resized(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) logits to `size` (no-op when `size` is None or already the size)."""
    if size is None or tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return _resized(model(pixel_values=pixel_values).logits, pixel_values.shape[-2:])


@torch.no_grad()
def whole_inference(model, pixel_values: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits `(batch, num_labels, H, W)` for whole images, bilinearly resized to `output_size` (default: input size).

    The model is used as it is (call `model.eval()` first for inference).
    """
    return _resized(_logits(model, pixel_values), output_size)


@torch.no_grad()
def slide_inference(
    model,
    pixel_values: torch.Tensor,
    crop_size: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits `(batch, num_labels, H, W)` averaged over overlapping `crop_size` windows taken every `stride` pixels.

    An image smaller than a window is run as one (smaller) window. Defaults are the MAE / BEiT ADE20K test setting
    (512 windows, stride 341).
    """
    crop_h, crop_w = pair(crop_size)
    stride_h, stride_w = pair(stride)
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop_size and stride must be positive, got crop_size={crop_size!r}, stride={stride!r}.")
    batch, _, height, width = pixel_values.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = count = None
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
            window = _logits(model, pixel_values[:, :, top:bottom, left:right])
            if logits is None:
                logits = window.new_zeros(batch, window.shape[1], height, width)
                count = window.new_zeros(1, 1, height, width)
            logits[:, :, top:bottom, left:right] += window
            count[:, :, top:bottom, left:right] += 1
    return _resized(logits / count, output_size)


@torch.no_grad()
def evaluate_segmentation(
    model,
    samples: Iterable[dict],
    num_labels: int | None = None,
    ignore_index: int = 255,
    mode: str = "whole",
    crop_size: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    device: torch.device | str | None = None,
) -> dict[str, float | list[float]]:
    """mIoU, pixel accuracy and mean accuracy of `model` over `samples`, at the labels' resolution.

    Args:
        model: a segmentation model (`UperNetForSemanticSegmentation`, ...); run in eval mode, its mode restored.
        samples (`Iterable[dict]`): items (or batches) with `"pixel_values"` `(3, h, w)` / `(B, 3, h, w)` and
            `"labels"` `(H, W)` / `(B, H, W)`, e.g. a `SegmentationDataset` with `SegmentationEvalTransform`. Logits
            are resized to the labels' size before the argmax.
        num_labels (`int`, *optional*): defaults to `model.config.num_labels`.
        ignore_index (`int`): label of pixels left out of the metrics.
        mode (`str`): `"whole"` (`whole_inference`) or `"slide"` (`slide_inference` with `crop_size`, `stride`).
        device: where to run; defaults to the model's device.

    Returns:
        The dict of `SegmentationMetric.compute`.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}.")
    num_labels = model.config.num_labels if num_labels is None else num_labels
    device = next(model.parameters()).device if device is None else torch.device(device)
    metric = SegmentationMetric(num_labels, ignore_index)
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            pixel_values, labels = sample["pixel_values"], sample["labels"]
            if pixel_values.ndim == 3:
                pixel_values, labels = pixel_values[None], labels[None]
            pixel_values = pixel_values.to(device)
            if mode == "whole":
                logits = whole_inference(model, pixel_values, output_size=labels.shape[-2:])
            else:
                logits = slide_inference(model, pixel_values, crop_size, stride, output_size=labels.shape[-2:])
            metric.update(logits.argmax(dim=1).cpu(), labels)
    finally:
        model.train(was_training)
    return metric.compute()
