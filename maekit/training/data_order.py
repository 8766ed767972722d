"""Data order: which images every process reads at every step, for map-style data sets and for streams.

Map-style: every optimizer step consumes one global batch of `per_device_train_batch_size * num_processes *
gradient_accumulation_steps` images from a per-epoch permutation that depends on `(seed, epoch)` only
(`EpochBatchSampler`), so a resumed run, or a run on another number of processes, reads the same images at the same
step.

Streams: a `maekit.data.MAEIterableImageDataset` is split between the `num_processes * max(num_workers, 1)` readers of
the run (`StreamReaders`); each reader batches its own records, and `StreamPosition` records, per reader, the
batches the loop took from it and the records it had read for them, so that a resumed run continues exactly (with the
same numbers of processes and workers).

Every loader is built by `maekit.data.build_dataloader`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, Sampler

from ..data import BadImageError, MAEIterableImageDataset, SeededRandomSampler, build_dataloader, sample_rng

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
    itself without workers) the batches the loop took from it and the records it had read for them."""

    epoch: int = 0
    batches: list[int] = field(default_factory=lambda: [0])
    records: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def start(cls, num_readers: int, epoch: int = 0) -> StreamPosition:
        """The start of pass `epoch` for `num_readers` readers."""
        return cls(epoch, [0] * num_readers, [0] * num_readers)

    @classmethod
    def from_record(cls, record: dict, path, accelerator, num_readers: int) -> StreamPosition:
        """This process's position in a checkpoint's record, if the run splits the stream the same way."""
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
        return cls(**positions[accelerator.process_index])


class StreamBatch(NamedTuple):
    """What a stream reader yields: a collated batch (None for a resume placeholder, or for the end of a pass that
    only reports skipped images), the local reader, the records it has read so far and the bad images it skipped
    since its previous item."""

    batch: dict[str, Any] | None
    reader: int
    records: int
    num_skipped: int


class StreamReaders(IterableDataset):
    """One pass over this process's part of a streaming `MAEIterableImageDataset`, in batches, resumable mid-pass.

    The stream is split between the `num_processes * max(num_workers, 1)` readers of the run with
    `datasets.distributed.split_dataset_by_node`: by shards when the stream has at least as many shards as readers,
    else by examples (each reader reads the whole stream and decodes one example in `num_readers`). The sample at
    position `p` of reader `k`'s records is augmented with `sample_rng(seed, epoch, k + num_readers * p)`.

    Each reader collates its own batches of `batch_size` images; the images of an incomplete last batch are dropped,
    but the bad images it skipped are still reported (a final item without a batch). `resume` restarts the pass
    where an interrupted run stopped: reader `w` first yields `resume.batches[w]` placeholders, so that the DataLoader
    takes items from its workers in the same order as the interrupted run did, then reads its first
    `resume.records[w]` records again without decoding them, and continues.
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
        self.batches_taken, self.records_read = list(resume.batches), list(resume.records)  # a snapshot

    def __iter__(self) -> Iterator[StreamBatch]:
        from datasets.distributed import split_dataset_by_node

        worker = torch.utils.data.get_worker_info()
        local, num_local = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, num_readers = self.process_index * num_local + local, self.num_processes * num_local
        stream = self.dataset.dataset
        strategy = "shards" if stream.num_shards >= num_readers else "examples"
        part = split_dataset_by_node(stream, rank=reader, world_size=num_readers, strategy=strategy)
        part.set_epoch(self.epoch)  # the shuffle of this pass (a split does not inherit the stream's epoch)
        skip_records = self.records_read[local]
        for _ in range(self.batches_taken[local]):
            yield StreamBatch(None, local, skip_records, 0)
        seed, samples, skipped, position = self.dataset.seed, [], 0, skip_records
        # `iter` rather than `__iter__`: datasets would split the part again between DataLoader workers.
        for position, columns in enumerate(part.iter(batch_size=1), start=1):
            if position <= skip_records:
                continue
            record = {name: values[0] for name, values in columns.items()}
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
                yield StreamBatch(self.collate_fn(samples), local, position, skipped)
                samples, skipped = [], 0
        if skipped:  # bad images among the dropped incomplete batch, or after the last complete one
            yield StreamBatch(None, local, position, skipped)


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
            batches_this_pass += item.batch is not None
            yield item.batch, item.num_skipped
        if not batches_this_pass:
            raise ValueError(
                f"The streaming train_dataset yielded no batch of per_device_train_batch_size={batch_size} images in "
                f"a whole pass on process {process_index} (with {num_workers} dataloader workers, each reading its "
                "own part of the stream): it is empty, or smaller than one batch per reader."
            )
        position = StreamPosition.start(len(position.batches), epoch + 1)
        on_position(position)
