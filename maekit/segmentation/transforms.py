"""Joint image + label-map transforms for semantic segmentation, as mmsegmentation's ADE20K pipeline.

Train: (reduce labels) -> random resize (ratio range, keep aspect) -> random crop (cat_max_ratio) -> horizontal flip
-> photometric distortion (optional) -> normalize -> pad to the crop size (image with 0, labels with
`ignore_index`). Eval: (reduce labels) -> keep-ratio resize -> normalize; the labels stay at their original size,
so metrics are computed at the original resolution (as mmsegmentation does).

Every random draw comes from the `torch.Generator` passed in (e.g. `maekit.data.sample_rng(seed, epoch, index)`),
so a sample's augmentation depends on (seed, epoch, index) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..augment import _randint, _uniform
from ..data import sample_rng
from ..image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, convert_image_mode
from ..validation import as_hw, check_range

__all__ = [
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "photometric_distortion",
    "reduce_labels",
    "segmentation_collate_fn",
]


def reduce_labels(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K's `reduce_zero_label`: 0 ("other") becomes `ignore_index`, every other class id moves down by one."""
    labels = labels.astype(np.int64)
    # Pixels already ignored stay ignored (mmseg's `reduce_zero_label` puts 254 back to 255).
    return np.where((labels == 0) | (labels == ignore_index), ignore_index, labels - 1)


def _checked_labels(label: Any, reduce: bool, ignore_index: int, num_labels: int | None) -> np.ndarray:
    """The label map as an array, reduced if asked, with every class id below `num_labels` (when given)."""
    labels = _label_array(label)
    if reduce:
        labels = reduce_labels(labels, ignore_index)
    if num_labels is not None:
        ids = np.unique(labels)
        wrong = ids[(ids != ignore_index) & ((ids < 0) | (ids >= num_labels))]
        if wrong.size:
            raise ValueError(
                f"label map holds class ids {wrong[:10].tolist()} outside [0, num_labels={num_labels}) (after "
                f"reduce_labels={reduce}; {ignore_index} is ignored): give the right number of classes, or "
                "reduce_labels if 0 is the 'other' class."
            )
    return labels


def _label_array(label: Any) -> np.ndarray:
    """A label map (PIL image in mode L / P / I, or an array) as a 2-D int64 array."""
    array = np.asarray(label)
    if (
        array.ndim == 3
        and array.shape[-1] in (1, 3, 4)
        and (array[..., :1] == array[..., : min(3, array.shape[-1])]).all()
    ):
        array = array[..., 0]  # a gray label map stored as RGB(A)
    if array.ndim != 2:
        raise ValueError(f"A label map must be one class id per pixel (2-D), got an array of shape {array.shape}.")
    return array.astype(np.int64)


def _rescale_size(width: int, height: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= max(scale)·ratio, short edge <= min(scale)·ratio."""
    long_edge, short_edge = max(scale) * ratio, min(scale) * ratio
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return max(int(width * factor + 0.5), 1), max(int(height * factor + 0.5), 1)


class _Normalize:
    """uint8 HWC array -> normalized float (C, H, W) tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.0

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() - self.mean) / self.std


def photometric_distortion(pixels: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """mmsegmentation's `PhotoMetricDistortion` on a uint8 RGB array: each with probability 1/2, brightness ± 32,
    contrast × [0.5, 1.5] (before or after the colour changes, at random), saturation × [0.5, 1.5], hue ± 18 of
    OpenCV's 180 steps (36°); every step clips to [0, 255]."""

    def clip(x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return clip(x.astype(np.float32) * _uniform(generator, 0.5, 1.5)) if _randint(0, 2, generator) else x

    if _randint(0, 2, generator):
        pixels = clip(pixels.astype(np.float32) + _uniform(generator, -32, 32))
    contrast_first = _randint(0, 2, generator) == 1
    if contrast_first:
        pixels = contrast(pixels)
    change_saturation, saturation = _randint(0, 2, generator), _uniform(generator, 0.5, 1.5)
    change_hue, hue = _randint(0, 2, generator), _randint(0, 37, generator) - 18
    if change_saturation or change_hue:
        hsv = np.asarray(Image.fromarray(pixels).convert("HSV")).astype(np.float32)
        if change_saturation:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if change_hue:  # PIL's hue has 256 steps per turn, OpenCV's 180
            hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0 / 180.0, 256.0)
        hsv = np.rint(hsv).astype(np.int64) % 256
        bands = [Image.fromarray(hsv[..., i].astype(np.uint8)) for i in range(3)]
        pixels = np.asarray(Image.merge("HSV", bands).convert("RGB"))
    if not contrast_first:
        pixels = contrast(pixels)
    return pixels


class SegmentationTrainTransform:
    """mmsegmentation's ADE20K training pipeline on an (image, label map) pair.

    Args:
        crop_size (`int` or `(int, int)`): output (height, width); smaller results are padded.
        scale (`(int, int)`): keep-ratio resize target before the ratio: long edge <= max, short edge <= min
            (mmseg's `img_scale=(2048, 512)`).
        ratio_range (`(float, float)`): the target is multiplied by a ratio drawn uniformly from this range.
        cat_max_ratio (`float`): re-draw the crop (up to 10 times) while one class covers this fraction of its
            labelled pixels or more, or fewer than two classes are in it; 1.0 turns it off.
        flip_prob (`float`): probability of a horizontal flip.
        photometric_distortion (`bool`): apply `photometric_distortion` (brightness, contrast, saturation, hue).
        mean, std (`Sequence[float]`): normalization (ImageNet's by default, as MAE).
        ignore_index (`int`): label of padded and unlabelled pixels.
        reduce_labels (`bool`): ADE20K's `reduce_zero_label` (see `reduce_labels`) before anything else.
        num_labels (`int`, *optional*): the model's number of classes: a label map with another class id is refused
            with an error saying which (a loss would fail with an index error, on CUDA a device-side assert).

    Call it as `transform(image, label, generator)` with a PIL image and a label map (PIL image or array of class
    ids). Returns `{"pixel_values": float (3, H, W), "labels": int64 (H, W)}`.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric_distortion: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        num_labels: int | None = None,
    ):
        self.crop_size = as_hw(crop_size, "crop_size")
        self.scale = as_hw(scale, "scale")
        self.ratio_range = check_range(ratio_range, "ratio_range")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}.")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}.")
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric_distortion = photometric_distortion
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        self.num_labels = num_labels
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
            f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
            f"photometric_distortion={self.photometric_distortion}, reduce_labels={self.reduce_labels})"
        )

    def _crop_box(self, height: int, width: int, generator) -> tuple[int, int, int, int]:
        crop_h, crop_w = self.crop_size
        top = _randint(0, max(height - crop_h, 0) + 1, generator)
        left = _randint(0, max(width - crop_w, 0) + 1, generator)
        return top, min(top + crop_h, height), left, min(left + crop_w, width)

    def __call__(self, image: Image.Image, label: Any, generator: torch.Generator | None = None) -> dict:
        image = convert_image_mode(image, 3)
        labels = _checked_labels(label, self.reduce_labels, self.ignore_index, self.num_labels)
        if labels.shape != (image.height, image.width):
            raise ValueError(f"label map {labels.shape} and image {(image.height, image.width)} differ in size.")
        # Random resize: bilinear for the image, nearest for the labels.
        size = _rescale_size(image.width, image.height, self.scale, _uniform(generator, *self.ratio_range))
        image = image.resize(size, Image.Resampling.BILINEAR)
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST))
        # Random crop avoiding crops dominated by one class (mmseg's RandomCrop).
        box = self._crop_box(*labels.shape, generator)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                classes, counts = np.unique(labels[box[0] : box[1], box[2] : box[3]], return_counts=True)
                counts = counts[classes != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(*labels.shape, generator)
        pixels = np.asarray(image)[box[0] : box[1], box[2] : box[3]]
        labels = labels[box[0] : box[1], box[2] : box[3]]
        if _uniform(generator, 0.0, 1.0) < self.flip_prob:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        if self.photometric_distortion:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), generator)
        pixel_values = self.normalize(pixels)
        # Pad to the crop size: image with 0 (the mean colour after normalization), labels with ignore_index.
        crop_h, crop_w = self.crop_size
        out = torch.zeros(3, crop_h, crop_w)
        out_labels = torch.full((crop_h, crop_w), self.ignore_index, dtype=torch.int64)
        h, w = labels.shape
        out[:, :h, :w] = pixel_values
        out_labels[:h, :w] = torch.from_numpy(np.array(labels))
        return {"pixel_values": out, "labels": out_labels}


class SegmentationEvalTransform:
    """Keep-ratio resize (mmseg's test `img_scale=(2048, 512)`) and normalize; the label map keeps its size.

    Args:
        scale (`(int, int)`): long edge <= max, short edge <= min after resizing.
        size_divisor (`int`, *optional*): additionally round the resized height and width down to a multiple of this
            (e.g. the patch size, for whole-image inference without padding).
        mean, std, ignore_index, reduce_labels, num_labels: as `SegmentationTrainTransform`.

    Call it as `transform(image, label=None, generator=None)`; returns `{"pixel_values": (3, h, w)}` plus
    `"labels": (H, W)` at the original size when a label map is given.
    """

    def __init__(
        self,
        scale: tuple[int, int] = (2048, 512),
        size_divisor: int | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        num_labels: int | None = None,
    ):
        self.scale = as_hw(scale, "scale")
        if size_divisor is not None and (not isinstance(size_divisor, int) or size_divisor < 1):
            raise ValueError(f"size_divisor must be a positive integer or None, got {size_divisor!r}.")
        self.size_divisor = size_divisor
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        self.num_labels = num_labels
        self.normalize = _Normalize(mean, std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, size_divisor={self.size_divisor})"

    def __call__(self, image: Image.Image, label: Any = None, generator: torch.Generator | None = None) -> dict:
        image = convert_image_mode(image, 3)
        width, height = _rescale_size(image.width, image.height, self.scale)
        if self.size_divisor:
            width = max(width // self.size_divisor, 1) * self.size_divisor
            height = max(height // self.size_divisor, 1) * self.size_divisor
        out = {"pixel_values": self.normalize(np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)))}
        if label is not None:
            labels = _checked_labels(label, self.reduce_labels, self.ignore_index, self.num_labels)
            out["labels"] = torch.from_numpy(labels)
        return out


class SegmentationDataset(torch.utils.data.Dataset):
    """A map-style dataset of (image, label map) records with a joint transform and (seed, epoch, index) randomness.

    Args:
        dataset: anything indexable whose items are dicts (a `datasets.Dataset` with image and label-map columns).
        transform (`Callable`): `transform(image, label, generator) -> dict`, e.g. `SegmentationTrainTransform()`.
        image_column, label_column (`str`): the columns (`scene_parse_150` layout: `"image"`, `"annotation"`).
        seed (`int`): seed of `maekit.data.sample_rng(seed, epoch, index)`; call `set_epoch` every epoch.
    """

    def __init__(
        self, dataset, transform, image_column: str = "image", label_column: str = "annotation", seed: int = 0
    ):
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        record = self.dataset[index]
        for column in (self.image_column, self.label_column):
            if column not in record:
                raise KeyError(f"column {column!r} not in the record; columns: {sorted(record)}.")
        image, label = record[self.image_column], record[self.label_column]
        try:
            return self.transform(image, label, sample_rng(self.seed, self.epoch, int(index)))
        except ValueError as err:
            where = getattr(label, "filename", "") or getattr(image, "filename", "")
            raise ValueError(f"sample {index}{f' ({where})' if where else ''}: {err}") from err


def segmentation_collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack same-size samples into `{"pixel_values": (B, 3, H, W), "labels": (B, H, W)}`."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
