"""Data order: which images every process reads at every step, for map-style data sets and for streams.

Map-style: every optimizer step consumes one global batch of `per_device_train_batch_size * num_processes *
gradient_accumulation_steps` images from a per-epoch permutation that depends on `(seed, epoch)` only
(`EpochBatchSampler`), so a resumed run, or a run on another number of processes, reads the same images at the same
step.

Streams: a `maekit.data.MAEIterableImageDataset` is split between the `num_processes * max(num_workers, 1)` readers of
the run (`StreamReaders`); each reader batches its own records, and `StreamPosition` records, per reader, the
batches the loop took from it and the records it had read for them (over tar shards also the reader's exact
`ShardReader` position), so that a resumed run continues exactly (with the same numbers of processes and workers).

Every loader is built by `maekit.data.build_dataloader`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, Sampler

from ..data import BadImageError, MAEIterableImageDataset, SeededRandomSampler, build_dataloader, sample_rng
from ..shards import ShardedImageDataset

__all__ = ["EpochBatchSampler", "StreamBatch", "StreamPosition", "StreamReaders", "epoch_loader", "stream_batches"]

logger = logging.getLogger(__name__)

# `sample_rng(seed, epoch, index)` streams above 2**32 are not samples (maekit.data orders epochs with 2**32).
LOADER_STREAM = 2**32 + 3


class EpochBatchSampler(Sampler):
    """This process's micro-batches for optimizer steps `[first, last)` of one epoch.

    Step `s` takes the global batch `perm[s * G:(s + 1) * G]` of the epoch's permutation (a function of (seed, epoch)
    only); micro-batch `m` of process `r` is its slice `[m * P * b + r * b, m * P * b + (r + 1) * b)`.
    """

    def __init__(self, num_samples, *, seed, epoch, first, last, batch_size, num_processes, process_index, accumulation):  # fmt: skip
        order = SeededRandomSampler(num_samples, seed)
        order.set_epoch(epoch)
        self.perm = list(order)
        self.first, self.last = first, last
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index
        self.accumulation = accumulation

    def __len__(self) -> int:
        return (self.last - self.first) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        b, chunk = self.batch_size, self.batch_size * self.num_processes
        global_batch = chunk * self.accumulation
        for step in range(self.first, self.last):
            batch = self.perm[step * global_batch : (step + 1) * global_batch]
            for micro in range(self.accumulation):
                start = micro * chunk + self.process_index * b
                yield batch[start : start + b]


def epoch_loader(
    dataset, *, epoch: int, first: int, last: int, batch_size: int, accumulation: int, num_processes: int,
    process_index: int, seed: int, collate_fn: Callable, num_workers: int, pin_memory: bool,
) -> torch.utils.data.DataLoader:  # fmt: skip
    """The loader of this process's micro-batches for optimizer steps `[first, last)` of `epoch`.

    A fresh loader per epoch: its workers copy the dataset after `set_epoch`, so augmentations follow the epoch.
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(
        len(dataset), seed=seed, epoch=epoch, first=first, last=last, batch_size=batch_size,
        num_processes=num_processes, process_index=process_index, accumulation=accumulation,
    )  # fmt: skip
    return build_dataloader(
        dataset,
        None,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator (worker seeds): a loader must not draw from the process RNG, which drop path uses and
        # checkpoints restore, or a resumed run would see different random numbers.
        generator=sample_rng(seed, epoch, LOADER_STREAM),
    )


@dataclass
class StreamPosition:
    """Where this process is in a stream: the pass (`epoch`), and per reader (DataLoader worker, or the process
    itself without workers) the batches the loop took from it and the records it had read for them.

    Over tar shards (`maekit.shards.ShardedImageDataset`) each reader's exact position is kept too: `reader_states`
    holds, per reader, the `ShardReader.state_dict()` after its last batch (`None` before its first batch of the
    pass), so that a resumed reader seeks to it instead of reading the pass again. It is `None` for a `datasets`
    stream.
    """

    epoch: int = 0
    batches: list[int] = field(default_factory=lambda: [0])
    records: list[int] = field(default_factory=lambda: [0])
    reader_states: list[dict | None] | None = None

    @classmethod
    def start(cls, num_readers: int, epoch: int = 0, shards: bool = False) -> StreamPosition:
        """The start of pass `epoch` for `num_readers` readers (of tar shards: with room for their states)."""
        return cls(epoch, [0] * num_readers, [0] * num_readers, [None] * num_readers if shards else None)

    def to_record(self) -> dict[str, Any]:
        """The JSON-able dict saved in `trainer_state.json` (`reader_states` only for tar shards)."""
        record = asdict(self)
        if self.reader_states is None:
            del record["reader_states"]
        return record

    @classmethod
    def from_record(
        cls, record: dict, path, accelerator, num_readers: int, dataset: MAEIterableImageDataset | None = None
    ) -> StreamPosition:
        """This process's position in a checkpoint's record, if the run splits the same stream the same way.

        With `dataset` (the run's training stream), a position saved reading tar shards is refused for a `datasets`
        stream and the other way round, and every saved shard reader position is checked against the reader that
        would restore it (same shards, pass, split, seed and shuffle settings).
        """
        positions = record.get("stream_positions")
        if positions is None:
            raise ValueError(f"Checkpoint {path} is not from a streaming run: it holds no stream position.")
        num_processes = accelerator.num_processes
        if len(positions) != num_processes or len(positions[0]["batches"]) != num_readers:
            raise ValueError(
                f"Checkpoint {path} was saved by {len(positions)} process(es) reading the stream with "
                f"{len(positions[0]['batches'])} reader(s) each, this run has {num_processes} process(es) with "
                f"{num_readers} (max(dataloader_num_workers, 1)); a streamed run resumes with the same split of the "
                "stream."
            )
        position = cls(**positions[accelerator.process_index])
        if dataset is not None:
            position._check_source(dataset, path, accelerator.process_index, num_processes)
        return position

    def _check_source(self, dataset: MAEIterableImageDataset, path, process_index: int, num_processes: int) -> None:
        shards = isinstance(dataset.dataset, ShardedImageDataset)
        if shards != (self.reader_states is not None):
            saved, now = ("tar shards", "a datasets stream") if not shards else ("a datasets stream", "tar shards")
            raise ValueError(f"Checkpoint {path} was saved reading {saved}; this run reads {now}.")
        if not shards:
            return
        num_readers = len(self.batches)
        for local, state in enumerate(self.reader_states):
            if state is None:
                continue
            reader = dataset.dataset.reader(
                epoch=self.epoch, rank=process_index * num_readers + local, world_size=num_processes * num_readers
            )
            try:
                reader.check_state(state)
            except ValueError as err:
                raise ValueError(f"Checkpoint {path}, reader {local} of process {process_index}: {err}") from None


class StreamBatch(NamedTuple):
    """What a stream reader yields: a collated batch (None for a resume placeholder, or for the end of a pass that
    only reports skipped images), the local reader, the records it has read so far, the bad images it skipped
    since its previous item and, for tar shards, its `ShardReader.state_dict()` after this item."""

    batch: dict[str, Any] | None
    reader: int
    records: int
    num_skipped: int
    state: dict | None = None


# What a reader's source yields per record: its position (1-based) in the reader's records, the record (None: only
# reports bad samples the source skipped), the bad samples the source skipped before it, and a callable that returns
# the source's position after it (None: no such position; the records are counted instead).
_Record = tuple[int, Any, int, Callable[[], dict] | None]


class StreamReaders(IterableDataset):
    """One pass over this process's part of a streaming `MAEIterableImageDataset`, in batches, resumable mid-pass.

    The stream is split between the `num_processes * max(num_workers, 1)` readers of the run; reader `k` is
    `process_index * num_workers + worker_id`. A `datasets.IterableDataset` is split with
    `datasets.distributed.split_dataset_by_node`: by shards when the stream has at least as many shards as readers,
    else by examples (each reader reads the whole stream and decodes one example in `num_readers`). Tar shards
    (`maekit.shards.ShardedImageDataset`) are split by `ShardReader`, by shard (or by sample with fewer shards than
    readers). The sample at position `p` of reader `k`'s records is augmented with
    `sample_rng(seed, epoch, k + num_readers * p)`.

    Each reader collates its own batches of `batch_size` images; the images of an incomplete last batch are dropped,
    but the bad images it skipped are still reported (a final item without a batch). `resume` restarts the pass
    where an interrupted run stopped: reader `w` first yields `resume.batches[w]` placeholders, so that the DataLoader
    takes items from its workers in the same order as the interrupted run did, then continues: over tar shards from
    its saved `ShardReader` position (a seek), over a `datasets` stream after reading its first `resume.records[w]`
    records again without decoding them.
    """

    def __init__(
        self,
        dataset: MAEIterableImageDataset,
        *,
        epoch: int,
        batch_size: int,
        process_index: int,
        num_processes: int,
        collate_fn: Callable,
        resume: StreamPosition,
    ):
        self.dataset, self.epoch, self.batch_size = dataset, epoch, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.collate_fn = collate_fn
        # A snapshot of the position to resume from.
        self.batches_taken, self.records_read = list(resume.batches), list(resume.records)
        self.reader_states = list(resume.reader_states or [None] * len(resume.batches))

    def __iter__(self) -> Iterator[StreamBatch]:
        worker = torch.utils.data.get_worker_info()
        local, num_local = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, num_readers = self.process_index * num_local + local, self.num_processes * num_local
        for _ in range(self.batches_taken[local]):
            yield StreamBatch(None, local, self.records_read[local], 0)
        if isinstance(self.dataset.dataset, ShardedImageDataset):
            records = self._shard_records(reader, num_readers, self.reader_states[local])
        else:
            records = self._stream_records(reader, num_readers, self.records_read[local])
        seed, samples, skipped, position, state = self.dataset.seed, [], 0, self.records_read[local], None
        for position, record, skipped_before, state in records:
            skipped += skipped_before
            if record is None:
                continue
            index = reader + num_readers * (position - 1)
            try:
                sample = self.dataset.load_record(record, sample_rng(seed, self.epoch, index), f"stream item {index}")
            except BadImageError as err:
                if not self.dataset.skip_bad_images:
                    raise
                logger.warning("Skipping bad image (%s).", err)
                skipped += 1
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield StreamBatch(self.collate_fn(samples), local, position, skipped, state() if state else None)
                samples, skipped = [], 0
        if skipped:  # bad images among the dropped incomplete batch, or after the last complete one
            yield StreamBatch(None, local, position, skipped, state() if state else None)

    def _stream_records(self, reader: int, num_readers: int, skip_records: int) -> Iterator[_Record]:
        """Reader `reader`'s records of a `datasets` stream, after its first `skip_records` (read, not decoded)."""
        from datasets.distributed import split_dataset_by_node

        stream = self.dataset.dataset
        strategy = "shards" if stream.num_shards >= num_readers else "examples"
        part = split_dataset_by_node(stream, rank=reader, world_size=num_readers, strategy=strategy)
        part.set_epoch(self.epoch)  # the shuffle of this pass (a split does not inherit the stream's epoch)
        # `iter` rather than `__iter__`: datasets would split the part again between DataLoader workers.
        for position, columns in enumerate(part.iter(batch_size=1), start=1):
            if position > skip_records:
                yield position, {name: values[0] for name, values in columns.items()}, 0, None

    def _shard_records(self, reader: int, num_readers: int, state: dict | None) -> Iterator[_Record]:
        """Reader `reader`'s records of tar shards, from its saved position `state` (None: the start of the pass).
        Bad samples the shard reader skips (no image, bad label, corrupt header) are reported with the next record,
        or by a final item without one."""
        shard_reader = self.dataset.dataset.reader(epoch=self.epoch, rank=reader, world_size=num_readers, state=state)
        skipped = shard_reader.num_skipped
        try:
            for record in shard_reader:
                yield shard_reader.num_emitted, record, shard_reader.num_skipped - skipped, shard_reader.state_dict
                skipped = shard_reader.num_skipped
            if shard_reader.num_skipped > skipped:
                yield shard_reader.num_emitted, None, shard_reader.num_skipped - skipped, shard_reader.state_dict
        finally:
            shard_reader.close()


def _unbatched(item: StreamBatch) -> StreamBatch:
    return item


def stream_batches(
    dataset: MAEIterableImageDataset,
    position: StreamPosition,
    *,
    batch_size: int,
    process_index: int,
    num_processes: int,
    collate_fn: Callable,
    num_workers: int,
    pin_memory: bool,
    on_position: Callable[[StreamPosition], None],
) -> Iterator[tuple[dict[str, Any] | None, int]]:
    """This process's micro-batches of a stream, pass after pass, from `position` on: `(batch, num_skipped)`.

    `batch` is None for an item that only reports skipped images. `position` is updated in place after every item;
    `on_position` receives the new position object at the start of every further pass.
    """
    shards = isinstance(dataset.dataset, ShardedImageDataset)
    if shards and position.reader_states is None:  # a fresh position: room for the readers' states
        position.reader_states = [None] * len(position.batches)
    while True:
        epoch = position.epoch
        dataset.set_epoch(epoch)
        readers = StreamReaders(
            dataset, epoch=epoch, batch_size=batch_size, process_index=process_index, num_processes=num_processes,
            collate_fn=collate_fn, resume=position,
        )  # fmt: skip
        loader = build_dataloader(
            readers,
            batch_size=None,  # the readers collate their own batches
            collate_fn=_unbatched,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            generator=sample_rng(dataset.seed, epoch, LOADER_STREAM),
        )
        batches_this_pass = 0
        for item in loader:
            if item.batch is None and item.num_skipped == 0:  # a placeholder for an item taken before the resume
                batches_this_pass += 1
                continue
            position.batches[item.reader] += 1
            position.records[item.reader] = item.records
            if item.state is not None:
                position.reader_states[item.reader] = item.state
            batches_this_pass += item.batch is not None
            yield item.batch, item.num_skipped
        if not batches_this_pass:
            raise ValueError(
                f"The streaming train_dataset yielded no batch of per_device_train_batch_size={batch_size} images in "
                f"a whole pass on process {process_index} (with {num_workers} dataloader workers, each reading its "
                "own part of the stream): it is empty, or smaller than one batch per reader."
            )
        position = StreamPosition.start(len(position.batches), epoch + 1, shards)
        on_position(position)
