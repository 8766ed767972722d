"""Segmentation data: Hub datasets in the `scene_parse_150` layout, local folders of image / label-map pairs, and an
offline demo set of texture mosaics built from photographs that ship with scikit-image.

Every loader returns a `datasets.DatasetDict` whose splits have an `"image"` column (RGB photos) and an
`"annotation"` column (label maps: one class id per pixel), the layout of `scene_parse_150` (ADE20K), so
`SegmentationDataset(split, transform)` reads any of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["TEXTURE_CLASSES", "load_segmentation_dataset", "load_texture_mosaics"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_IMAGE_DIRS = ("images", "img", "imgs")
_LABEL_DIRS = ("annotations", "masks", "labels", "label_maps")
# Sub-folder names of splits (ADEChallengeData2016 uses training / validation) -> datasets split names.
_SPLIT_NAMES = {"training": "train", "train": "train", "validation": "validation", "val": "validation", "test": "test"}
# The demo's classes: scikit-image's texture photographs (512 x 512 grayscale, CC0).
TEXTURE_CLASSES = ("brick", "grass", "gravel")


def load_segmentation_dataset(
    name_or_path: str,
    *,
    image_column: str = "image",
    label_column: str = "annotation",
    **load_kwargs: Any,
):
    """Load a semantic segmentation data set as a `datasets.DatasetDict` of `"image"` / `"annotation"` columns.

    Args:
        name_or_path (`str`): a Hub dataset with an image column and a label-map column (e.g. one in the
            `scene_parse_150` layout), or a local folder holding `images/` and `annotations/` (or `masks/`,
            `labels/`) with the same file names up to the suffix, optionally split into sub-folders
            (`training` / `validation` as ADEChallengeData2016, or `train` / `val` / `validation` / `test`).
        image_column, label_column (`str`): the Hub dataset's columns; renamed to `"image"` / `"annotation"`.
        **load_kwargs: further `datasets.load_dataset` arguments (`name`, `revision`, `cache_dir`, `token`, ...).

    Returns:
        `datasets.DatasetDict` with splits such as `"train"` and `"validation"`.
    """
    import datasets

    if os.path.isdir(name_or_path):
        return _load_folder(Path(name_or_path))
    splits = datasets.load_dataset(name_or_path, **load_kwargs)
    if not isinstance(splits, datasets.DatasetDict):
        splits = datasets.DatasetDict({load_kwargs.get("split", "train"): splits})
    for split_name, split in splits.items():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise ValueError(
                f"{name_or_path} split {split_name!r} has no column {missing}; columns: {split.column_names}. Pass "
                "image_column= and label_column= (the scene_parse_150 layout is 'image' and 'annotation')."
            )
    renames = {c: new for c, new in ((image_column, "image"), (label_column, "annotation")) if c != new}
    return splits.rename_columns(renames) if renames else splits


def _files(folder: Path) -> dict[str, Path]:
    """Image files under `folder` by their path relative to it, without suffix."""
    return {
        str(path.relative_to(folder).with_suffix("")): path
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file()
    }


def _load_folder(root: Path):
    import datasets

    image_dir = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
    label_dir = next((root / d for d in _LABEL_DIRS if (root / d).is_dir()), None)
    if image_dir is None or label_dir is None:
        raise ValueError(
            f"{root} must hold an images folder ({' / '.join(_IMAGE_DIRS)}) and a label-map folder "
            f"({' / '.join(_LABEL_DIRS)}) with files of the same names; found: {sorted(p.name for p in root.iterdir())}."
        )
    split_dirs = [d for d in sorted(image_dir.iterdir()) if d.is_dir() and d.name in _SPLIT_NAMES]
    parts = [(_SPLIT_NAMES[d.name], d, label_dir / d.name) for d in split_dirs] or [("train", image_dir, label_dir)]
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    splits = {}
    for split, images_in, labels_in in parts:
        images, labels = _files(images_in), _files(labels_in) if labels_in.is_dir() else {}
        unmatched = sorted(set(images) - set(labels))
        if unmatched or not images:
            raise ValueError(
                f"{images_in}: {len(unmatched)} of {len(images)} images have no label map in {labels_in} "
                f"(same name, any image suffix), e.g. {unmatched[:3]}."
            )
        splits[split] = datasets.Dataset.from_dict(
            {"image": [str(images[k]) for k in images], "annotation": [str(labels[k]) for k in images]},
            features=features,
        )
    return datasets.DatasetDict(splits)


def _voronoi_labels(size: int, num_classes: int, max_regions: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) map of 2..max_regions Voronoi cells, each given a class, at least two classes present."""
    num_regions = int(rng.integers(2, max_regions + 1))
    classes = rng.integers(0, num_classes, num_regions)
    while len(np.unique(classes)) < 2:
        classes = rng.integers(0, num_classes, num_regions)
    seeds = rng.uniform(0, size, (num_regions, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    distances = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2  # (size, size, regions)
    return classes[distances.argmin(axis=-1)]


def load_texture_mosaics(
    num_train: int = 64,
    num_eval: int = 16,
    image_size: int = 128,
    max_regions: int = 5,
    eval_rows: int = 128,
    seed: int = 0,
):
    """Offline demo data: mosaics of real texture photographs, each pixel labelled with the photograph it comes from.

    scikit-image ships three 512×512 photographs of textures (`skimage.data.brick`, `grass`, `gravel`; CC0). Each
    mosaic cuts the square into 2..`max_regions` random Voronoi cells and fills each cell with the pixels of one
    photograph at a random offset, so the labels are exact by construction (the texture-mosaic benchmark design of
    texture segmentation). Training mosaics take their pixels from the top `512 - eval_rows` rows of every
    photograph, evaluation mosaics from the bottom `eval_rows` rows, so evaluation sees texture it was not trained on.
    Gray is replicated to RGB.

    Args:
        num_train, num_eval (`int`): number of mosaics per split.
        image_size (`int`): side of the square mosaics; at most `eval_rows` and `512 - eval_rows`.
        max_regions (`int`): most Voronoi cells per mosaic (>= 2).
        eval_rows (`int`): rows of each photograph reserved for evaluation mosaics.
        seed (`int`): every mosaic is a function of (seed, split, index).

    Returns:
        `datasets.DatasetDict` with `"train"` and `"validation"` splits of `"image"` (RGB) / `"annotation"` (mode L,
        values 0..2 = `TEXTURE_CLASSES`).
    """
    import datasets
    from skimage import data as skdata

    photos = [getattr(skdata, name)() for name in TEXTURE_CLASSES]
    height = photos[0].shape[0]
    if not 0 < eval_rows < height or not 0 < image_size <= min(eval_rows, height - eval_rows):
        raise ValueError(
            f"Need 0 < image_size <= min(eval_rows, {height} - eval_rows); got image_size={image_size}, "
            f"eval_rows={eval_rows}."
        )
    if max_regions < 2:
        raise ValueError(f"max_regions must be >= 2, got {max_regions}.")
    rows = {"train": (0, height - eval_rows), "validation": (height - eval_rows, height)}
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    splits = {}
    for split_id, (split, count) in enumerate((("train", num_train), ("validation", num_eval))):
        first_row, last_row = rows[split]
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, split_id, index])
            labels = _voronoi_labels(image_size, len(photos), max_regions, rng)
            mosaic = np.zeros((image_size, image_size), dtype=np.uint8)
            for class_id, photo in enumerate(photos):
                top = int(rng.integers(first_row, last_row - image_size + 1))
                left = int(rng.integers(0, photo.shape[1] - image_size + 1))
                window = photo[top : top + image_size, left : left + image_size]
                mosaic[labels == class_id] = window[labels == class_id]
            images.append(Image.fromarray(mosaic).convert("RGB"))
            annotations.append(Image.fromarray(labels.astype(np.uint8)))
        splits[split] = datasets.Dataset.from_dict({"image": images, "annotation": annotations}, features=features)
    return datasets.DatasetDict(splits)
