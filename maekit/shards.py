"""WebDataset-style tar shards: a reader with an exact, JSON-serialisable position (the writer is `maekit.shard_writer`).

A shard is a tar file whose members are grouped into samples by key: `000123.jpg` and `000123.cls` form the sample
`000123` (the key is the member path up to the first dot of its file name, as in WebDataset). Shards are named by a
list, a glob, or a brace pattern (`shards/train-{0000..0099}.tar`), locally or at any URL `fsspec` opens (`https://`,
`hf://`, `s3://` with its package, `file://`): all go through the same code.

Reading (`ShardedImageDataset`, `ShardReader`):

- split by shard: the shard list of an epoch (shuffled from `(seed, epoch)`) is dealt round-robin to the `world_size`
  readers of the run (nodes x processes x DataLoader workers), so every sample is read by exactly one reader per epoch;
  with fewer shards than readers, every reader reads every shard and keeps one sample in `world_size`;
- a shuffle buffer whose draws come from a generator seeded by `(seed, epoch, rank, world_size)`;
- a position (`ShardReader.state_dict()`: shard, byte offset of the next sample, the buffered samples as
  `(shard, byte offset)` references, the generator's state, counters) that restores the reader exactly: reading
  resumes by seeking to a member's offset, and each buffered sample is fetched again by one seek — nothing is re-read
  from the start of a shard;
- samples without an image, with an unreadable label, or behind a corrupt tar header are skipped and counted (the
  reader resynchronises on the next valid header).

Writing (`maekit.shard_writer.write_shards`): any source `maekit.data.load_image_dataset` reads (an image folder, a Hub
id, parquet files, a `datasets.Dataset`, other shards), with a target shard size; the same input gives byte-identical
shards.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .shared_epoch import SharedEpoch

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "ShardReader",
    "ShardedImageDataset",
    "expand_shard_urls",
    "is_shard_pattern",
]

# Member extensions that hold the image / the integer label of a sample, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "image", "img")
LABEL_EXTENSIONS = ("cls", "label", "target", "index")
TAR_BLOCK = 512  # tar headers and member data are padded to this many bytes
_STATE_VERSION = 1
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


# --- shard names --------------------------------------------------------------------------------------------------


def _expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx a00by a01bx ... (ranges keep the zero padding of their bounds; nesting allowed)."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"Unbalanced '{{' in shard pattern {pattern!r}.")
    body, head, tail = pattern[start + 1 : end], pattern[:start], pattern[end + 1 :]
    match = _RANGE.match(body)
    if match:
        low, high = match.group(1), match.group(2)
        width = len(low) if low.lstrip("-").startswith("0") and len(low) > 1 else 0
        step = 1 if int(high) >= int(low) else -1
        options = [str(i).zfill(width) for i in range(int(low), int(high) + step, step)]
    else:
        options, depth, last = [], 0, 0
        for i, char in enumerate(body):  # split on top-level commas only
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                options.append(body[last:i])
                last = i + 1
        options.append(body[last:])
        options = [expanded for option in options for expanded in _expand_braces(option)]
    return [head + option + rest for option in options for rest in _expand_braces(tail)]


def is_shard_pattern(name: str) -> bool:
    """Whether `name` names tar shards: ends in `.tar` (after brace expansion), e.g. `data/shard-{0000..0009}.tar`."""
    return isinstance(name, str) and bool(name) and all(url.endswith(".tar") for url in _expand_braces(name))


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """The shard URLs named by a brace pattern, a local glob, a single path or URL, or a list of those.

    Raises:
        ValueError: the pattern names nothing, or a local shard does not exist.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    expanded: list[str] = []
    for pattern in patterns:
        for url in _expand_braces(os.fspath(pattern)):
            if "://" not in url and glob.has_magic(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ValueError(f"No shard matches {url!r}.")
                expanded.extend(matches)
            else:
                expanded.append(url)
    if not expanded:
        raise ValueError(f"No shard named by {urls!r}.")
    missing = [url for url in expanded if "://" not in url and not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of {len(expanded)} shard(s) named by {urls!r} do not exist: {shown}.")
    return expanded


def _open(url: str, block_size: int) -> Any:
    """A seekable binary file for a local path or any fsspec URL (read ahead in blocks of `block_size` remotely)."""
    if "://" not in url:
        return open(url, "rb", buffering=block_size)  # noqa: SIM115 (closed by the reader)
    import fsspec

    return fsspec.open(url, "rb", block_size=block_size, cache_type="readahead").open()


# --- reading one shard --------------------------------------------------------------------------------------------


class _CorruptHeader(Exception):
    """A tar header block whose checksum or fields are wrong."""


class _TarCursor:
    """Reads a tar file member by member from any byte offset; remembers where it is to avoid needless seeks."""

    def __init__(self, url: str, block_size: int):
        self.url = url
        self.file = _open(url, block_size)
        self.position = 0
        self._last_header: tuple[int, tuple | None] | None = None

    def close(self) -> None:
        self.file.close()

    def _read(self, offset: int, size: int) -> bytes:
        if offset != self.position:
            self.file.seek(offset)
        data = self.file.read(size)
        self.position = offset + len(data)
        return data

    def header(self, offset: int) -> tuple[str, int, int, int] | None:
        """`(name, data offset, size, offset of the next member)` of the file member whose header chain starts at
        `offset`, or `None` at the end of the archive. Pax and GNU long-name headers are applied; other non-file
        members skipped. The last answer is kept: the header that ends a sample is parsed once, not twice.

        Raises:
            _CorruptHeader: a header that is not a tar header.
            EOFError: an extended header cut short, or a file that ends without the end-of-archive blocks.
        """
        if self._last_header is not None and self._last_header[0] == offset:
            return self._last_header[1]
        start, long_name = offset, None
        while True:
            block = self._read(offset, TAR_BLOCK)
            if len(block) < TAR_BLOCK:  # a tar file ends with zero blocks: without them it was cut short
                raise EOFError(
                    f"{self.url} ends at byte {offset + len(block)} without tar's end-of-archive blocks: the shard is "
                    "truncated (the samples that followed are missing)."
                )
            if not block.strip(b"\0"):
                found = None  # the end-of-archive zero blocks
                break
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as err:
                raise _CorruptHeader(f"{self.url} at byte {offset}: {err}") from err
            data_offset, size = offset + TAR_BLOCK, info.size
            offset = data_offset + -(-size // TAR_BLOCK) * TAR_BLOCK
            if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                payload = self._read(data_offset, size)
                if len(payload) < size:
                    raise EOFError(f"{self.url}: extended header at byte {data_offset - TAR_BLOCK} is cut short.")
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif info.type == tarfile.XHDTYPE:
                    long_name = _pax_path(payload) or long_name
                continue
            if info.isreg():
                found = (long_name or info.name, data_offset, size, offset)
                break
            long_name = None  # directories, links, global pax headers
        self._last_header = (start, found)
        return found

    def data(self, name: str, offset: int, size: int) -> bytes:
        """The `size` bytes of member `name` at `offset`. Raises `EOFError` when the file ends before."""
        data = self._read(offset, size)
        if len(data) < size:
            raise EOFError(f"{self.url}: member {name!r} is cut short ({len(data)} of {size} bytes).")
        return data

    def resync(self, offset: int) -> int | None:
        """The offset of the next block after `offset` that parses as a tar header (None: none before the end)."""
        offset += TAR_BLOCK
        while True:
            block = self._read(offset, TAR_BLOCK)
            if len(block) < TAR_BLOCK:
                return None
            if block.strip(b"\0"):
                try:
                    tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                    return offset
                except tarfile.HeaderError:
                    pass
            offset += TAR_BLOCK


def _pax_path(payload: bytes) -> str | None:
    """The `path` record of a pax extended header (`"<len> path=<value>\\n"` records), if any."""
    position = 0
    while position < len(payload):
        space = payload.find(b" ", position)
        if space < 0:
            break
        length = int(payload[position:space])
        key, _, value = payload[space + 1 : position + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        position += length
    return None


def _split_key(name: str) -> tuple[str, str]:
    """`"dir/0001.seg.png"` -> `("dir/0001", "seg.png")`: WebDataset's key / extension split (first dot of the file
    name), the extension lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


# --- the reader ---------------------------------------------------------------------------------------------------


def _seed(*values: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(v) for v in values])


class ShardReader:
    """One reader's pass over its part of a list of shards for one epoch; an iterator of sample records.

    Args:
        urls (`list[str]`): all the shards of the data set (every reader of the run gets the same list).
        epoch (`int`): shuffles the shard order and seeds the buffer's draws, with `seed`.
        rank, world_size (`int`): this reader's index among all readers of the run (nodes x processes x workers).
        seed (`int`): seed of the shard order and of the shuffle buffer.
        shuffle_buffer (`int`): samples held for shuffling (0 or 1: the shards' order).
        shuffle_shards (`bool`): shuffle the shard list per epoch before dealing it.
        require_label (`bool`): treat a sample without a readable label member as bad.
        state (`dict`, *optional*): a `state_dict()` of an earlier reader with the same arguments: continue exactly
            where it stopped.
        block_size (`int`): read-ahead size for remote files (and the buffer size of local ones).

    Records are dicts: `"__key__"`, `"__url__"`, `"image"` (`{"bytes": ..., "path": "<url>/<key>.<ext>"}`, what
    `maekit.data.decode_image` reads), `"label"` (an int, when the sample has a label member), and every other member
    as bytes under its extension. `num_skipped` counts the bad samples met so far.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        require_label: bool = False,
        state: dict | None = None,
        block_size: int = 1 << 20,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}.")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}.")
        self.urls, self.epoch, self.rank, self.world_size = list(urls), epoch, rank, world_size
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.require_label = require_label
        self.block_size = block_size
        order = list(range(len(self.urls)))
        if shuffle_shards:
            order = np.random.default_rng(_seed(seed, epoch, 2**32)).permutation(len(self.urls)).tolist()
        # By shard when every reader gets one; else every reader reads all shards and keeps one sample in world_size.
        self.by_shard = len(self.urls) >= world_size
        self.shards = order[rank::world_size] if self.by_shard else order
        self._rng = np.random.default_rng(_seed(seed, epoch, rank, world_size))
        self._cursors: dict[int, _TarCursor] = {}
        self._shard, self._offset = 0, 0  # next sample: self.shards[self._shard] at byte self._offset
        self._samples_seen = 0  # samples met in this reader's shards (bad ones too): the by-example split counts them
        self._buffer: list[tuple[tuple[int, int], dict]] = []  # ((shard, offset), record)
        self.num_emitted, self.num_skipped = 0, 0
        if state is not None:
            self._load_state(state)

    # The position -------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        """The shard list by file name: the same shards moved to another folder or host still match."""
        return hashlib.sha1("\n".join(url.rsplit("/", 1)[-1] for url in self.urls).encode()).hexdigest()[:16]

    def _identity(self) -> dict:
        """What a saved position must share with the reader that restores it."""
        return {
            "version": _STATE_VERSION,
            "shards": self._fingerprint(),
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
        }

    def state_dict(self) -> dict:
        """This reader's exact position after the last record it returned (JSON-serialisable; O(shuffle_buffer))."""
        return {
            **self._identity(),
            "shard": self._shard,
            "offset": self._offset,
            "samples_seen": self._samples_seen,
            "buffer": [list(ref) for ref, _ in self._buffer],
            "rng": self._rng.bit_generator.state,
            "emitted": self.num_emitted,
            "skipped": self.num_skipped,
        }

    def check_state(self, state: dict) -> None:
        """Raise `ValueError` saying what differs when `state` (a `state_dict()`) is not a position of this reader:
        another shard list, epoch, split (rank, world_size), seed or shuffle setting."""
        if not isinstance(state, dict):
            raise ValueError(
                f"A shard reader position is a dict from ShardReader.state_dict(), got {type(state).__name__}."
            )
        expected = self._identity()
        different = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if different:
            described = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in different.items())
            raise ValueError(
                f"This shard reader position belongs to another reader or data set ({described}); resume with the "
                "same shards, epoch, split (rank, world_size), seed and shuffle settings as the run that saved it."
            )

    def _load_state(self, state: dict) -> None:
        self.check_state(state)
        self._shard, self._offset, self._samples_seen = state["shard"], state["offset"], state["samples_seen"]
        self._rng.bit_generator.state = state["rng"]
        self.num_emitted, self.num_skipped = state["emitted"], state["skipped"]
        self._buffer = []
        for shard, offset in state["buffer"]:  # one seek per buffered sample
            record = self._sample_at(shard, offset)[0]
            if record is None:
                raise ValueError(
                    f"Cannot restore the shuffle buffer: no sample at byte {offset} of {self.urls[self.shards[shard]]}"
                    " (the shard changed since the position was saved)."
                )
            self._buffer.append(((shard, offset), record))

    # Reading ------------------------------------------------------------------------------------------------------

    def _cursor(self, shard: int) -> _TarCursor:
        if shard not in self._cursors:
            self._cursors[shard] = _TarCursor(self.urls[self.shards[shard]], self.block_size)
        return self._cursors[shard]

    def close(self) -> None:
        """Close the open shard files (the reader stays usable: they are reopened on demand)."""
        for cursor in self._cursors.values():
            cursor.close()
        self._cursors.clear()

    def _sample_at(self, shard: int, offset: int) -> tuple[dict | None, int | None, str | None]:
        """`(record, offset of the next sample, why it is bad)` for the sample starting at `offset`.

        `(None, None, None)`: the shard ends here. `(None, offset, why)`: a corrupt header here; reading goes on at the
        next valid header (`None`: the shard ends), past the rest of the damaged sample (members without an image).
        A member cut short ends the shard.
        """
        cursor = self._cursor(shard)
        key, members = None, {}
        while True:
            try:
                found = cursor.header(offset)
                if found is not None:
                    name, data_offset, size, next_offset = found
                    member_key, extension = _split_key(name)
                    if key is not None and member_key != key:
                        break  # the next sample starts at `offset`
                    data = cursor.data(name, data_offset, size)
            except (_CorruptHeader, EOFError) as err:
                if key is not None:  # the sample so far is complete as far as can be told; the next call reports it
                    break
                if isinstance(err, EOFError):
                    return None, None, str(err)
                next_offset = cursor.resync(offset)
                if next_offset is not None:  # the damaged sample's other members (no image) go with it
                    rest, after, _ = self._sample_at(shard, next_offset)
                    if rest is not None and "image" not in rest:
                        next_offset = after
                return None, next_offset, str(err)
            if found is None:
                break
            key = member_key
            members[extension] = data
            offset = next_offset
        if key is None:
            return None, None, None
        return self._record(cursor.url, key, members), offset, None

    def _record(self, url: str, key: str, members: dict[str, bytes]) -> dict:
        record: dict[str, Any] = {"__key__": key, "__url__": url}
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        label = next((ext for ext in LABEL_EXTENSIONS if ext in members), None)
        for extension, data in members.items():
            if extension == image:
                record["image"] = {"bytes": data, "path": f"{url}/{key}.{extension}"}
            elif extension == label:
                try:
                    record["label"] = int(data.decode("ascii").strip())
                except (UnicodeDecodeError, ValueError):
                    record["__bad__"] = f"{url}/{key}.{extension}: label {data[:20]!r} is not an integer"
            else:
                record[extension] = data
        if image is None:
            record["__bad__"] = f"{url}/{key}: no image member (found {sorted(members) or 'none'})"
        elif self.require_label and "label" not in record and "__bad__" not in record:
            record["__bad__"] = f"{url}/{key}: no label member (one of {', '.join(LABEL_EXTENSIONS)})"
        return record

    def _next_source(self) -> tuple[tuple[int, int], dict] | None:
        """The next good sample of this reader's part of the shards, with its reference; None when they are done."""
        while self._shard < len(self.shards):
            shard, offset = self._shard, self._offset
            record, next_offset, why = self._sample_at(shard, offset)
            if next_offset is None:
                self._cursors.pop(shard).close()
                self._shard, self._offset = shard + 1, 0
            else:
                self._offset = next_offset
            if record is None and why is None:  # the clean end of the shard
                continue
            mine = self.by_shard or self._samples_seen % self.world_size == self.rank
            self._samples_seen += 1
            if not mine:
                continue
            if record is None or "__bad__" in record:
                self._skip(why if record is None else record.pop("__bad__"))
                continue
            return (shard, offset), record
        return None

    def _skip(self, why: str) -> None:
        self.num_skipped += 1
        logger.warning("Skipping bad sample (%s).", why)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        size = self.shuffle_buffer
        while size > 1 and len(self._buffer) < size:  # fill the buffer
            item = self._next_source()
            if item is None:
                break
            self._buffer.append(item)
        if size > 1:
            if not self._buffer:
                self.close()
                raise StopIteration
            j = int(self._rng.integers(len(self._buffer)))
            item = self._next_source() if self._shard < len(self.shards) else None
            if item is not None:  # take a random buffered sample, put the new one in its place
                (_, record), self._buffer[j] = self._buffer[j], item
            else:  # draining
                (_, record), self._buffer[j] = self._buffer[j], self._buffer[-1]
                self._buffer.pop()
        else:
            item = self._next_source()
            if item is None:
                self.close()
                raise StopIteration
            record = item[1]
        self.num_emitted += 1
        return record


class ShardedImageDataset(torch.utils.data.IterableDataset):
    """A `torch` iterable dataset over WebDataset-style tar shards; wrap it in `maekit.data.MAEIterableImageDataset`.

    Args:
        urls (`str` or `list[str]`): shards, as `expand_shard_urls` reads them
            (`"data/train-{0000..0127}.tar"`, `"https://host/shards/train-{0..9}.tar"`, a glob, a list).
        seed (`int`): seed of the per-epoch shard order and of the shuffle buffer.
        shuffle_buffer (`int`): size of each reader's shuffle buffer (0: read in shard order).
        shuffle_shards (`bool`): shuffle the shard list every epoch.
        rank, world_size (`int`): this process's part of a multi-process run (DataLoader workers split it further).
        block_size (`int`): read-ahead of remote files.

    Iterating it (in a DataLoader worker or not) runs a `ShardReader` of rank
    `rank * num_workers + worker_id` among `world_size * num_workers`; `reader(...)` builds one explicitly (with a saved
    position to resume). Whether samples must carry a label is read from the first sample.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        rank: int = 0,
        world_size: int = 1,
        block_size: int = 1 << 20,
    ):
        self.urls = expand_shard_urls(urls)
        self.pattern = urls if isinstance(urls, str) else None
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}.")
        self.rank, self.world_size, self.block_size = rank, world_size, block_size
        self._epoch = SharedEpoch()
        first = self._first_sample()
        if first is None:
            raise ValueError(f"The shards {self._name()} hold no sample (no tar member in any of them).")
        self.has_labels = "label" in first

    def _name(self) -> str:
        return repr(self.pattern) if self.pattern else f"{self.urls[:3]}{' ...' if len(self.urls) > 3 else ''}"

    def _first_sample(self) -> dict | None:
        reader = ShardReader(self.urls, shuffle_buffer=0, shuffle_shards=False, block_size=self.block_size)
        try:
            return next(reader, None)
        finally:
            reader.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name()}, num_shards={self.num_shards}, shuffle_buffer={self.shuffle_buffer})"

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def features(self) -> Any:
        """`datasets.Features` of the records (undecoded image, int label), for column discovery."""
        import datasets

        features = {"image": datasets.Image(decode=False)}
        if self.has_labels:
            features["label"] = datasets.Value("int64")
        return datasets.Features(features)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffle); reaches persistent DataLoader workers."""
        self._epoch.set(epoch)

    def reader(self, *, epoch: int | None = None, rank: int = 0, world_size: int = 1, state: dict | None = None):
        """The `ShardReader` of reader `rank` among `world_size` for `epoch` (default: the current one)."""
        return ShardReader(
            self.urls,
            epoch=self.epoch if epoch is None else epoch,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=self.shuffle_shards,
            require_label=self.has_labels,
            state=state,
            block_size=self.block_size,
        )

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader = self.reader(rank=self.rank * num_workers + worker_id, world_size=self.world_size * num_workers)
        pending = 0
        for record in reader:
            # Bad samples met by the reader travel with the next record, for the dataset's skip count.
            record["__skipped__"], pending = reader.num_skipped - pending, reader.num_skipped
            yield record
