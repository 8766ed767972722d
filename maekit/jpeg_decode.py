"""JPEG decoding at reduced scale for the train transform: libjpeg-turbo through `simplejpeg` when installed, else PIL.

Both decoders are libjpeg-turbo and both can shrink by 1/2, 1/4 or 1/8 inside the decoder (DCT scaling). `simplejpeg`
(`pip install maekit[fast]`, a wheel that bundles libjpeg-turbo; no system library) decodes straight into a numpy
array: no PIL image object, no copy out of it, less per-image overhead. Other scales that libjpeg-turbo offers
(7/8 ... 3/8) are not used: its scaled IDCTs other than 1/2, 1/4 and 1/8 run slower than a full-size decode.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["JPEG_DECODERS", "available_jpeg_decoder", "decode_jpeg_scaled", "draft_scale"]

JPEG_DECODERS = ("auto", "simplejpeg", "pillow")


@functools.cache
def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def available_jpeg_decoder(decoder: str = "auto") -> str:
    """The decoder `decoder` resolves to: `"simplejpeg"` (when installed, for `"auto"`) or `"pillow"`.

    Raises:
        ValueError: an unknown name, or `"simplejpeg"` when it is not installed.
    """
    if decoder not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder must be one of {JPEG_DECODERS}, got {decoder!r}.")
    if decoder == "pillow" or (decoder == "auto" and _simplejpeg() is None):
        return "pillow"
    if _simplejpeg() is None:
        raise ValueError("jpeg_decoder='simplejpeg' needs the simplejpeg package: pip install 'maekit[fast]'.")
    return "simplejpeg"


def draft_scale(reduction: float) -> int:
    """The largest DCT scaling denominator (1, 2, 4 or 8) that shrinks an image by no more than `reduction`."""
    return next((scale for scale in (8, 4, 2) if reduction >= scale), 1)


def _file_bytes(image: Image.Image) -> bytes | None:
    """The encoded bytes behind a lazily opened PIL image (None when it has no file object)."""
    fp = getattr(image, "fp", None)
    if fp is None:
        return None
    if isinstance(fp, io.BytesIO):
        return fp.getvalue()
    position = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(position)
    return data


def decode_jpeg_scaled(image: Image.Image, scale: int, num_channels: int, decoder: str) -> np.ndarray | Image.Image:
    """Decode a lazily opened JPEG at `1 / scale` of its size (`scale` from `draft_scale`), as RGB or luma.

    Returns a `(height, width, num_channels)` uint8 array from `simplejpeg` (when `decoder` resolves to it and it can
    read the file), else the PIL image after `Image.draft` (not yet converted to the output mode: the caller does).
    A file `simplejpeg` refuses (CMYK, damaged) goes to PIL, which decodes it or raises PIL's own error.
    """
    width, height = image.size
    if decoder == "simplejpeg" and image.mode in ("RGB", "L"):
        data = _file_bytes(image)
        if data is not None:
            try:
                return _simplejpeg().decode_jpeg(
                    data,
                    colorspace="RGB" if num_channels == 3 else "GRAY",
                    min_height=-(-height // scale),
                    min_width=-(-width // scale),
                )
            except ValueError:
                pass  # PIL decodes what it can and reports the rest as usual
    if scale > 1:
        # For a grayscale model, decode the luma plane only. PIL picks the largest scale s with
        # size // target >= s: integer division by `scale` keeps that `scale`.
        luma = num_channels == 1 and image.mode == "RGB"
        image.draft("L" if luma else None, (max(width // scale, 1), max(height // scale, 1)))
    return image
