"""Small checks of sizes and ranges shared by the configuration, the transforms and the tools (no maekit imports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["as_hw", "check_crop_scale", "check_range", "pair"]


def pair(value) -> tuple[int, int]:
    """`(value, value)` for a single value, the value itself for a (height, width) pair (no checks)."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value, value)


def as_hw(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """A positive int or a (height, width) pair of positive ints as `(height, width)`; `ValueError` naming `name`."""
    if isinstance(size, (int, np.integer)) and size > 0:
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {size!r}.")


def check_range(value: Sequence[float], name: str) -> tuple[float, float]:
    """A `(min, max)` pair with `0 < min <= max`, as floats; `ValueError` naming `name`."""
    if len(value) != 2 or not 0 < value[0] <= value[1]:
        raise ValueError(f"{name} must be a (min, max) pair with 0 < min <= max, got {value!r}.")
    return float(value[0]), float(value[1])


def check_crop_scale(scale: Sequence[float]) -> tuple[float, float]:
    """The (min, max) area fraction of a random-resized crop: 0 < min <= max <= 1."""
    checked = check_range(scale, "scale")
    if checked[1] > 1.0:
        raise ValueError(f"scale must lie within (0, 1], got {scale!r}.")
    return checked
