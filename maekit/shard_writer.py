"""Writing WebDataset-style tar shards from any source maekit reads (`write_shards`; `maekit write-shards` on the command
line).

The reader is `maekit.shards`; this module sits above `maekit.data`, whose loaders give it every source layout.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .data import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, find_column, load_image_dataset, undecoded
from .shards import IMAGE_EXTENSIONS, TAR_BLOCK, ShardedImageDataset, ShardReader

__all__ = ["shard_pattern", "write_shards"]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.I)


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as `"256MB"`, `"1GiB"`, `"500k"`."""
    if isinstance(size, int) and size > 0:
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '256MB', got {size!r}.")
    base = 1024 if match.group(3) else 1000
    value = float(match.group(1)) * base ** " KMGT".index(match.group(2).upper() or " ")
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}.")
    return int(value)


def _image_member(value: Any) -> tuple[bytes, str]:
    """`(bytes, extension)` of an image record: the file's own bytes when it has them, else a PNG encoding."""
    from PIL import Image

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            with open(value["path"], "rb") as file:
                data = file.read()
        value = data
    elif isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as file:
            value = file.read()
    if isinstance(value, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(value)) as image:
                image_format = (image.format or "").lower()
        except Exception:  # noqa: BLE001 (a bad file is kept as it is: readers skip and count it)
            image_format = ""
        extension = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(image_format, image_format)
        return bytes(value), extension if extension in IMAGE_EXTENSIONS else "image"
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, "PNG")
        return buffer.getvalue(), "png"
    raise TypeError(f"Cannot write an image from {type(value).__name__}; expected bytes, a path or a PIL image.")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    source: Any,
    output_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "256MB",
    max_samples_per_shard: int | None = None,
    prefix: str = "shard",
    image_column: str | None = None,
    label_column: str | None = None,
    **load_kwargs: Any,
) -> list[str]:
    """Write a data set as WebDataset-style tar shards `{prefix}-000000.tar`, ... in `output_dir`.

    Every sample becomes `<index>.<ext>` (the image's own bytes when the source has them — no re-encoding — else
    PNG) and, with labels, `<index>.cls` (the label as decimal text); `<index>` is the sample's position in the
    source, zero-padded to 9 digits. A shard is closed before its file would exceed `max_shard_size`, counting the
    padding of tar files to whole 10 KiB records (a single sample that does not fit gets a shard of its own, the only
    kind that can be larger), or hold `max_samples_per_shard` samples. Member metadata is fixed (mtime 0, uid 0, mode
    644), so the same source gives byte-identical shards.

    Args:
        source: a `datasets.Dataset` / `IterableDataset`, anything `maekit.data.load_image_dataset` reads (a folder of
            images, a Hub id, parquet files, a shard pattern), or a sequence of image paths.
        output_dir: folder for the shards (created; existing shards of the same prefix are refused).
        max_shard_size (`int` or `str`): largest size of a shard file in bytes, or a string like `"256MB"` / `"1GiB"`.
        max_samples_per_shard (`int`, *optional*): also close a shard after this many samples.
        prefix (`str`): file name prefix of the shards.
        image_column, label_column (`str`, *optional*): found automatically otherwise (no labels when there are none).
        **load_kwargs: for a name or path source: `load_image_dataset` arguments (`split`, `config_name`, ...).

    Returns:
        The shard paths, in order. Read them back with `ShardedImageDataset(f"{output_dir}/{prefix}-{{000000..N}}.tar")`.
    """
    limit = _parse_size(max_shard_size)
    if max_samples_per_shard is not None and max_samples_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}.")
    if not re.fullmatch(r"[\w\-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-' (no dot, no slash), got {prefix!r}.")
    if isinstance(source, (str, os.PathLike)):
        source, _ = load_image_dataset(os.fspath(source), streaming=True, **load_kwargs)
    elif load_kwargs:
        raise TypeError(f"Unexpected arguments {sorted(load_kwargs)} for a source that is not a name or a path.")
    features = getattr(source, "features", None)
    if isinstance(source, ShardedImageDataset):  # re-shard in the stored order
        source = ShardReader(source.urls, shuffle_buffer=0, shuffle_shards=False, block_size=source.block_size)
    if features is not None:
        image_column = find_column(features, IMAGE_COLUMN_NAMES, image_column, "image")
        label_column = find_column(features, LABEL_COLUMN_NAMES, label_column, "label")
        source = undecoded(source, image_column)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(output_dir), f"{prefix}-*.tar")))
    if existing:
        raise ValueError(
            f"{output_dir} already holds shards named {prefix}-*.tar ({existing[0]}, ...); use another folder."
        )

    paths: list[str] = []
    tar, size, count = None, 0, 0

    def close() -> None:
        tar.close()
        os.replace(paths[-1] + ".tmp", paths[-1])

    for index, record in enumerate(_records(source)):
        is_dict = isinstance(record, dict)
        data, extension = _image_member(record[image_column] if is_dict and image_column is not None else record)
        members = [(f"{index:09d}.{extension}", data)]
        if is_dict and label_column is not None and record.get(label_column) is not None:
            members.append((f"{index:09d}.cls", str(int(record[label_column])).encode()))
        sample_size = sum(TAR_BLOCK + -(-len(d) // TAR_BLOCK) * TAR_BLOCK for _, d in members)
        if tar is not None and (_padded(size + sample_size) > limit or count == max_samples_per_shard):
            close()
            tar = None
        if tar is None:
            paths.append(os.path.join(output_dir, f"{prefix}-{len(paths):06d}.tar"))
            tar = tarfile.open(paths[-1] + ".tmp", "w", format=tarfile.USTAR_FORMAT)
            size, count = 2 * TAR_BLOCK, 0  # the end-of-archive blocks
        for name, payload in members:
            _add_member(tar, name, payload)
        size, count = size + sample_size, count + 1
    if tar is None:
        raise ValueError("The source holds no sample: no shard written.")
    close()
    return paths


def _padded(size: int) -> int:
    """The size of a tar file holding `size` bytes of members and end blocks: `tarfile` pads it to whole records."""
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _records(source: Any) -> Iterable[Any]:
    if hasattr(source, "__len__") and hasattr(source, "__getitem__") and not isinstance(source, dict):
        return (source[i] for i in range(len(source)))
    return source


def shard_pattern(paths: Sequence[str]) -> str:
    """The brace pattern that names `paths` written by `write_shards` (`.../shard-{000000..000003}.tar`)."""
    if len(paths) == 1:
        return paths[0]
    head, first = paths[0].rsplit("-", 1)
    last = paths[-1].rsplit("-", 1)[1]
    return f"{head}-{{{first[:-4]}..{last[:-4]}}}.tar"
