"""Fine-tuning augmentations of the official MAE recipe, without torchvision or timm.

The official `main_finetune.py` builds its training transform with timm (`create_transform` with
`auto_augment="rand-m9-mstd0.5-inc1"`, `re_prob=0.25`, `re_mode="pixel"`) and mixes batches with timm's `Mixup`
(mixup 0.8, cutmix 1.0, switch probability 0.5, label smoothing 0.1). This module re-implements those pieces with
PIL and torch, with the same op set, magnitude scales and sampling rules:

- `FineTuneTrainTransform`: RandomResizedCrop(scale (0.08, 1), bicubic) + horizontal flip + `RandAugment` +
  normalize + `RandomErasing`, PIL image -> tensor.
- `FineTuneEvalTransform`: resize to `size / crop_pct` (bicubic), center crop, normalize.
- `Mixup` (on a batch) and `MixupCollator` (after a collate function): mixup / cutmix with soft targets.

Every random draw goes through an optional `torch.Generator` (`None` uses torch's global RNG), so a sample's
augmentation is reproducible, e.g. with `maekit.data.sample_rng(seed, epoch, index)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MAEEvalTransform,
    collate_fn,
    random_resized_crop_box,
)
from .image_processing_mae import convert_image_mode
from .validation import as_hw, check_crop_scale, check_range

__all__ = [
    "FineTuneEvalTransform",
    "FineTuneTrainTransform",
    "Mixup",
    "MixupCollator",
    "RAND_AUGMENT_OPS",
    "RAND_AUGMENT_INCREASING_OPS",
    "RandAugment",
    "RandomErasing",
    "cutmix_box",
    "one_hot_targets",
]


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """A draw from Beta(alpha, alpha); numpy samples it, seeded from the torch generator (torch's Beta takes none)."""
    seed = _randint(0, 2**62, generator)
    return float(np.random.default_rng(seed).beta(alpha, alpha))


# ----------------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot targets: `1 - smoothing + smoothing / num_classes` on the label, `smoothing /
    num_classes` elsewhere (each row sums to 1).

    Args:
        labels (`torch.Tensor` of shape `(batch,)`): class indices.
        num_classes (`int`): number of classes.
        smoothing (`float`): label smoothing in [0, 1).

    Returns:
        `torch.Tensor` of shape `(batch, num_classes)`, float32, on `labels.device`.
    """
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"labels must be a 1-D integer tensor of class indices, got {tuple(labels.shape)} {labels.dtype}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]."
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[tuple[int, int, int, int], float]:
    """The CutMix box for mixing ratio `lam`, and `lam` corrected for the part of the box inside the image.

    The box has sides `int(height * sqrt(1 - lam))` by `int(width * sqrt(1 - lam))`, is centred on a uniformly drawn
    pixel and clipped to the image; the returned ratio is `1 - box_area / image_area`, the fraction of the image
    that keeps the original pixels.

    Returns:
        `((top, bottom, left, right), lam)`: the box as half-open row and column ranges, and the corrected ratio.
    """
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    center_y, center_x = _randint(0, height, generator), _randint(0, width, generator)
    # exactly cut_h x cut_w before clipping, as current timm (timm 0.3.2 lost a row or column for odd sizes)
    top, bottom = max(center_y - cut_h // 2, 0), min(center_y + (cut_h + 1) // 2, height)
    left, right = max(center_x - cut_w // 2, 0), min(center_x + (cut_w + 1) // 2, width)
    return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / (height * width)


class Mixup:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) on a batch, with label-smoothed soft targets.

    One set of parameters per batch, as timm's `mode="batch"` (the official fine-tuning setting): with probability
    `prob` the batch is mixed with its reverse (`pixel_values.flip(0)`), by CutMix with probability `switch_prob`
    (when both are enabled) and by mixup otherwise, the ratio `lam` drawn from Beta(alpha, alpha). CutMix pastes one
    box of the partner image and corrects `lam` to the pasted area. Targets are
    `lam * smooth(labels) + (1 - lam) * smooth(labels.flip(0))`; every row sums to 1.

    Args:
        num_classes (`int`): number of classes of the soft targets.
        mixup_alpha (`float`): Beta parameter of mixup; 0 disables mixup.
        cutmix_alpha (`float`): Beta parameter of CutMix; 0 disables CutMix.
        prob (`float`): probability of mixing a batch at all.
        switch_prob (`float`): probability of CutMix rather than mixup when both are enabled.
        label_smoothing (`float`): smoothing of the one-hot targets (official: 0.1).

    Call it as `mixup(pixel_values, labels, generator=None)` on a `(batch, channels, height, width)` float tensor
    and `(batch,)` class indices; it returns new `(pixel_values, soft_targets)` and leaves its inputs untouched.
    `MAEForImageClassification` takes the soft targets as `labels` (soft cross-entropy).

    Example:

    ```python
    import torch
    from maekit.augment import Mixup

    mixup = Mixup(num_classes=10)
    images, targets = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and torch.allclose(targets.sum(1), torch.ones(4))
    ```
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        if mixup_alpha < 0 or cutmix_alpha < 0 or mixup_alpha == cutmix_alpha == 0:
            raise ValueError(
                f"mixup_alpha and cutmix_alpha must be >= 0 and not both 0, got {mixup_alpha} and {cutmix_alpha}."
            )
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, switch_prob={self.switch_prob}, "
            f"label_smoothing={self.label_smoothing})"
        )

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, bool]:
        """Draw this batch's `(lam, use_cutmix)`; `lam == 1.0` means no mixing."""
        if self.prob < 1.0 and _uniform(generator) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = _uniform(generator) < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        return _beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha, generator), use_cutmix

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if pixel_values.ndim != 4 or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float (batch, channels, height, width) tensor, got "
                f"{tuple(pixel_values.shape)} {pixel_values.dtype}."
            )
        if labels.shape != (pixel_values.shape[0],):
            raise ValueError(
                f"labels must be class indices of shape ({pixel_values.shape[0]},), got {tuple(labels.shape)}."
            )
        lam, use_cutmix = self.sample(generator)
        if lam == 1.0:
            mixed = pixel_values.clone()
        elif use_cutmix:
            (top, bottom, left, right), lam = cutmix_box(*pixel_values.shape[-2:], lam, generator)
            mixed = pixel_values.clone()
            mixed[:, :, top:bottom, left:right] = pixel_values.flip(0)[:, :, top:bottom, left:right]
        else:
            mixed = pixel_values * lam + pixel_values.flip(0) * (1.0 - lam)
        smooth = one_hot_targets(labels, self.num_classes, self.label_smoothing)
        return mixed, smooth * lam + smooth.flip(0) * (1.0 - lam)


class MixupCollator:
    """A collate function that mixes each batch: `collate_fn(examples)`, then `mixup` on its
    `"pixel_values"` / `"labels"` (the labels become soft targets). Other keys pass through.

    It draws from torch's global RNG, which the DataLoader seeds differently in every worker (and reproducibly,
    given `torch.manual_seed`), so workers do not repeat each other's mixing.

    Args:
        mixup (`Mixup`): the mixing to apply.
        collate_fn (`Callable`): turns a list of samples into a `{"pixel_values", "labels", ...}` dict
            (default: `maekit.data.collate_fn`).
    """

    def __init__(self, mixup: Mixup, collate_fn: Callable[[list[Any]], dict[str, Any]] = collate_fn):
        self.mixup = mixup
        self.collate_fn = collate_fn

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        batch = self.collate_fn(examples)
        if "labels" not in batch:
            raise ValueError("MixupCollator needs labeled samples: the collated batch has no 'labels'.")
        batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        return batch


# ----------------------------------------------------------------------------------------------------------------------
# RandAugment (timm's variant: each chosen op applied with probability 0.5, magnitude noise, signed ranges)


def _affine(image: Image.Image, matrix: tuple[float, ...], aug: RandAugment) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=aug.interpolation, fillcolor=aug.fill_for(image)
    )


def _rotate(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return image.rotate(sign * 30.0 * m, resample=aug.interpolation, fillcolor=aug.fill_for(image))


def _shear_x(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _affine(image, (1, sign * 0.3 * m, 0, 0, 1, 0), aug)


def _shear_y(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _affine(image, (1, 0, 0, sign * 0.3 * m, 1, 0), aug)


def _translate_x(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _affine(image, (1, 0, sign * aug.translate_pct * m * image.width, 0, 1, 0), aug)


def _translate_y(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _affine(image, (1, 0, 0, 0, 1, sign * aug.translate_pct * m * image.height), aug)


def _auto_contrast(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return ImageOps.equalize(image)


def _invert(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return ImageOps.invert(image)


def _keep_bits(image: Image.Image, bits: int) -> Image.Image:
    """Posterize to the `bits` most significant bits; 0 bits gives black (recent PIL rejects `bits=0`)."""
    return ImageOps.posterize(image, bits) if bits > 0 else image.point([0] * 256 * len(image.getbands()))


def _posterize(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _keep_bits(image, int(4 * m))  # keep 0..4 bits: stronger at low magnitude


def _posterize_increasing(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return _keep_bits(image, 4 - int(4 * m))  # keep 4..0 bits


def _solarize(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return ImageOps.solarize(image, int(256 * m))  # threshold 0..256: stronger at low magnitude


def _solarize_increasing(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    return ImageOps.solarize(image, 256 - int(256 * m))


def _solarize_add(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
    add = int(110 * m)  # brighten the pixels below 128 by 0..110
    lut = [min(255, value + add) if value < 128 else value for value in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhancer(enhance: type) -> tuple[Callable, Callable]:
    """(op, increasing op) for a PIL enhancer: factor 0.1..1.9 growing with magnitude, or 1 ± 0.9 m (>= 0.1)."""

    def op(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
        return enhance(image).enhance(1.8 * m + 0.1)

    def increasing(image: Image.Image, m: float, sign: float, aug: RandAugment) -> Image.Image:
        return enhance(image).enhance(max(0.1, 1.0 + sign * 0.9 * m))

    return op, increasing


_color, _color_increasing = _enhancer(ImageEnhance.Color)
_contrast, _contrast_increasing = _enhancer(ImageEnhance.Contrast)
_brightness, _brightness_increasing = _enhancer(ImageEnhance.Brightness)
_sharpness, _sharpness_increasing = _enhancer(ImageEnhance.Sharpness)

# name -> (op(image, m, sign, aug) with m = magnitude / 10, whether the op's direction is drawn at random)
_OPS: dict[str, tuple[Callable, bool]] = {
    "AutoContrast": (_auto_contrast, False),
    "Equalize": (_equalize, False),
    "Invert": (_invert, False),
    "Rotate": (_rotate, True),
    "Posterize": (_posterize, False),
    "PosterizeIncreasing": (_posterize_increasing, False),
    "Solarize": (_solarize, False),
    "SolarizeIncreasing": (_solarize_increasing, False),
    "SolarizeAdd": (_solarize_add, False),
    "Color": (_color, False),
    "ColorIncreasing": (_color_increasing, True),
    "Contrast": (_contrast, False),
    "ContrastIncreasing": (_contrast_increasing, True),
    "Brightness": (_brightness, False),
    "BrightnessIncreasing": (_brightness_increasing, True),
    "Sharpness": (_sharpness, False),
    "SharpnessIncreasing": (_sharpness_increasing, True),
    "ShearX": (_shear_x, True),
    "ShearY": (_shear_y, True),
    "TranslateXRel": (_translate_x, True),
    "TranslateYRel": (_translate_y, True),
}

RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
"""timm's default RandAugment op set (`rand-...`)."""

RAND_AUGMENT_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)  # fmt: skip
"""timm's `inc1` op set, where every op gets stronger with the magnitude (the official MAE fine-tuning one)."""


class RandAugment:
    """RandAugment (Cubuk et al., 2020) on PIL images, as timm's `rand-m9-mstd0.5-inc1` used by the official recipe.

    Per image, `num_ops` ops are drawn uniformly with replacement; each is then applied with probability `prob`, at
    a magnitude drawn from N(`magnitude`, `magnitude_std`) and clipped to [0, `magnitude_max`]. Magnitude 10 is the
    top of each op's range: rotate ±30°, shear ±0.3, translate ±45% of the side, enhance factors 1 ± 0.9,
    posterize to 0 bits, solarize every pixel, solarize-add +110. Signed ops pick their direction at random.

    Args:
        num_ops (`int`): ops per image.
        magnitude (`float`): mean magnitude, on a 0-10 scale.
        magnitude_std (`float`): magnitude noise; `float("inf")` draws it uniformly from [0, magnitude]; 0 disables.
        magnitude_max (`float`): upper clip of the magnitude.
        prob (`float`): probability of applying each drawn op.
        increasing (`bool`): use `RAND_AUGMENT_INCREASING_OPS` (timm `inc1`) rather than `RAND_AUGMENT_OPS`.
        ops (`Sequence[str]`, *optional*): an explicit op list, overriding `increasing`.
        fill (`tuple[int, int, int]`): RGB colour of the area uncovered by geometric ops (timm: the dataset mean;
            grayscale images get the mean of the three values).
        interpolation (`int`): PIL resampling filter of the geometric ops.
        translate_pct (`float`): translation at magnitude 10, as a fraction of the image side.

    Call it as `rand_augment(image, generator=None)` on an "RGB" or "L" PIL image; it returns a PIL image of the
    same size and mode.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        magnitude_std: float = 0.5,
        magnitude_max: float = 10,
        prob: float = 0.5,
        increasing: bool = True,
        ops: Sequence[str] | None = None,
        fill: tuple[int, int, int] = (128, 128, 128),
        interpolation: int = Image.Resampling.BICUBIC,
        translate_pct: float = 0.45,
    ):
        ops = tuple(ops) if ops is not None else (RAND_AUGMENT_INCREASING_OPS if increasing else RAND_AUGMENT_OPS)
        unknown = [name for name in ops if name not in _OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty list of names from {sorted(_OPS)}, got unknown {unknown}.")
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}.")
        if magnitude < 0 or magnitude_std < 0 or magnitude_max <= 0:
            raise ValueError(
                f"magnitude and magnitude_std must be >= 0 and magnitude_max > 0, got {magnitude}, {magnitude_std}, "
                f"{magnitude_max}."
            )
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        if len(fill) != 3:
            raise ValueError(f"fill must be an (R, G, B) triple, got {fill!r}.")
        self.ops = ops
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.prob = prob
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation
        self.translate_pct = translate_pct

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, prob={self.prob}, ops={list(self.ops)})"
        )

    def fill_for(self, image: Image.Image) -> int | tuple[int, int, int]:
        """The fill colour in `image`'s mode."""
        return self.fill if image.mode == "RGB" else round(sum(self.fill) / 3)

    def _draw_magnitude(self, generator: torch.Generator | None) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == float("inf"):
            magnitude = _uniform(generator, 0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = magnitude + self.magnitude_std * float(torch.randn(1, generator=generator))
        return min(max(magnitude, 0.0), self.magnitude_max)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        if image.mode not in ("RGB", "L"):
            raise ValueError(f"RandAugment works on 'RGB' or 'L' images, got mode {image.mode!r}.")
        for index in torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist():
            if self.prob < 1.0 and _uniform(generator) >= self.prob:
                continue
            op, signed = _OPS[self.ops[index]]
            m = self._draw_magnitude(generator) / 10.0
            sign = -1.0 if signed and _uniform(generator) < 0.5 else 1.0
            image = op(image, m, sign, self)
        return image


# ----------------------------------------------------------------------------------------------------------------------
# Random erasing


class RandomErasing:
    """Random Erasing (Zhong et al., 2020) on normalized image tensors, as timm's `RandomErasing`.

    With probability `probability`, a rectangle of `min_area`..`max_area` of the image (aspect ratio log-uniform in
    [`min_aspect`, `max_aspect`], up to 10 tries to fit it) is replaced by noise: per-pixel N(0, 1) (`"pixel"`, the
    official setting: in normalized space, noise of the data's own scale), one N(0, 1) colour per channel
    (`"rand"`), or zeros, i.e. the mean colour (`"const"`).

    Args:
        probability (`float`): probability of erasing an image.
        min_area, max_area (`float`): range of the erased fraction of the image.
        min_aspect (`float`): smallest height / width ratio; `max_aspect` defaults to `1 / min_aspect`.
        mode (`str`): `"pixel"`, `"rand"` or `"const"`.
        max_count (`int`): up to this many rectangles (the count is uniform in [1, max_count]; their areas shrink
            accordingly).

    Call it as `random_erasing(pixel_values, generator=None)` on a `(C, H, W)` or `(B, C, H, W)` float tensor (each
    image of a batch is erased independently); it returns a new tensor of the same shape, dtype and device.
    """

    def __init__(
        self,
        probability: float = 0.25,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        mode: str = "pixel",
        max_count: int = 1,
    ):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}.")
        if not 0.0 < min_area <= max_area <= 1.0:
            raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area} and {max_area}.")
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if min_aspect <= 0 or max_aspect < min_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}.")
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}.")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}.")
        self.probability = probability
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.mode = mode
        self.max_count = max_count

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(probability={self.probability}, area=({self.min_area}, {self.max_area}), "
            f"mode={self.mode!r}, max_count={self.max_count})"
        )

    def _fill(self, channels: int, h: int, w: int, like: torch.Tensor, generator) -> torch.Tensor:
        if self.mode == "const":
            return torch.zeros((channels, 1, 1), dtype=like.dtype, device=like.device)
        shape = (channels, h, w) if self.mode == "pixel" else (channels, 1, 1)
        return torch.randn(shape, generator=generator).to(like)  # drawn on CPU: `generator` is a CPU generator

    def _erase(self, image: torch.Tensor, generator: torch.Generator | None) -> None:
        if _uniform(generator) >= self.probability:
            return
        channels, height, width = image.shape
        count = 1 if self.max_count == 1 else _randint(1, self.max_count + 1, generator)
        for _ in range(count):
            for _ in range(10):
                area = _uniform(generator, self.min_area, self.max_area) * height * width / count
                aspect = math.exp(_uniform(generator, *self.log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top, left = _randint(0, height - h + 1, generator), _randint(0, width - w + 1, generator)
                    image[:, top : top + h, left : left + w] = self._fill(channels, h, w, image, generator)
                    break

    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pixel_values.ndim not in (3, 4) or not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float (C, H, W) or (B, C, H, W) tensor, got {tuple(pixel_values.shape)} "
                f"{pixel_values.dtype}."
            )
        out = pixel_values.clone()
        for image in out if out.ndim == 4 else (out,):
            self._erase(image, generator)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


class FineTuneTrainTransform:
    """The official fine-tuning training transform, PIL image -> normalized tensor, without torchvision.

    RandomResizedCrop(`size`, `scale`, `ratio`, bicubic) -> horizontal flip -> `RandAugment` (m9, mstd 0.5, the
    `inc1` op set, fill = the mean colour) -> to tensor + normalize -> `RandomErasing` (`reprob`, `remode`).

    Args:
        size (`int` or `(int, int)`): output (height, width).
        scale (`(float, float)`): crop area range, as a fraction of the image (official: (0.08, 1)).
        ratio (`(float, float)`): crop aspect-ratio range (width / height).
        hflip_prob (`float`): probability of a horizontal flip.
        auto_augment (`bool` or `RandAugment`): `True` for the official RandAugment, `False` for none, or an
            instance to use instead.
        reprob (`float`): random-erasing probability; 0 disables it.
        remode (`str`): random-erasing fill, `"pixel"` (official), `"rand"` or `"const"`.
        mean, std (`Sequence[float]`): normalization statistics, one per channel.
        num_channels (`int`): 3 (RGB) or 1 (grayscale); images are converted with `convert_image_mode`.
        interpolation (`int`): PIL resampling filter of the crop (and of the default RandAugment).

    Call it as `transform(image, generator=None)`, e.g. with `maekit.data.sample_rng(seed, epoch, index)` as
    `MAEImageDataset` does; returns a float32 `(num_channels, height, width)` tensor.

    Example:

    ```python
    import torch
    from PIL import Image
    from maekit.augment import FineTuneTrainTransform

    transform = FineTuneTrainTransform(size=32)
    image = Image.new("RGB", (48, 40), (200, 30, 90))
    assert transform(image, torch.Generator().manual_seed(0)).shape == (3, 32, 32)
    ```
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        auto_augment: bool | RandAugment = True,
        reprob: float = 0.25,
        remode: str = "pixel",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_channels: int = 3,
        interpolation: int = Image.Resampling.BICUBIC,
    ):
        self.size = as_hw(size)
        self.scale, self.ratio = check_crop_scale(scale), check_range(ratio, "ratio")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}.")
        if num_channels not in (1, 3) or len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"num_channels must be 1 or 3 with as many mean and std values, got {num_channels}, mean={mean!r}, "
                f"std={std!r}."
            )
        self.hflip_prob = hflip_prob
        self.num_channels = num_channels
        self.interpolation = interpolation
        if auto_augment is True:
            fill = tuple(min(255, round(255 * v)) for v in (mean if num_channels == 3 else tuple(mean) * 3))
            auto_augment = RandAugment(fill=fill, interpolation=interpolation)
        elif auto_augment is not False and not isinstance(auto_augment, RandAugment):
            raise TypeError(f"auto_augment must be a bool or a RandAugment, got {type(auto_augment).__name__}.")
        self.rand_augment = auto_augment or None
        self.random_erasing = RandomErasing(reprob, mode=remode) if reprob > 0 else None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip_prob={self.hflip_prob}, rand_augment={self.rand_augment}, random_erasing={self.random_erasing})"
        )

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = convert_image_mode(image, self.num_channels)
        left, top, width, height = random_resized_crop_box(
            image.width, image.height, self.scale, self.ratio, generator
        )
        out_h, out_w = self.size
        # crop, then resize (torchvision's `resized_crop`): the filter sees no pixels outside the crop
        image = image.crop((left, top, left + width, top + height)).resize((out_w, out_h), self.interpolation)
        if self.hflip_prob > 0 and _uniform(generator) < self.hflip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            image = self.rand_augment(image, generator)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).view(out_h, out_w, -1).permute(2, 0, 1)
        pixel_values = (pixels.float() / 255.0 - self.mean) / self.std
        if self.random_erasing is not None:
            pixel_values = self.random_erasing(pixel_values, generator)
        return pixel_values


FineTuneEvalTransform = MAEEvalTransform
"""The official fine-tuning evaluation transform: `MAEEvalTransform` (resize the short side to `size / crop_pct`
bicubic, center crop `size`, normalize; `crop_pct` 0.875 = 224 / 256 by default)."""
