"""Experimental, benchmark only: the MAE train transform with libjpeg-turbo decoding only the crop window.

TurboJPEG 3's `tj3SetCroppingRegion` (libjpeg's `jpeg_crop_scanline` + `jpeg_skip_scanlines` underneath) decodes
only the rows and columns of the crop: rows below it are not decoded at all, columns outside it get no IDCT, no
upsampling and no colour conversion (their Huffman data is still read). No maintained Python binding with a wheel
exposes it (see docs/data.md), so maekit does not ship this route; this module binds a `libturbojpeg` >= 3.0 that
you point it to with ctypes, to measure what the route would give (`data_pipeline.py --libturbojpeg PATH`).

The crop box, the decode scale and the resize are MAETrainTransform's (same random draws, same box on the decoded
grid); only the decode differs. Run as a script, it checks that on the benchmark's JPEGs (the pixels should not move):

    python benchmarks/crop_window_decode.py --libturbojpeg /path/to/libturbojpeg.so.0
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import torch

from maekit.data import MAETrainTransform, _crop_resize_bicubic, random_resized_crop_box, sample_rng
from maekit.jpeg_decode import draft_scale

__all__ = ["TurboJPEG3", "crop_window_pipeline"]

# TurboJPEG 3 constants (turbojpeg.h).
_TJINIT_DECOMPRESS, _TJPF_RGB = 1, 0
_TJPARAM_SUBSAMP, _TJPARAM_JPEGWIDTH, _TJPARAM_JPEGHEIGHT = 4, 5, 6
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)  # tjMCUWidth per TJSAMP_*


class _ScalingFactor(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class TurboJPEG3:
    """A decompressor of a `libturbojpeg` >= 3.0 at `path`: `decode_window(data, scale, box)`."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        if not hasattr(lib, "tj3SetCroppingRegion"):
            raise ValueError(f"{path} is not libturbojpeg >= 3.0 (no tj3SetCroppingRegion).")
        lib.tj3Init.restype, lib.tj3Init.argtypes = ctypes.c_void_p, [ctypes.c_int]
        lib.tj3DecompressHeader.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.tj3Get.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.tj3SetScalingFactor.argtypes = [ctypes.c_void_p, _ScalingFactor]
        lib.tj3SetCroppingRegion.argtypes = [ctypes.c_void_p, _Region]
        lib.tj3Decompress8.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int
        ]  # fmt: skip
        lib.tj3GetErrorStr.restype, lib.tj3GetErrorStr.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.lib = lib
        self.handle = lib.tj3Init(_TJINIT_DECOMPRESS)

    def _check(self, status: int) -> None:
        if status != 0:
            raise ValueError(self.lib.tj3GetErrorStr(self.handle).decode())

    def size(self, data: bytes) -> tuple[int, int]:
        """(width, height) of a JPEG, from its header."""
        self._check(self.lib.tj3DecompressHeader(self.handle, data, len(data)))
        return self.lib.tj3Get(self.handle, _TJPARAM_JPEGWIDTH), self.lib.tj3Get(self.handle, _TJPARAM_JPEGHEIGHT)

    def decode_window(self, data: bytes, scale: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, int]:
        """Decode `box` = (left, top, right, bottom), on the grid of the image decoded at `1 / scale`, into an RGB
        array; returns it and the left edge of what was decoded (the box's left edge moved to an iMCU boundary)."""
        lib, handle = self.lib, self.handle
        self._check(lib.tj3DecompressHeader(handle, data, len(data)))
        mcu = max(_MCU_WIDTH[lib.tj3Get(handle, _TJPARAM_SUBSAMP)] // scale, 1)
        self._check(lib.tj3SetScalingFactor(handle, _ScalingFactor(1, scale)))
        left = box[0] - box[0] % mcu
        region = _Region(left, box[1], box[2] - left, box[3] - box[1])
        self._check(lib.tj3SetCroppingRegion(handle, region))
        out = np.empty((region.h, region.w, 3), np.uint8)
        self._check(lib.tj3Decompress8(handle, data, len(data), out.ctypes.data, region.w * 3, _TJPF_RGB))
        return out, left


def crop_window_pipeline(path: str, oversampling: float) -> Callable[[str, int], torch.Tensor]:
    """The benchmark's maekit pipeline with the JPEG decoded only in its crop window (RGB JPEGs only)."""
    decoder = TurboJPEG3(path)
    reference = MAETrainTransform(224, scale=(0.2, 1.0))  # its statistics and crop settings

    def run(file: str, index: int) -> torch.Tensor:
        with open(file, "rb") as f:
            data = f.read()
        width, height = decoder.size(data)
        generator = sample_rng(0, 0, index)
        left, top, crop_w, crop_h = random_resized_crop_box(width, height, reference.scale, reference.ratio, generator)
        flip = float(torch.rand(1, generator=generator)) < reference.hflip_prob
        scale = draft_scale(min(crop_w / 224, crop_h / 224) / oversampling)
        # The box on the decoded grid, as MAETrainTransform computes it.
        decoded_w, decoded_h = -(-width // scale), -(-height // scale)
        sx, sy = decoded_w / width, decoded_h / height
        box = (round(left * sx), round(top * sy), round((left + crop_w) * sx), round((top + crop_h) * sy))
        window, window_left = decoder.decode_window(data, scale, box)
        inner = (box[0] - window_left, 0, box[2] - window_left, box[3] - box[1])
        pixels = _crop_resize_bicubic(window, inner, (224, 224))
        if flip:
            pixels = pixels.flip(-1)
        return (
            pixels.to(torch.float32, memory_format=torch.contiguous_format)
            .mul_(reference._scale)
            .sub_(reference._shift)
        )

    return run


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Mean absolute difference (grey levels, 0-255) between this route's and maekit's outputs, per JPEG size and
    oversampling, on the JPEGs of `data_pipeline.py`; printed and returned."""
    import data_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--libturbojpeg", required=True, help="path of a libturbojpeg >= 3.0")
    parser.add_argument("--images", type=int, default=7, help="JPEG files per size (each read with 3 crops)")
    args = parser.parse_args(argv)
    differences = {}
    grey_levels = 255 * torch.tensor(MAETrainTransform().std).view(-1, 1, 1)  # normalized units -> 0-255
    with tempfile.TemporaryDirectory() as folder:
        for label, size in data_pipeline.SIZES.items():
            paths = data_pipeline.make_jpegs(folder, size, args.images)
            for oversampling in (1.5, 1.0):
                whole = data_pipeline.maekit_pipeline("auto", oversampling)
                window = crop_window_pipeline(args.libturbojpeg, oversampling)
                means = [
                    ((whole(path, i) - window(path, i)).abs() * grey_levels).mean().item()
                    for i, path in enumerate(paths * 3)
                ]
                differences[f"{label}, oversampling {oversampling}"] = max(means)
                print(f"{label}, oversampling {oversampling}: mean |difference| per image at most {max(means):.4f}")
    return differences


if __name__ == "__main__":
    main()
