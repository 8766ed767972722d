"""Semantic segmentation metrics: mIoU, pixel accuracy and mean class accuracy from one confusion matrix.

Definitions are those of mmsegmentation (`total_area_to_metrics`) and the `evaluate` library's `mean_iou`: pixels
whose label is `ignore_index` are left out; a class's IoU is intersection / union over the whole evaluation set and is
`nan` (left out of the mean) when the class appears neither in the labels nor in the predictions.
"""

from __future__ import annotations

import torch

__all__ = ["SegmentationMetric", "segmentation_metrics"]


class SegmentationMetric:
    """Accumulates a `(num_labels, num_labels)` confusion matrix (rows: label, columns: prediction) over batches.

    In distributed evaluation, sum `metric.confusion` over processes (e.g. `accelerator.reduce(..., "sum")`) before
    `compute()`.

    Args:
        num_labels (`int`): number of classes; labels and predictions are in `[0, num_labels)`.
        ignore_index (`int`): label value of pixels that are not scored (255 for ADE20K with reduced labels).

    Example:

    ```python
    import torch
    from maekit.segmentation import SegmentationMetric

    metric = SegmentationMetric(num_labels=3)
    metric.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
    scores = metric.compute()
    assert scores["pixel_accuracy"] == 2 / 3 and scores["per_class_iou"][2] == 0.0
    ```
    """

    def __init__(self, num_labels: int, ignore_index: int = 255):
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: `predictions` (class ids, or logits `(..., num_labels, H, W)`) and `labels` of one shape."""
        if predictions.ndim == labels.ndim + 1 and predictions.shape[-3] == self.num_labels:
            predictions = predictions.argmax(dim=-3)
        if predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must have the same shape "
                "(resize the logits to the label size first)."
            )
        valid = labels != self.ignore_index
        labels, predictions = labels[valid].long(), predictions[valid].long()
        for name, values in (("labels", labels), ("predictions", predictions)):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_labels):
                raise ValueError(
                    f"{name} must be in [0, {self.num_labels}) or ignore_index={self.ignore_index}; found values in "
                    f"[{int(values.min())}, {int(values.max())}]."
                )
        counts = torch.bincount(labels * self.num_labels + predictions, minlength=self.num_labels**2)
        self.confusion += counts.reshape(self.num_labels, self.num_labels).to(self.confusion.device)

    def compute(self) -> dict[str, float | list[float]]:
        """`mean_iou`, `pixel_accuracy`, `mean_accuracy`, and `per_class_iou` / `per_class_accuracy` (nan: absent)."""
        confusion = self.confusion.double()
        intersection = confusion.diagonal()
        label_area, predicted_area = confusion.sum(dim=1), confusion.sum(dim=0)
        union = label_area + predicted_area - intersection
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
        accuracy = torch.where(label_area > 0, intersection / label_area.clamp(min=1), nan)
        total = label_area.sum()
        return {
            "mean_iou": float(iou.nanmean()),
            "pixel_accuracy": float(intersection.sum() / total) if total > 0 else float("nan"),
            "mean_accuracy": float(accuracy.nanmean()),
            "per_class_iou": iou.tolist(),
            "per_class_accuracy": accuracy.tolist(),
        }


def segmentation_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int = 255
) -> dict[str, float | list[float]]:
    """The metrics of `SegmentationMetric` for one set of predictions and labels (class ids of the same shape)."""
    metric = SegmentationMetric(num_labels, ignore_index)
    metric.update(predictions, labels)
    return metric.compute()
