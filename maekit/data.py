"""Data pipeline for MAE pretraining: loading, a fast train transform, an eval transform, bad-file handling, collate.

The train transform is the official one (RandomResizedCrop(scale=(0.2, 1.0), bicubic) + horizontal flip +
normalize) written without torchvision and made cheap for JPEGs: the decoder is asked for a reduced-scale image
(DCT scaling, `maekit.jpeg_decode`: `simplejpeg` when installed, else `Image.draft`) when the crop is much larger than
the output, the crop and the resize are one operation (torch's uint8 antialiased bicubic), and the conversion to a
normalized float tensor is one pass. Every random draw of a sample can come from `sample_rng(seed, epoch, index)`, so a
resumed run, or a run on another number of processes or workers, sees exactly the same augmentations.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MAEImageProcessor, convert_image_mode
from .jpeg_decode import available_jpeg_decoder, decode_jpeg_scaled, draft_scale
from .shared_epoch import SharedEpoch
from .validation import as_hw, check_crop_scale, check_range

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "BadImageError",
    "MAEEvalTransform",
    "MAEImageDataset",
    "MAEIterableImageDataset",
    "MAETrainTransform",
    "SeededRandomSampler",
    "build_dataloader",
    "collate_fn",
    "decode_error_message",
    "decode_image",
    "load_default_dataset",
    "load_image_dataset",
    "load_saved_splits",
    "random_resized_crop_box",
    "sample_rng",
]

# What a corrupt, truncated, non-image or oversized file raises inside PIL.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
# With draft(), the crop is still decoded at >= 1.5x the output size, so that the final antialiased bicubic does part
# of the reduction: on photos, outputs stay within 0.3 grey levels (mean absolute difference) of full-resolution
# decoding, against 0.7 when DCT scaling does all of it; the speed is nearly the same.
_DRAFT_OVERSAMPLING = 1.5
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "photo")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "fine_label", "target")
_EVAL_SPLIT_NAMES = ("validation", "val", "valid", "test")


class BadImageError(ValueError):
    """An image that cannot be decoded (corrupt, truncated, not an image, too large); the message names it."""


def _seed_from(*values: int) -> int:
    """A 63-bit seed that mixes non-negative integers (numpy SeedSequence: well spread, order-sensitive)."""
    for value in values:
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"seed, epoch and index must be non-negative integers, got {values}.")
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from (seed, epoch, index) alone.

    Used for a sample's crop and flip (and by the trainer for its mask noise): the draws do not depend on which
    process or worker handles the sample, or on what was drawn before, so resumed and re-sharded runs agree.
    """
    return torch.Generator().manual_seed(_seed_from(seed, epoch, index))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Crop box of RandomResizedCrop, with torchvision's semantics.

    Up to 10 tries draw an area fraction uniformly from `scale` and an aspect ratio log-uniformly from `ratio`; the
    first crop that fits is placed uniformly at random. If none fits, the whole image is center-cropped to the
    nearest allowed aspect ratio.

    Returns:
        `(left, top, crop_width, crop_height)` in pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    # Fallback: central crop at the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, max(w, 1), max(h, 1)


class MAETrainTransform:
    """RandomResizedCrop + horizontal flip + normalize, the MAE pretraining augmentation, without torchvision.

    Args:
        size (`int` or `(int, int)`): output (height, width).
        scale (`(float, float)`): range of the crop's area as a fraction of the image's.
        ratio (`(float, float)`): range of the crop's aspect ratio (width / height), drawn log-uniformly.
        hflip_prob (`float`): probability of a horizontal flip.
        mean, std (`Sequence[float]`): normalization statistics (one per channel).
        num_channels (`int`): 3 (RGB) or 1 (grayscale); other modes are converted (see `convert_image_mode`).
        resample (`int`): PIL resampling filter, bicubic as the official code.
        draft (`bool`): let the JPEG decoder produce a reduced-scale image (1/2, 1/4, 1/8) when the crop is much
            larger than the output; the crop still spans at least `draft_oversampling` x `size` after decoding, and
            the antialiased bicubic does the rest (see docs/data.md for the measured difference to full-resolution
            decoding).
        draft_oversampling (`float`, >= 1): how much larger than the output the crop stays after a reduced-scale
            decode (1.5: within ~0.3 grey levels of full-resolution decoding on average; 1.0: fastest).
        jpeg_decoder (`str`): `"auto"` (`simplejpeg` when installed — `pip install maekit[fast]` — else PIL),
            `"simplejpeg"` or `"pillow"`. Both are libjpeg-turbo; `simplejpeg` decodes straight into an array.

    Call it as `transform(image, generator)`: a PIL image (ideally fresh from `Image.open`, so that `draft` can act)
    and an optional `torch.Generator` (e.g. `sample_rng(seed, epoch, index)`; `None` uses torch's global RNG).
    Returns a float tensor `(num_channels, height, width)`.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_channels: int = 3,
        resample: int = Image.Resampling.BICUBIC,
        draft: bool = True,
        draft_oversampling: float = _DRAFT_OVERSAMPLING,
        jpeg_decoder: str = "auto",
    ):
        self.size = as_hw(size)
        self.scale = check_crop_scale(scale)
        self.ratio = check_range(ratio, "ratio")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}.")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(f"mean and std need {num_channels} values each, got mean={mean!r}, std={std!r}.")
        self.hflip_prob = hflip_prob
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_channels = num_channels
        self.resample = resample
        self.draft = draft
        if not (isinstance(draft_oversampling, (int, float)) and draft_oversampling >= 1.0):
            raise ValueError(f"draft_oversampling must be a number >= 1, got {draft_oversampling!r}.")
        self.draft_oversampling = float(draft_oversampling)
        self.jpeg_decoder = jpeg_decoder
        self._decoder = available_jpeg_decoder(jpeg_decoder)
        # Fused rescale + normalize: x / 255 * (1 / std) - mean / std.
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip_prob={self.hflip_prob}, num_channels={self.num_channels})"
        )

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        width, height = image.size
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
        flip = self.hflip_prob > 0 and float(torch.rand(1, generator=generator)) < self.hflip_prob
        out_h, out_w = self.size
        decoded = image
        if image.format in ("JPEG", "MPO") and image.tile:  # a JPEG not decoded yet: decode only what is needed
            # Largest DCT reduction that keeps the crop >= draft_oversampling x the output size.
            reduction = min(crop_w / out_w, crop_h / out_h) / self.draft_oversampling if self.draft else 1.0
            decoded = decode_jpeg_scaled(image, draft_scale(reduction), self.num_channels, self._decoder)
        if isinstance(decoded, Image.Image):
            decoded = convert_image_mode(decoded, self.num_channels)
            decoded_w, decoded_h = decoded.size
        else:  # (H, W, C) uint8 array
            decoded_h, decoded_w = decoded.shape[:2]
        # A reduced-scale decode shrinks the image by an integer factor: crop on the decoded pixel grid (the box
        # moves by less than one decoded pixel, i.e. under 0.25% of the crop's width).
        sx, sy = decoded_w / width, decoded_h / height
        box = (round(left * sx), round(top * sy), round((left + crop_w) * sx), round((top + crop_h) * sy))
        if self.resample == Image.Resampling.BICUBIC:
            pixels = _crop_resize_bicubic(decoded, box, (out_h, out_w))
        else:
            if not isinstance(decoded, Image.Image):
                decoded = Image.fromarray(decoded[..., 0] if self.num_channels == 1 else decoded)
            pixels = _pil_to_chw(decoded.resize((out_w, out_h), resample=self.resample, box=box))
        if flip:
            pixels = pixels.flip(-1)
        out = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return out.mul_(self._scale).sub_(self._shift)


def _pil_to_chw(image: Image.Image) -> torch.Tensor:
    """uint8 PIL image ("RGB" or "L") -> (C, H, W) uint8 view of a single writable copy of its pixels."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, -1).permute(2, 0, 1)


def _crop_resize_bicubic(
    image: Image.Image | np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Crop `box` of a PIL image or an (H, W, C) uint8 array and resize it to `size` (H, W) with torch's uint8
    antialiased bicubic: PIL's filter (a = -0.5, widened when shrinking), so the output is PIL's crop-then-resize
    (torchvision's `resized_crop`) up to rounding, several times faster on one thread, enlarging or shrinking.
    """
    if isinstance(image, np.ndarray):  # a view of the crop, no copy
        pixels = torch.from_numpy(image[box[1] : box[3], box[0] : box[2]]).permute(2, 0, 1)
    else:
        pixels = _pil_to_chw(image.crop(box))  # (C, h, w): a channels-last memory layout, as the fast kernel wants
    if tuple(pixels.shape[1:]) == size:
        return pixels
    return torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", antialias=True)[0]


class MAEEvalTransform:
    """Resize the shortest edge to `size / crop_pct` (bicubic), center crop `size`, normalize.

    It runs an `MAEImageProcessor` configured that way (see `image_processor`), so its output equals the
    processor's by construction; save that processor next to a model to reproduce the evaluation preprocessing.

    Args:
        size (`int` or `(int, int)`): output (height, width).
        crop_pct (`float`): fraction of the resized image kept by the center crop (0.875 = 224 of 256, as the
            official fine-tuning evaluation).
        mean, std, num_channels: as `MAETrainTransform`.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        num_channels: int = 3,
    ):
        height, width = as_hw(size)
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        self.size, self.crop_pct = (height, width), crop_pct
        self.image_processor = MAEImageProcessor(
            size={"shortest_edge": int(math.floor(min(height, width) / crop_pct))},
            do_center_crop=True,
            crop_size={"height": height, "width": width},
            resample=Image.Resampling.BICUBIC,
            image_mean=list(mean),
            image_std=list(std),
            num_channels=num_channels,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_pct={self.crop_pct})"

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns a float tensor (num_channels, height, width); `generator` is accepted for symmetry and unused."""
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]


def decode_image(value: Any, max_image_pixels: int | None = None) -> Image.Image:
    """Open an image from a path, bytes, a `datasets` `{"bytes", "path"}` dict, a PIL image or an array.

    The file is opened lazily (header only) so that transforms can still use `Image.draft`; decoding errors can
    therefore surface when the pixels are first used. Images above `max_image_pixels` (default: PIL's
    `Image.MAX_IMAGE_PIXELS`) are refused as decompression bombs from their header, before any decoding (PIL itself
    refuses images above twice its own limit: raise `Image.MAX_IMAGE_PIXELS` too to go beyond that).

    Raises:
        BadImageError: an empty record, or an image over the pixel limit.
        TypeError: a value of another type.
        OSError: a missing file, or data that PIL cannot identify as an image (`PIL.UnidentifiedImageError`); PIL's
            decoding errors can also surface later, when the pixels are first used.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
    name = _source_name(value)
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = _open_file(value)
    elif isinstance(value, Image.Image):
        if getattr(value, "fp", None) is not None and getattr(value, "filename", ""):
            image = _open_file(value.filename)  # a fresh lazy handle: draft() must never shrink the caller's image
        else:
            image = value
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    elif value is None:
        raise BadImageError(f"{name}: no image data (neither bytes nor a path).")
    else:
        raise TypeError(f"Cannot decode an image from {type(value).__name__}; expected a path, bytes or a PIL image.")
    if limit is not None and image.size[0] * image.size[1] > limit:
        image.close()
        raise BadImageError(
            f"{name}: {image.size[0]}x{image.size[1]} pixels exceeds max_image_pixels={limit} (decompression bomb guard)."
        )
    return image


def _open_file(path: str | os.PathLike) -> Image.Image:
    """A lazily decoded image over the file's bytes in memory: no file stays open when a decoder other than PIL's
    reads those bytes and the image is never loaded."""
    with open(path, "rb") as file:
        return Image.open(io.BytesIO(file.read()))


def _source_name(value: Any) -> str:
    """A file path for error messages, when the record has one."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return "<in-memory image>"


def find_column(features: Any, names: Sequence[str], wanted: str | None, kind: str) -> str | None:
    """The column named `wanted`, else the first column of the right feature type, else a conventional name."""
    import datasets

    columns = list(features) if features is not None else []
    if wanted is not None:
        if features is not None and wanted not in columns:
            raise ValueError(f"{kind}_column={wanted!r} is not a column of the dataset; columns: {columns}.")
        return wanted
    feature_type = datasets.Image if kind == "image" else datasets.ClassLabel
    for column in columns:
        if isinstance(features[column], feature_type):
            return column
    for column in names:
        if column in columns:
            return column
    if kind == "image":
        raise ValueError(f"No image column found among {columns}; pass image_column=.")
    return None


def undecoded(dataset: Any, image_column: str) -> Any:
    """Ask `datasets` for raw bytes/paths so that decoding (and its failures) happens under our control."""
    import datasets

    features = getattr(dataset, "features", None)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        if features[image_column].decode:
            return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def decode_error_message(err: BaseException) -> str:
    """`"<error type>: <message>"` of a decoding error, without PIL's repr of the in-memory file it read
    (`<_io.BytesIO object at 0x...>`): the same file gives the same message, and the caller names the file.

    Example:

    ```python
    import io

    from PIL import Image
    from maekit.data import decode_error_message

    try:
        Image.open(io.BytesIO(b"not an image"))
    except OSError as err:
        assert decode_error_message(err) == "UnidentifiedImageError: cannot identify image file"
    ```
    """
    return f"{type(err).__name__}: {re.sub(r' ?<[^<>]* object at 0x[0-9a-f]+>', '', str(err))}"


def _raised_in_pil(err: BaseException) -> bool:
    """Whether an exception was raised inside PIL (a decoding problem) rather than in maekit's own code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}PIL{os.sep}" in tb.tb_frame.f_code.co_filename


class _SampleLoader:
    """Decode + transform one record, turning decode failures into `BadImageError` naming the source."""

    def __init__(self, transform: Callable, image_column: str | None, label_column: str | None, max_image_pixels):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.max_image_pixels = max_image_pixels

    def __call__(self, record: Any, generator: torch.Generator, where: str) -> dict[str, Any]:
        if self.image_column is not None:
            value = record[self.image_column]
        elif isinstance(record, dict) and "image" in record:  # e.g. a stream without declared features
            value = record["image"]
        else:  # the record is the image: a path, bytes, a PIL image
            value = record
        name = _source_name(value)
        try:
            image = decode_image(value, self.max_image_pixels)
            pixel_values = self.transform(image, generator)
        except BadImageError as err:
            raise BadImageError(f"{where}: {err}") from err
        except _DECODE_ERRORS as err:
            if isinstance(err, ValueError) and not _raised_in_pil(err):
                raise  # a ValueError of the transform itself is a configuration error, not a bad file
            raise BadImageError(f"{where}: cannot decode {name}: {decode_error_message(err)}") from err
        sample = {"pixel_values": pixel_values}
        if self.label_column is not None:
            sample["labels"] = int(record[self.label_column])
        return sample


class _ImageSource:
    """What the map-style and streaming datasets share: column discovery, undecoded images, the sample loader and
    an epoch counter that reaches persistent DataLoader workers."""

    def __init__(self, dataset, transform, image_column, label_column, seed, skip_bad_images, max_image_pixels):
        features = getattr(dataset, "features", None)
        if features is not None:
            image_column = find_column(features, IMAGE_COLUMN_NAMES, image_column, "image")
            label_column = find_column(features, LABEL_COLUMN_NAMES, label_column, "label")
            dataset = undecoded(dataset, image_column)
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.load_record = _SampleLoader(transform, image_column, label_column, max_image_pixels)
        self._epoch = SharedEpoch()
        _seed_from(seed)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the samples draw (visible to persistent workers)."""
        self._epoch.set(epoch)


class MAEImageDataset(_ImageSource, torch.utils.data.Dataset):
    """Map-style dataset of transformed images with deterministic augmentation and bad-image replacement (training)
    or marking (evaluation, feature extraction).

    Args:
        dataset: a `datasets.Dataset` (images decoded or not; it is switched to undecoded so that corrupt files are
            caught here), or a sequence of file paths / bytes / PIL images.
        transform (`Callable`): `transform(image, generator) -> tensor`, e.g. `MAETrainTransform()`.
        image_column, label_column (`str`, *optional*): found automatically (the `Image` / `ClassLabel` feature, or
            a conventional name) when not given; no labels when the dataset has none.
        seed (`int`): seed of `sample_rng(seed, epoch, index)`, which drives each sample's augmentation.
        skip_bad_images (`bool`): replace an undecodable image by another sample (chosen deterministically from
            (seed, epoch, index)) and count it in `num_skipped`; if `False`, raise `BadImageError` naming the file.
        max_image_pixels (`int`, *optional*): decompression-bomb limit (default: PIL's `Image.MAX_IMAGE_PIXELS`).
        max_retries (`int`): replacement attempts for one item before giving up with an error.
        mark_bad_images (`bool`): for evaluation and feature extraction, where every item must stay the file it
            names: an undecodable image is neither replaced nor raised; its item keeps its index and label, has zero
            `pixel_values` (the transform's output shape) and `"bad_image"`: the error naming the file (`None` for
            good items). `collate_fn` passes these on as `batch["bad_images"]`, and
            `maekit.evaluation.extract_features(..., return_bad_images=True)` returns them by row. `skip_bad_images`
            is not consulted then.

    `dataset[i]` returns `{"pixel_values": (C, H, W) tensor, "labels": int (with labels), "num_skipped": int}`, plus
    `"bad_image": str | None` with `mark_bad_images`.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        image_column: str | None = None,
        label_column: str | None = None,
        seed: int = 0,
        skip_bad_images: bool = True,
        max_image_pixels: int | None = None,
        max_retries: int = 50,
        mark_bad_images: bool = False,
    ):
        _ImageSource.__init__(
            self, dataset, transform, image_column, label_column, seed, skip_bad_images, max_image_pixels
        )
        self.max_retries = max_retries
        self.mark_bad_images = mark_bad_images
        self._marker_shape: tuple[int, ...] | None = None  # the transform's output shape, found on first use

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = self.epoch
        candidate, num_skipped, replacements = int(index), 0, None
        while True:
            record = self.dataset[candidate]
            try:
                sample = self.load_record(record, sample_rng(self.seed, epoch, index), f"sample {candidate}")
                break
            except BadImageError as err:
                if self.mark_bad_images:
                    return self._marked(record, err)
                if not self.skip_bad_images:
                    raise
                num_skipped += 1
                logger.warning("Skipping bad image (%s).", err)
                if num_skipped > self.max_retries:
                    raise BadImageError(f"{self.max_retries} bad images in a row while loading item {index}.") from err
                if replacements is None:  # replacement order: a function of (seed, epoch, index) only
                    replacements = np.random.default_rng([self.seed, epoch, int(index), 1])
                candidate = int(replacements.integers(len(self.dataset)))
        sample["num_skipped"] = num_skipped
        if self.mark_bad_images:
            sample["bad_image"] = None
        return sample

    def _marked(self, record: Any, err: BadImageError) -> dict[str, Any]:
        """The item of a bad image under `mark_bad_images`: zeros in its place, its label, the error naming it."""
        # No warning: the item carries the message, and its consumers report bad files themselves (extract_features
        # raises or returns them, maekit extract-features counts and lists them).
        logger.debug("Bad image kept as a marked item (%s).", err)
        if self._marker_shape is None:  # what the transform makes of a blank image: the shape of every good item
            blank = Image.new("RGB", (256, 256))
            self._marker_shape = tuple(self.transform(blank, torch.Generator().manual_seed(0)).shape)
        sample = {"pixel_values": torch.zeros(self._marker_shape), "num_skipped": 0, "bad_image": str(err)}
        if self.load_record.label_column is not None:
            sample["labels"] = int(record[self.load_record.label_column])
        return sample


class MAEIterableImageDataset(_ImageSource, torch.utils.data.IterableDataset):
    """Streaming counterpart of `MAEImageDataset` over a `datasets.IterableDataset` (or any iterable of records).

    Bad images are dropped and counted in the `num_skipped` of the next sample that is yielded (with tar shards, so
    are the bad samples the shard reader skipped). Augmentations use
    `sample_rng(seed, epoch, position)` where `position` is the sample's position in the stream seen by this worker,
    interleaved across DataLoader workers (`worker_id + num_workers * k`), so they are reproducible for a given
    number of workers. `datasets` splits the stream's shards between DataLoader workers itself.

    Pass the whole stream (a `datasets.IterableDataset`, or tar shards: a `maekit.shards.ShardedImageDataset`) to
    `MAETrainer`: it splits it between processes and workers and resumes it itself, reading raw records and decoding
    them with `load_record(record, generator, where)`.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        image_column: str | None = None,
        label_column: str | None = None,
        seed: int = 0,
        skip_bad_images: bool = True,
        max_image_pixels: int | None = None,
    ):
        _ImageSource.__init__(
            self, dataset, transform, image_column, label_column, seed, skip_bad_images, max_image_pixels
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (augmentations, and the shuffle order of a shuffled `datasets.IterableDataset`)."""
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, pending_skips = self.epoch, 0
        for position, record in enumerate(self.dataset):
            if isinstance(record, dict):  # bad samples a shard reader skipped before this record
                pending_skips += record.pop("__skipped__", 0)
            index = worker_id + num_workers * position
            try:
                sample = self.load_record(record, sample_rng(self.seed, epoch, index), f"stream item {index}")
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                logger.warning("Skipping bad image (%s).", err)
                pending_skips += 1
                continue
            sample["num_skipped"], pending_skips = pending_skips, 0
            yield sample
        if pending_skips:
            logger.warning("%d bad image(s) at the end of the stream were skipped.", pending_skips)


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into `{"pixel_values": (B, C, H, W), "labels": (B,) long (if present), "num_skipped": ()}`,
    plus `"bad_images"` (a list of B messages or `None`) for items of a `MAEImageDataset(mark_bad_images=True)`."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if all("labels" in example for example in examples):
        batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
    batch["num_skipped"] = torch.tensor(sum(int(example.get("num_skipped", 0)) for example in examples))
    if any("bad_image" in example for example in examples):
        batch["bad_images"] = [example.get("bad_image") for example in examples]
    return batch


class SeededRandomSampler(torch.utils.data.Sampler[int]):
    """A random permutation of `range(num_samples)` that is a function of (seed, epoch) only; call `set_epoch`."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        # index 2**32: a stream of its own, apart from every sample_rng(seed, epoch, index) of a sample.
        generator = torch.Generator().manual_seed(_seed_from(self.seed, self.epoch, 2**32))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int | None,
    *,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    collate_fn: Callable = collate_fn,
    prefetch_factor: int | None = None,
    sampler: Sequence[int] | torch.utils.data.Sampler | None = None,
    batch_sampler: torch.utils.data.Sampler | None = None,
    generator: torch.Generator | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
) -> torch.utils.data.DataLoader:
    """The DataLoader every maekit loader is built with.

    By default: a (seed, epoch)-seeded shuffle (`SeededRandomSampler`), `pin_memory` on CUDA, persistent workers when
    `num_workers > 0`. For a map-style dataset, call `loader.sampler.set_epoch(epoch)` and `dataset.set_epoch(epoch)`
    before each epoch (both reach persistent workers). Iterable datasets are not shuffled here (shuffle them with
    `datasets`).

    Args:
        dataset: the dataset.
        batch_size (`int`, *optional*): samples per batch; None for a dataset that yields whole batches.
        shuffle, seed: the default sampler's shuffle and seed (ignored with `sampler` / `batch_sampler`).
        num_workers, prefetch_factor, drop_last, collate_fn, generator: as `torch.utils.data.DataLoader`.
        sampler: indices to read (e.g. a fixed order), instead of the shuffle.
        batch_sampler: yields the index lists of whole batches (then `batch_size`, `shuffle` and `drop_last` are
            not used).
        pin_memory (`bool`, *optional*): default: whether CUDA is available.
        persistent_workers (`bool`, *optional*): default: `num_workers > 0`.

    `drop_last` defaults to `shuffle`: a training loader drops the last partial batch (as the official pretraining
    loader), an evaluation or feature-extraction loader (`shuffle=False`) keeps every sample, in order.
    """
    if (
        batch_sampler is None
        and batch_size is not None
        and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1)
    ):
        raise ValueError(f"batch_size must be a positive int (or None for a dataset of batches), got {batch_size!r}.")
    drop_last = shuffle if drop_last is None else drop_last
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if batch_sampler is not None:
        options = dict(batch_sampler=batch_sampler)
    else:
        if sampler is None and shuffle and not iterable:
            sampler = SeededRandomSampler(len(dataset), seed)
        options = dict(batch_size=batch_size, sampler=sampler, drop_last=drop_last and batch_size is not None)
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory and torch.cuda.is_available(),
        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=generator,
        **options,
    )


def load_image_dataset(
    name_or_path: str | None = None,
    *,
    data_dir: str | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
    config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    train_val_split: float | int | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    **load_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a train split and an evaluation split (or `None`) with `datasets`, or from tar shards.

    Args:
        name_or_path (`str`, *optional*): what `datasets.load_dataset` takes — a Hub dataset id (`"cifar10"`), a
            builder name (`"parquet"`, `"imagefolder"`, ... with `data_dir` / `data_files`), or a local folder in any
            layout it reads (parquet / arrow / json / csv files, a Hub-style `data/train-00000-of-00004.parquet`
            folder, a folder of images with one sub-folder per class) — plus a `save_to_disk` folder, a single data
            file or glob (`"images.parquet"`, `"data/*.arrow"`), and WebDataset tar shards: a folder of `.tar` files,
            a path, URL or brace pattern (`"shards/train-{0000..0099}.tar"`), read by `maekit.shards`.
            `None` with `data_dir` / `data_files`: image files.
        data_dir, data_files, config_name: passed to `datasets.load_dataset`.
        split (`str`): the training split.
        streaming (`bool`): return `datasets.IterableDataset`s (nothing is downloaded up front). Tar shards are
            always streamed (a `maekit.shards.ShardedImageDataset`).
        image_column, label_column (`str`, *optional*): checked to exist (found automatically by the datasets).
        train_val_split (`float` or `int`, *optional*): when the dataset has no validation split, hold out this
            fraction (or, for streaming, this number of examples) of the training split for evaluation.
        seed (`int`): seed of the held-out split, and of the shard order and shuffle buffer of tar shards.
        shuffle_buffer (`int`): shuffle buffer of each reader of tar shards.
        **load_kwargs: further `datasets.load_dataset` arguments (`cache_dir`, `revision`, `token`, ...).

    Returns:
        `(train, eval)`; `eval` is the dataset's validation split if it has one (`validation`, `val`, `valid`, then
        `test`), else the carved split, else `None`.

    Raises:
        ValueError: naming the path when it holds no data, or the split is missing or empty.
    """

    from .shards import ShardedImageDataset, is_shard_pattern

    def shards(urls: Any) -> ShardedImageDataset:
        return ShardedImageDataset(urls, seed=seed, shuffle_buffer=shuffle_buffer)

    where = name_or_path if name_or_path is not None else data_dir if data_dir is not None else data_files
    if name_or_path is None:
        if data_dir is None and data_files is None:
            raise ValueError("Pass a dataset id or folder (name_or_path), data_dir or data_files.")
        name_or_path = "imagefolder"
    plain = data_dir is None and data_files is None  # a name or path alone: resolve it as datasets would
    local = plain and "://" not in name_or_path
    files = _local_files(name_or_path) if local else []
    if plain and is_shard_pattern(name_or_path):  # local or remote
        splits = {split: shards(name_or_path)}
    elif local and os.path.isdir(name_or_path):
        splits = _load_local_folder(name_or_path, split, streaming, shards, load_kwargs)
    elif files:
        builder = _builder_for(files, name_or_path)
        splits = _load_dataset(where, builder, data_files={split: files}, streaming=streaming, **load_kwargs)
    else:
        splits = _load_dataset(
            where,
            name_or_path,
            config_name,
            data_dir=data_dir,
            data_files=data_files,
            streaming=streaming,
            **load_kwargs,
        )
    if split not in splits:
        raise ValueError(f"split={split!r} not found in {where!r}; available splits: {list(splits)}.")
    train = splits[split]
    _check_not_empty(train, where, split)
    eval_split = next((name for name in _EVAL_SPLIT_NAMES if name in splits and name != split), None)
    evaluation = splits[eval_split] if eval_split is not None else None
    if evaluation is None and train_val_split is not None:
        if isinstance(train, ShardedImageDataset):
            raise ValueError(
                f"train_val_split cannot carve an evaluation split out of tar shards ({where!r}); write the "
                "evaluation samples to their own shards (e.g. validation-{0000..0003}.tar)."
            )
        train, evaluation = _carve_split(train, train_val_split, seed, streaming)
    features = train.features
    if features is not None:
        try:
            find_column(features, IMAGE_COLUMN_NAMES, image_column, "image")
            find_column(features, LABEL_COLUMN_NAMES, label_column, "label")
        except ValueError as err:
            raise ValueError(f"{where!r}: {err}") from err
    return train, evaluation


def _local_files(pattern: str) -> list[str]:
    """The local files a path or glob names (none for a folder, a Hub id or a builder name)."""
    import glob

    if os.path.isfile(pattern):
        return [pattern]
    return sorted(path for path in glob.glob(pattern) if os.path.isfile(path)) if glob.has_magic(pattern) else []


def _builder_for(files: Sequence[str], where: str) -> str:
    """The `datasets` builder that reads `files`, from their extensions (as `datasets.load_dataset(folder)` infers)."""
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    builders = {_EXTENSION_TO_MODULE.get(os.path.splitext(path)[1], (None,))[0] for path in files}
    if None in builders or len(builders) != 1:
        extensions = sorted({os.path.splitext(path)[1] or "(none)" for path in files})
        raise ValueError(
            f"Cannot tell how to read {where!r}: file extensions {extensions} (one kind of data file is needed: "
            "parquet, arrow, json, csv, tar shards or images)."
        )
    return builders.pop()


def _load_local_folder(folder: str, split: str, streaming: bool, shards: Callable, load_kwargs: dict) -> dict:
    """A local folder's splits, resolved as `datasets.load_dataset(folder)` resolves them (file names and
    sub-folders say the split, extensions the builder); `save_to_disk` folders and tar shards are read too."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    saved = load_saved_splits(folder, split)
    if saved is not None:
        return {name: part.to_iterable_dataset() if streaming else part for name, part in saved.items()}
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder)
    except EmptyDatasetError as err:
        raise ValueError(
            f"No data in {folder!r}: it holds no data file (images, parquet, arrow, json, csv or tar)."
        ) from err
    if all(path.endswith(".tar") for paths in files.values() for path in paths):
        return {name: shards(list(paths)) for name, paths in files.items()}
    return _load_dataset(folder, folder, streaming=streaming, **load_kwargs)


def load_saved_splits(folder: str | os.PathLike, split: str = "train") -> dict[str, Any] | None:
    """The splits of a folder written by `datasets`' `save_to_disk`, read where they are (memory-mapped, no copy into
    the datasets cache), or `None` when `folder` is not such a folder.

    `load_image_dataset` and `maekit extract-features` recognise these folders here, as `datasets.load_from_disk`
    does: a `DatasetDict` folder (`dataset_dict.json`) gives its splits, a `Dataset` folder (`state.json` and
    `dataset_info.json`) gives `{split: dataset}`.

    Example:

    ```python
    import tempfile

    import datasets
    from maekit.data import load_saved_splits

    with tempfile.TemporaryDirectory() as folder:
        train, test = datasets.Dataset.from_dict({"label": [0, 1, 1]}), datasets.Dataset.from_dict({"label": [1]})
        datasets.DatasetDict({"train": train, "test": test}).save_to_disk(folder)
        splits = load_saved_splits(folder)
        assert {name: len(part) for name, part in splits.items()} == {"train": 3, "test": 1}
        assert load_saved_splits(f"{folder}/..") is None  # not a save_to_disk folder
    ```
    """
    import datasets

    def holds(name: str) -> bool:
        return os.path.isfile(os.path.join(os.fspath(folder), name))

    if holds(datasets.config.DATASETDICT_JSON_FILENAME) or (
        holds(datasets.config.DATASET_STATE_JSON_FILENAME) and holds(datasets.config.DATASET_INFO_FILENAME)
    ):
        loaded = datasets.load_from_disk(os.fspath(folder))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {split: loaded}
    return None


def _load_dataset(where: Any, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, with "no data" failures reported as such, naming `where`."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except datasets.data_files.EmptyDatasetError as err:
        raise ValueError(f"No data in {where!r}: {err}.") from err
    except ValueError as err:
        if "corresponds to no data" not in str(err):  # datasets' words for a split without a single example
            raise
        split = re.search(r'Instruction "([^"]+)"', str(err))
        split = f"{split.group(1)!r} split" if split else "split"
        raise ValueError(f"The {split} of {where!r} is empty: its data files hold no example.") from err


def _check_not_empty(train: Any, where: Any, split: str) -> None:
    """Refuse an empty training split by name (rather than failing later on a batch that never comes)."""
    try:
        length = len(train)
    except TypeError:  # a stream: look at its first record, without decoding it
        import datasets

        if not isinstance(train, datasets.IterableDataset):
            return  # tar shards check themselves when they are opened
        stream = train
        features = train.features
        if features is not None:
            column = next((name for name, feature in features.items() if isinstance(feature, datasets.Image)), None)
            stream = undecoded(train, column) if column is not None else train
        length = sum(1 for _ in stream.take(1))
    if length == 0:
        raise ValueError(
            f"The {split!r} split of {where!r} is empty: no example was found (check the path, the file extensions and "
            "that image folders hold image files)."
        )


def _carve_split(train: Any, train_val_split: float | int, seed: int, streaming: bool) -> tuple[Any, Any]:
    if streaming:
        if not isinstance(train_val_split, int) or train_val_split < 1:
            raise ValueError(
                f"With streaming=True, train_val_split must be a number of examples (int >= 1), got {train_val_split!r}."
            )
        return train.skip(train_val_split), train.take(train_val_split)
    valid_float = isinstance(train_val_split, float) and 0.0 < train_val_split < 1.0
    valid_int = isinstance(train_val_split, int) and 0 < train_val_split < len(train)
    if not (valid_float or valid_int):
        raise ValueError(
            f"train_val_split must be a fraction in (0, 1) or a count in [1, {len(train)}), got {train_val_split!r}."
        )
    parts = train.train_test_split(test_size=train_val_split, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_default_dataset(image_size: int = 32, source: str = "digits", eval_fraction: float = 0.15, seed: int = 0):
    """The embedded default data set, built from images that ship inside scikit-learn / scikit-image (offline).

    Args:
        image_size (`int`): side of the square RGB images.
        source (`str`): `"digits"` — scikit-learn's 1,797 handwritten digits (8x8, upsampled bicubic, gray replicated to
            RGB, labels 0-9); `"photos"` — tiles of scikit-image's colour photos (no labels).
        eval_fraction (`float`): held-out fraction for evaluation (stratified for digits).
        seed (`int`): seed of the split.

    Returns:
        `(train, eval)` `datasets.Dataset`s with an `"image"` column (PIL images) and, for digits, a `"label"`
        `ClassLabel` column.
    """
    import datasets

    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = [
            Image.fromarray(np.rint(d * (255.0 / 16.0)).astype(np.uint8))
            .resize((image_size, image_size), Image.Resampling.BICUBIC)
            .convert("RGB")
            for d in digits.images
        ]
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
        )
        dataset = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
        parts = dataset.train_test_split(test_size=eval_fraction, seed=seed, stratify_by_column="label")
    elif source == "photos":
        from skimage import data as skdata

        names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
        tile = 4 * image_size
        images = []
        for name in names:
            photo = Image.fromarray(getattr(skdata, name)()).convert("RGB")
            for top in range(0, photo.height - tile + 1, tile // 2):
                for left in range(0, photo.width - tile + 1, tile // 2):
                    images.append(photo.crop((left, top, left + tile, top + tile)).resize((image_size, image_size)))
        dataset = datasets.Dataset.from_dict(
            {"image": images}, features=datasets.Features({"image": datasets.Image()})
        )
        parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    else:
        raise ValueError(f"source must be 'digits' or 'photos', got {source!r}.")
    return parts["train"], parts["test"]
