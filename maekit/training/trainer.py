"""`MAETrainer`: MAE pretraining with Accelerate, one CPU to many GPUs.

The loop reads top to bottom: build the data order, `accelerator.prepare`, then for every micro-batch a forward with
reproducible masks, `accelerator.backward` under `accelerator.accumulate`, and on every optimizer step the learning
rate of the schedule, logging, evaluation and checkpoints.

Determinism. The data order, the augmentations and the masks depend only on `(seed, epoch, sample)` and
`(seed, step)`, never on the number of processes or on the process RNG: every optimizer step consumes one global batch
of `per_device_train_batch_size * num_processes * gradient_accumulation_steps` images from a per-epoch permutation,
and the mask noise of a step is drawn for the whole global batch and sliced per process. Hence a run resumed from a
checkpoint continues exactly, and 1 process with accumulation matches N processes at the same global batch.

A streaming training set (`maekit.data.MAEIterableImageDataset`) is split between the processes and data-loader workers
by `_StreamReaders`; its order depends on how many there are, and a checkpoint records each one's position in the
stream, so that a resumed run continues exactly too (with the same numbers of processes and workers).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from huggingface_hub import HfApi
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm
from transformers import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.trainer_utils import TrainOutput

from ..data import BadImageError, MAEIterableImageDataset, SeededRandomSampler, sample_rng
from ..visualize import reconstruction_grid
from .arguments import MAETrainingArguments
from .model_card import write_model_card
from .optim import create_optimizer
from .schedule import cosine_lr_with_warmup

__all__ = ["MAETrainer", "NonFiniteLossError", "find_latest_checkpoint"]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
RECONSTRUCTION_NAME = "reconstruction.png"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# `sample_rng(seed, epoch, index)` streams above 2**32 are not samples (maekit.data orders epochs with 2**32).
_TRAIN_MASK_STREAM, _EVAL_MASK_STREAM, _LOADER_STREAM = 2**32 + 1, 2**32 + 2, 2**32 + 3


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite and `nonfinite_loss="error"`."""


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-{step}` folder of `output_dir` with the highest step, or None.

    A folder is complete when it holds `trainer_state.json`, which is written last, just before the folder is renamed
    from its temporary name; half-written checkpoints are therefore never returned.
    """
    folders = _complete_checkpoints(Path(output_dir))
    return str(folders[-1][1]) if folders else None


def _complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete `checkpoint-{step}` folders, by increasing step."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _check_streaming(dataset: MAEIterableImageDataset, args: MAETrainingArguments) -> None:
    import datasets

    if not isinstance(dataset.dataset, datasets.IterableDataset):
        raise TypeError(
            "A streaming train_dataset must be a MAEIterableImageDataset over a datasets.IterableDataset (e.g. from "
            f"load_image_dataset(..., streaming=True)); got one over {type(dataset.dataset).__name__}."
        )
    if args.max_steps <= 0:
        raise ValueError(
            f"max_steps must be > 0 with a streaming train_dataset, whose length (hence epochs) is unknown; got "
            f"max_steps={args.max_steps}."
        )
    if args.warmup_steps is None:
        raise ValueError(
            "warmup_steps must be set with a streaming train_dataset: warmup_epochs cannot be converted to steps when "
            "the length of an epoch is unknown."
        )
    if args.save_steps is None:
        logger.warning(
            "save_steps is not set: a streaming run (one pass of unknown length) writes its only checkpoint at the "
            "end, so a crash loses it all. Set save_steps."
        )


class _EpochBatchSampler(Sampler):
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


# Key of the (reader, records read) pair that `_StreamReaders` attaches to each sample, removed by `_StreamCollate`.
_STREAM_POSITION_KEY = "_maekit_stream_position"


class _StreamReaders(IterableDataset):
    """One pass over this process's part of a streaming `MAEIterableImageDataset`, resumable in the middle.

    The stream is split between the `num_processes * max(num_workers, 1)` readers of the run (a DataLoader worker, or
    the process itself without workers, is one reader) with `datasets.distributed.split_dataset_by_node`: by shards
    when the stream has at least as many shards as readers, else by examples (each reader reads the whole stream and
    decodes one example in `num_readers`). The sample at position `p` of reader `k`'s records is augmented with
    `sample_rng(seed, epoch, k + num_readers * p)`.

    `resume` (`{"batches": [...], "records": [...]}`, one entry per local reader) restarts the pass where an
    interrupted run stopped: reader `w` first yields `batches[w] * batch_size` placeholders (`None`), so that the
    DataLoader takes batches from its workers in the same order as the interrupted run did, then reads its first
    `records[w]` records again without decoding them, and continues. Placeholder batches are dropped by the trainer.
    """

    def __init__(self, dataset, *, epoch: int, batch_size: int, process_index: int, num_processes: int, resume: dict):
        self.dataset, self.epoch, self.batch_size = dataset, epoch, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.batches_taken, self.records_read = list(resume["batches"]), list(resume["records"])  # a snapshot

    def __iter__(self) -> Iterator[dict | None]:
        from datasets.distributed import split_dataset_by_node

        worker = torch.utils.data.get_worker_info()
        local, num_local = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, num_readers = self.process_index * num_local + local, self.num_processes * num_local
        stream = self.dataset.dataset
        strategy = "shards" if stream.num_shards >= num_readers else "examples"
        part = split_dataset_by_node(stream, rank=reader, world_size=num_readers, strategy=strategy)
        part.set_epoch(self.epoch)  # the shuffle of this pass (a split does not inherit the stream's epoch)
        skip_records = self.records_read[local]
        for _ in range(self.batches_taken[local] * self.batch_size):
            yield None
        seed, pending_skips = self.dataset.seed, 0
        # `iter` rather than `__iter__`: datasets would split the part again between DataLoader workers.
        for position, columns in enumerate(part.iter(batch_size=1)):
            if position < skip_records:
                continue
            record = {name: values[0] for name, values in columns.items()}
            index = reader + num_readers * position
            try:
                sample = self.dataset.load_record(record, sample_rng(seed, self.epoch, index), f"stream item {index}")
            except BadImageError as err:
                if not self.dataset.skip_bad_images:
                    raise
                logger.warning("Skipping bad image (%s).", err)
                pending_skips += 1
                continue
            sample["num_skipped"], pending_skips = pending_skips, 0
            sample[_STREAM_POSITION_KEY] = (local, position + 1)
            yield sample


class _StreamCollate:
    """Collate streamed samples into `(batch, local reader, records it has read)`; a placeholder batch into None."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, samples: list[dict | None]) -> tuple[dict, int, int] | None:
        if samples[0] is None:
            return None
        positions = [sample.pop(_STREAM_POSITION_KEY) for sample in samples]
        return self.collate(samples), *positions[-1]


class MAETrainer:
    """Pretrains a `MAEForPreTraining` with the official recipe through `accelerate`.

    Run it as a script with `python` (one process) or `accelerate launch` (DDP, FSDP, DeepSpeed; see
    docs/distributed.md). Datasets return dicts with `"pixel_values"` (and optionally `"num_skipped"`, the number of
    unreadable files replaced); `maekit.data.MAEImageDataset` does.

    Args:
        model (`MAEForPreTraining`): the model to pretrain.
        args (`MAETrainingArguments`): the training arguments.
        train_dataset (`torch.utils.data.Dataset` or `maekit.data.MAEIterableImageDataset`): map-style training
            dataset (a `set_epoch(epoch)` method, if any, is called so augmentations can depend on the epoch), or a
            stream: a `MAEIterableImageDataset` over a `datasets.IterableDataset`, for data larger than the disk
            (needs `max_steps` and `warmup_steps`; see "Streaming" in docs/pretraining.md).
        eval_dataset (`torch.utils.data.Dataset`, *optional*): images for the evaluation loss and the reconstruction
            grid (with fixed masks).
        image_processor (`MAEImageProcessor`, *optional*): saved next to the model; its `image_mean`/`image_std`
            de-normalize the reconstructions (ImageNet statistics otherwise).
        data_collator (`Callable`, *optional*): turns a list of items into a batch; defaults to
            `maekit.data.collate_fn`.
        dataset_name (`str`, *optional*): the dataset's Hub id or name, recorded in the model card.
        monitor (`Callable`, *optional*): an online evaluation such as `maekit.training.KNNMonitor`: called as
            `monitor(trainer, step)` after optimizer step `step` when `step % monitor.every_n_steps == 0` and at the
            end; the metrics it returns are logged to the trackers and shown on the progress bar.

    Example:

    ```python
    import tempfile

    import torch
    from maekit import MAEConfig, MAEForPreTraining, MAETrainer, MAETrainingArguments

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=32, patch_size=8)
    images = [{"pixel_values": torch.randn(3, 32, 32)} for _ in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        args = MAETrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=4, warmup_steps=1,
                                    report_to="none", disable_tqdm=True)
        result = MAETrainer(MAEForPreTraining(config), args, images, eval_dataset=images[:4]).train()
        reloaded = MAEForPreTraining.from_pretrained(tmp)
    assert result.global_step == 4
    ```
    """

    task_name = "pretraining"  # progress-bar label and default tracker run name `mae-{task_name}`

    def __init__(
        self,
        model: torch.nn.Module,
        args: MAETrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        image_processor: BaseImageProcessor | None = None,
        data_collator: Callable | None = None,
        dataset_name: str | None = None,
        monitor: Callable[[MAETrainer, int], dict[str, float]] | None = None,
    ):
        if not isinstance(args, MAETrainingArguments):
            raise TypeError(f"args must be a MAETrainingArguments, got {type(args).__name__}.")
        self._streaming = isinstance(train_dataset, MAEIterableImageDataset)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if name == "train_dataset" and self._streaming:
                _check_streaming(train_dataset, args)
            elif isinstance(dataset, IterableDataset) or (dataset is not None and not hasattr(dataset, "__len__")):
                streams = " or a maekit.data.MAEIterableImageDataset" if name == "train_dataset" else ""
                raise TypeError(
                    f"{name} must be a map-style dataset (with __len__ and __getitem__){streams} so that the data "
                    f"order can be resumed exactly; got {type(dataset).__name__}."
                )
        if data_collator is None:
            from ..data import collate_fn as data_collator
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.image_processor = image_processor
        self.data_collator = data_collator
        self.dataset_name = dataset_name
        self.monitor = monitor
        self._monitor_postfix: dict[str, str] = {}
        self.output_dir = Path(args.output_dir)

        trackers = args.resolved_report_to()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,  # None: as `accelerate launch` / its config says
            dynamo_backend="inductor" if args.torch_compile else None,  # None: as `accelerate launch` says
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=args.logging_dir or str(self.output_dir / "runs")
            ),
        )
        self.trackers = trackers
        set_seed(args.seed)
        self.state: dict = {"global_step": 0, "num_skipped_images": 0, "num_nonfinite_steps": 0, "log_history": []}
        # A stream's data position on this process: the pass (epoch), and per reader (DataLoader worker) the batches
        # the training loop took from it and the records it had read for them; saved in checkpoints.
        readers = max(args.dataloader_num_workers, 1)
        self._stream_position = {"epoch": 0, "batches": [0] * readers, "records": [0] * readers}
        self.optimizer = None
        self._wrapped_model = None  # set by `train` (DDP / FSDP / DeepSpeed wrapper from accelerator.prepare)
        mean = getattr(image_processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN
        std = getattr(image_processor, "image_std", None) or IMAGENET_DEFAULT_STD
        self._image_mean, self._image_std = tuple(mean), tuple(std)

    # ------------------------------------------------------------------------------------------------------------------
    # Sizes and schedule

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes and accumulation steps."""
        return self.args.global_batch_size(self.accelerator.num_processes)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last incomplete global batch of an epoch is dropped).

        A stream has no known length: its schedule and the default evaluation and save points count the whole run
        (`max_steps`) as one epoch, while the stream itself starts a new pass whenever it runs out.
        """
        if self._streaming:
            return self.args.max_steps
        steps = len(self.train_dataset) // self.global_batch_size
        if steps == 0:
            raise ValueError(
                f"The training set ({len(self.train_dataset)} images) is smaller than one global batch "
                f"({self.global_batch_size} = per_device_train_batch_size {self.args.per_device_train_batch_size} × "
                f"{self.accelerator.num_processes} processes × gradient_accumulation_steps "
                f"{self.args.gradient_accumulation_steps}); lower the batch size."
            )
        return steps

    @property
    def learning_rate(self) -> float:
        """Peak learning rate: `learning_rate`, or `base_learning_rate * global batch / 256`."""
        return self.args.resolved_learning_rate(self.accelerator.num_processes)

    def _epoch_at(self, step: int) -> float:
        """Epochs done after `step` optimizer steps; for a stream, the number of completed passes over it."""
        return self._stream_position["epoch"] if self._streaming else step / self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step `step` (0-based)."""
        spe = self.steps_per_epoch
        return cosine_lr_with_warmup(
            step,
            learning_rate=self.learning_rate,
            total_steps=self.args.total_steps(spe),
            warmup_steps=self.args.resolved_warmup_steps(spe),
            min_lr=self.args.min_lr,
        )

    def create_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the weight-decay groups of the official pretraining recipe (no decay on biases and norms)."""
        args = self.args
        return create_optimizer(
            self.model,
            learning_rate=self.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Training

    def train(self) -> TrainOutput:
        """Pretrain, evaluate and checkpoint as the arguments say; finally save the model and its card.

        Returns:
            `transformers.trainer_utils.TrainOutput`: `global_step`, `training_loss` (mean over this call's steps)
            and `metrics` (last train / eval losses, runtime).
        """
        args, accelerator = self.args, self.accelerator
        spe, total_steps = self.steps_per_epoch, self.args.total_steps(self.steps_per_epoch)
        if total_steps > 1 and (warmup := args.resolved_warmup_steps(spe)) >= total_steps:
            logger.warning(
                f"The warmup ({warmup} steps from warmup_steps={args.warmup_steps}, "
                f"warmup_epochs={args.warmup_epochs}) covers the whole run of {total_steps} steps: the learning rate "
                "only rises. Set warmup_steps (or warmup_epochs) below the run length."
            )
        self._configure_deepspeed()
        self.optimizer = self.create_optimizer()
        if args.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        model, optimizer = accelerator.prepare(self.model, self.optimizer)
        self._wrapped_model = model
        # Per-process random streams (drop path, mixup in the collator), as the official `seed + rank`; the data
        # order, augmentations and masks do not use them. A resumed run restores them from the checkpoint.
        set_seed(args.seed, device_specific=True)
        if args.resume_from_checkpoint:
            self._load_checkpoint(args.resume_from_checkpoint)
        self._claim_output_dir()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.trackers:
            accelerator.init_trackers(args.run_name or f"mae-{self.task_name}", config=self._tracker_config())

        start_step = step = self.state["global_step"]
        self._progress = progress = tqdm(
            total=total_steps,
            initial=start_step,
            desc=self.task_name,
            disable=args.disable_tqdm or not accelerator.is_local_main_process,
        )
        if args.eval_on_start and start_step == 0:
            self._evaluate_and_visualize(0)
        self._window = {"losses": [], "start": time.perf_counter(), "skipped": torch.zeros((), dtype=torch.long)}
        session_losses, start_time = [], time.perf_counter()
        while step < total_steps:
            epoch = step // spe
            for loss in self._train_steps(
                model, optimizer, epoch, step - epoch * spe, min(spe, total_steps - epoch * spe)
            ):
                step += 1
                self.state["global_step"] = step
                progress.update(1)
                if loss is not None:
                    session_losses.append(loss)
                self._maybe_log_evaluate_save(step, total_steps)
                model.train()
        progress.close()

        self._save_final_model()
        if self.trackers:
            accelerator.end_training()
        training_loss = sum(session_losses) / len(session_losses) if session_losses else float("nan")
        metrics = {
            "train_runtime": time.perf_counter() - start_time,
            "train_loss": training_loss,
            "epoch": self._epoch_at(step),
        }
        return TrainOutput(step, training_loss, {**metrics, **self._last_metrics()})

    def _train_steps(self, model, optimizer, epoch: int, first: int, last: int) -> Iterator[float | None]:
        """Run optimizer steps `[first, last)` of `epoch`; yield each step's loss (None for a skipped step)."""
        args, accelerator = self.args, self.accelerator
        num_processes, micro_batch, accumulation = (
            accelerator.num_processes,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
        )
        if self._streaming:
            loader = self._stream_batches()  # endless: passes follow each other
        else:
            if hasattr(self.train_dataset, "set_epoch"):
                self.train_dataset.set_epoch(epoch)
            sampler = _EpochBatchSampler(
                len(self.train_dataset), seed=args.seed, epoch=epoch, first=first, last=last, batch_size=micro_batch,
                num_processes=num_processes, process_index=accelerator.process_index, accumulation=accumulation,
            )  # fmt: skip
            # A fresh loader per epoch: its workers copy the dataset after `set_epoch`, so augmentations follow it.
            loader = DataLoader(
                self.train_dataset,
                batch_sampler=sampler,
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
                # Its own generator (worker seeds): a loader must not draw from the process RNG, which drop path
                # uses and checkpoints restore, or a resumed run would see different random numbers.
                generator=sample_rng(args.seed, epoch, _LOADER_STREAM),
            )
        num_patches = accelerator.unwrap_model(model).config.num_patches
        step, micro, step_loss = self.steps_per_epoch * epoch + first, 0, 0.0
        model.train()
        for batch in loader:
            if micro == 0:
                # Mask noise (G, L) for the whole global batch of this step; each process takes its slices.
                noise = torch.rand(
                    self.global_batch_size, num_patches, generator=sample_rng(args.seed, step, _TRAIN_MASK_STREAM)
                )
                # Set before the forward: DeepSpeed steps its optimizer inside `accelerator.backward`.
                for group in optimizer.param_groups:  # lr_scale: layer-wise decay groups, when present
                    group["lr"] = self.lr_at(step) * group.get("lr_scale", 1.0)
            offset = (micro * num_processes + accelerator.process_index) * micro_batch
            if "num_skipped" in batch:
                self._window["skipped"] += torch.as_tensor(batch["num_skipped"]).sum().cpu()
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = self.compute_loss(model, batch, noise[offset : offset + micro_batch].to(accelerator.device))
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach().float()
                micro += 1
                if micro == accumulation:
                    mean_loss = self._optimizer_step(model, optimizer, step, step_loss / accumulation)
            if micro == accumulation:
                micro, step_loss = 0, 0.0
                step += 1
                yield mean_loss
                if step == last:  # a stream does not end by itself
                    return

    def _stream_batches(self) -> Iterator[dict]:
        """This process's micro-batches of a streaming train set, pass after pass, from `_stream_position` on."""
        args, accelerator = self.args, self.accelerator
        position = self._stream_position
        while True:
            epoch = position["epoch"]
            self.train_dataset.set_epoch(epoch)
            readers = _StreamReaders(
                self.train_dataset, epoch=epoch, batch_size=args.per_device_train_batch_size,
                process_index=accelerator.process_index, num_processes=accelerator.num_processes, resume=position,
            )  # fmt: skip
            loader = DataLoader(
                readers,
                batch_size=args.per_device_train_batch_size,
                collate_fn=_StreamCollate(self.data_collator),
                num_workers=args.dataloader_num_workers,
                pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
                drop_last=True,  # per reader: its last incomplete batch of a pass
                generator=sample_rng(args.seed, epoch, _LOADER_STREAM),
            )
            for item in loader:
                if item is None:  # a placeholder for a batch taken before the resume
                    continue
                batch, reader, records = item
                position["batches"][reader] += 1
                position["records"][reader] = records
                yield batch
            if not any(position["batches"]):
                raise ValueError(
                    f"The streaming train_dataset yielded no batch of per_device_train_batch_size="
                    f"{args.per_device_train_batch_size} images in a whole pass on process {accelerator.process_index}"
                    f" (with {args.dataloader_num_workers} dataloader workers, each reading its own part of the "
                    "stream); lower the batch size or the number of workers."
                )
            readers_count = len(position["batches"])
            position = {"epoch": epoch + 1, "batches": [0] * readers_count, "records": [0] * readers_count}
            self._stream_position = position

    def compute_loss(self, model: torch.nn.Module, batch: dict, noise: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch: the reconstruction loss under this micro-batch's mask `noise` (B, L)."""
        pixel_values = batch["pixel_values"].to(self.accelerator.device, non_blocking=True)
        return model(pixel_values=pixel_values, noise=noise).loss

    def _optimizer_step(self, model, optimizer, step: int, loss: torch.Tensor) -> float | None:
        """Check the loss, clip and step. Returns the step's mean loss, None if skipped."""
        args, accelerator = self.args, self.accelerator
        if not accelerator.sync_gradients:
            raise RuntimeError("Accelerate's gradient accumulation counter is out of step with the trainer's.")
        # One scalar all-reduce per step, as the official loop: all processes see the same loss and stop together.
        mean_loss = accelerator.reduce(loss, reduction="mean").item()
        if not math.isfinite(mean_loss):
            self._on_nonfinite_loss(mean_loss, step)
            optimizer.zero_grad(set_to_none=True)
            return None
        if args.max_grad_norm is not None or (step + 1) % args.logging_steps == 0:
            # With max_grad_norm=None the norm is only measured (a factor of 1 is applied) for the log.
            self._grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._window["losses"].append(mean_loss)
        return mean_loss

    def _maybe_log_evaluate_save(self, step: int, total_steps: int) -> None:
        args, spe = self.args, self.steps_per_epoch
        last, end_of_epoch = step == total_steps, step % spe == 0
        if step % args.logging_steps == 0 or last:
            window = self._window
            self._flush_skipped()
            elapsed = time.perf_counter() - window["start"]
            metrics = {
                "loss": sum(window["losses"]) / len(window["losses"]) if window["losses"] else float("nan"),
                "learning_rate": self.lr_at(step - 1),
                "epoch": self._epoch_at(step),
                "images_per_second": len(window["losses"]) * self.global_batch_size / max(elapsed, 1e-9),
                "num_skipped_images": self.state["num_skipped_images"],
                "num_nonfinite_steps": self.state["num_nonfinite_steps"],
            }
            grad_norm = getattr(self, "_grad_norm", None)
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
                self._grad_norm = None  # never report a stale norm at a later log
            self._log(metrics, step)
            self._progress.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['learning_rate']:.2e}",
                img_s=f"{metrics['images_per_second']:.1f}",
                **self._monitor_postfix,
            )
            self._window = {"losses": [], "start": time.perf_counter(), "skipped": torch.zeros((), dtype=torch.long)}
        if self.monitor is not None and (last or step % self.monitor.every_n_steps == 0):
            monitored = self.monitor(self, step)
            self._log(monitored, step)
            self._monitor_postfix = {key: f"{value:.4g}" for key, value in monitored.items()}
            self._progress.set_postfix(**self._monitor_postfix, refresh=False)
        if last or (args.eval_steps and step % args.eval_steps == 0) or (not args.eval_steps and end_of_epoch):
            self._evaluate_and_visualize(step)
        if last or (args.save_steps and step % args.save_steps == 0) or (not args.save_steps and end_of_epoch):
            self._flush_skipped()  # the checkpoint's count includes images skipped since the last log
            self._save_checkpoint()

    def _flush_skipped(self) -> None:
        """Add the images skipped (on every process) since the last flush to `state["num_skipped_images"]`."""
        skipped = self._window["skipped"].to(self.accelerator.device)
        self.state["num_skipped_images"] += int(self.accelerator.reduce(skipped, reduction="sum").item())
        self._window["skipped"] = torch.zeros((), dtype=torch.long)

    def _on_nonfinite_loss(self, value: float, step: int) -> None:
        self.state["num_nonfinite_steps"] += 1
        if self.args.nonfinite_loss == "skip":
            return
        latest = find_latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint {latest} is intact" if latest else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"Non-finite training loss ({value}) at step {step + 1} (epoch {step // self.steps_per_epoch}); {kept}. "
            "Lower the learning rate, enable max_grad_norm or use mixed_precision='bf16', or set "
            "nonfinite_loss='skip' to drop such steps."
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation and reconstructions

    def evaluate(self) -> dict[str, float]:
        """Mean reconstruction loss over `eval_dataset` with fixed masks, gathered over all processes.

        Every process evaluates the same number of batches (its shard is padded with weight-0 repeats), so the result
        does not depend on the number of processes.
        """
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        accelerator = self.accelerator
        model = self._model_for_inference()
        unwrapped = accelerator.unwrap_model(model)
        num_eval, num_processes = len(self.eval_dataset), accelerator.num_processes
        per_process = math.ceil(num_eval / num_processes)
        indices = [accelerator.process_index + i * num_processes for i in range(per_process)]
        weights = torch.tensor([float(i < num_eval) for i in indices], device=accelerator.device)
        indices = [i % num_eval for i in indices]
        loader = DataLoader(
            self.eval_dataset,
            batch_size=self.args.per_device_eval_batch_size,
            sampler=indices,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            generator=sample_rng(self.args.seed, _EVAL_MASK_STREAM, _LOADER_STREAM),
        )
        total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        seen = 0
        model.eval()
        with torch.no_grad():
            for batch in loader:
                pixel_values = batch["pixel_values"].to(accelerator.device)
                size = pixel_values.shape[0]
                noise = self._eval_noise(indices[seen : seen + size], unwrapped.config.num_patches)
                with accelerator.autocast():
                    out = model(pixel_values=pixel_values, noise=noise.to(accelerator.device))
                # Per-image losses from the model's own loss function, so padding can be weighted out.
                per_image = unwrapped.forward_loss(pixel_values, out.logits, out.mask, reduction="none")
                total += (per_image.double() * weights[seen : seen + size]).sum()
                seen += size
        total = accelerator.reduce(total, reduction="sum")
        return {"eval_loss": float(total.item() / num_eval)}

    def _model_for_inference(self) -> torch.nn.Module:
        # Before `train` the model is not wrapped; preparing it alone here would wrap it twice later.
        return self._wrapped_model if self._wrapped_model is not None else self.model.to(self.accelerator.device)

    def _eval_noise(self, indices: list[int], num_patches: int) -> torch.Tensor:
        return torch.stack(
            [torch.rand(num_patches, generator=sample_rng(self.args.seed, _EVAL_MASK_STREAM, i)) for i in indices]
        )

    def _evaluate_and_visualize(self, step: int) -> None:
        if self.eval_dataset is not None:
            self._log(self.evaluate(), step)
        if self.args.num_reconstruction_images > 0:
            self.save_reconstructions(step)

    def save_reconstructions(self, step: int) -> Path | None:
        """Reconstruct the fixed first images of the eval set (train set if none) with fixed masks; save the grid
        as `output_dir/reconstructions/step-{step}.png` and `output_dir/reconstruction.png`, and send it to the
        trackers. Returns the path on the main process."""
        accelerator = self.accelerator
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if isinstance(dataset, IterableDataset):  # a stream and no eval set: no fixed images to show
            return None
        count = min(self.args.num_reconstruction_images, len(dataset))
        batch = self.data_collator([dataset[i] for i in range(count)])
        pixel_values = batch["pixel_values"].to(accelerator.device)
        model = self._model_for_inference()
        unwrapped = accelerator.unwrap_model(model)
        model.eval()
        with torch.no_grad(), accelerator.autocast():  # every process runs it: FSDP needs all ranks in a forward
            out = model(
                pixel_values=pixel_values,
                noise=self._eval_noise(list(range(count)), unwrapped.config.num_patches).to(accelerator.device),
            )
        if not accelerator.is_main_process:
            return None
        grid = reconstruction_grid(
            pixel_values,
            out.logits,
            out.mask,
            unwrapped.config,
            image_mean=self._image_mean,
            image_std=self._image_std,
        )
        folder = self.output_dir / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step}.png"
        grid.save(path)
        grid.save(self.output_dir / RECONSTRUCTION_NAME)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"reconstructions": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"reconstructions": [grid]}, step=step)
        return path

    # ------------------------------------------------------------------------------------------------------------------
    # Logging

    def _log(self, metrics: dict[str, float], step: int) -> None:
        self.state["log_history"].append({**metrics, "step": step})
        if self.trackers:
            self.accelerator.log(metrics, step=step)

    def _last_metrics(self) -> dict[str, float]:
        last = {}
        for entry in self.state["log_history"]:
            for key in ("loss", "eval_loss"):
                if key in entry:
                    last[key] = entry[key]
        return last

    def _tracker_config(self) -> dict:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.args.to_dict().items()}
        config.update(
            global_batch_size=self.global_batch_size,
            peak_learning_rate=self.learning_rate,
            num_processes=self.accelerator.num_processes,
        )
        return config

    def _configure_deepspeed(self) -> None:
        # DeepSpeed needs the micro-batch size; Accelerate infers it only from prepared data loaders.
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        config = plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = self.args.per_device_train_batch_size
        if config.get("train_batch_size", "auto") == "auto":
            config["train_batch_size"] = self.global_batch_size
        # Clipping is DeepSpeed's own: follow max_grad_norm (off by default, as official) unless the config sets it.
        if config.get("gradient_clipping", "auto") == "auto":
            config["gradient_clipping"] = self.args.max_grad_norm or 0.0
        accumulation = config.get("gradient_accumulation_steps", "auto")
        if accumulation != "auto" and accumulation != self.args.gradient_accumulation_steps:
            raise ValueError(
                f"The DeepSpeed config has gradient_accumulation_steps={accumulation} but the trainer was given "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}; make them equal (or 'auto')."
            )

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _save_checkpoint(self) -> None:
        """Write `checkpoint-{step}` atomically: save into a temporary folder, then rename it."""
        accelerator, step = self.accelerator, self.state["global_step"]
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        # Every process's stream position (a collective call, hence on all processes).
        stream_positions = gather_object([self._stream_position]) if self._streaming else None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                **self.state,
                "epoch": step / self.steps_per_epoch,
                "epoch_index": step // self.steps_per_epoch,  # data position: this epoch's order ...
                "step_in_epoch": step % self.steps_per_epoch,  # ... after this many global batches of it
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size,
                "num_processes": accelerator.num_processes,
                "learning_rate": self.learning_rate,
            }
            if stream_positions is not None:
                state["stream_positions"] = stream_positions
            (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2))
            if final.exists():  # re-running into the same folder: swap the old copy out before the rename
                old = self.output_dir / f".old-checkpoint-{step}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            self._prune_checkpoints()
        accelerator.wait_for_everyone()
        if self.args.push_to_hub and self.args.hub_strategy == "every_save":
            self._save_final_model(commit_message=f"Training in progress, step {step}")

    def _claim_output_dir(self) -> None:
        """Refuse to run where checkpoints of another run (or of a later point of this one) would be pruned,
        overwritten or picked as "latest" — unless `overwrite_output_dir`, which deletes them."""
        step = self.state["global_step"]
        later = [path for saved, path in _complete_checkpoints(self.output_dir) if saved > step]
        if not later:
            return
        names = ", ".join(p.name for p in later)
        if not self.args.overwrite_output_dir:
            what = f"resumed at step {step}" if step else "started from scratch"
            raise ValueError(
                f"output_dir {str(self.output_dir)!r} already holds {names}, which this run ({what}) did not write. "
                "Pass resume_from_checkpoint='latest' to continue from there, another output_dir, or "
                "overwrite_output_dir=True to delete them and start over."
            )
        if self.accelerator.is_main_process:
            logger.warning(f"overwrite_output_dir: deleting {names} in {self.output_dir}.")
            for path in later:
                shutil.rmtree(path)
        self.accelerator.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for _, path in _complete_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(path)

    def _load_checkpoint(self, checkpoint: str) -> None:
        if checkpoint == "latest":
            path = find_latest_checkpoint(self.output_dir)
            if path is None:
                # Nothing saved yet: start from scratch (so a restarted job can always pass "latest").
                return
        else:
            path = checkpoint
            if not (Path(path) / TRAINER_STATE_NAME).is_file():
                raise ValueError(
                    f"resume_from_checkpoint={checkpoint!r} is not a complete checkpoint folder (no {TRAINER_STATE_NAME}); "
                    "pass a checkpoint-{step} folder or 'latest'."
                )
        state = json.loads((Path(path) / TRAINER_STATE_NAME).read_text())
        if state["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"Checkpoint {path} was trained with a global batch of {state['global_batch_size']} images, this run has "
                f"{self.global_batch_size}; keep per_device_train_batch_size × processes × gradient_accumulation_steps "
                "equal to resume (the data order and schedule depend on it)."
            )
        if self._streaming:
            self._stream_position = self._saved_stream_position(state, path)
        self.accelerator.load_state(path)
        self.state = {
            key: state[key] for key in ("global_step", "num_skipped_images", "num_nonfinite_steps", "log_history")
        }

    def _saved_stream_position(self, state: dict, path: str) -> dict:
        """This process's stream position in a checkpoint's state, if the run is split the same way."""
        positions = state.get("stream_positions")
        num_processes, readers = self.accelerator.num_processes, len(self._stream_position["batches"])
        if positions is None:
            raise ValueError(f"Checkpoint {path} is not from a streaming run: it holds no stream position.")
        if len(positions) != num_processes or len(positions[0]["batches"]) != readers:
            raise ValueError(
                f"Checkpoint {path} was saved by {len(positions)} process(es) reading the stream with "
                f"{len(positions[0]['batches'])} reader(s) each, this run has {num_processes} process(es) with "
                f"{readers} (max(dataloader_num_workers, 1)); a streamed run resumes with the same split of the stream."
            )
        return positions[self.accelerator.process_index]

    # ------------------------------------------------------------------------------------------------------------------
    # Final model, card, Hub

    def _save_model(self, folder: Path) -> None:
        """`save_pretrained` the (gathered) model and the image processor into `folder`."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        model = self._model_for_inference()
        # torch.compile (torch_compile=True) prefixes parameter names with `_orig_mod.`; the saved model must not.
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(model).items()}
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            with self._exported_state_dict(unwrapped, state_dict) as exported:
                unwrapped.save_pretrained(folder, state_dict=exported)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(folder)
        accelerator.wait_for_everyone()

    @contextmanager
    def _exported_state_dict(self, model: torch.nn.Module, state_dict: dict) -> Iterator[dict]:
        """The state dict `save_pretrained` writes; subclasses may present the model differently while saving."""
        yield state_dict

    def _save_final_model(self, commit_message: str = "End of training") -> None:
        self._save_model(self.output_dir)
        if self.accelerator.is_main_process:
            self.create_model_card()
            if self.args.push_to_hub:
                self.push_to_hub(commit_message)
        self.accelerator.wait_for_everyone()  # no process leaves (or exits) while the main one is still writing

    def create_model_card(self) -> Path:
        """Write `output_dir/README.md`: metadata, hyper-parameters, final losses and the reconstruction grid."""
        spe = self.steps_per_epoch
        hyperparameters = {
            "learning_rate": self.learning_rate,
            "base_learning_rate": None if self.args.learning_rate is not None else self.args.base_learning_rate,
            "global_batch_size": self.global_batch_size,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "num_processes": self.accelerator.num_processes,
            "total_steps": self.args.total_steps(spe),
            "warmup_steps": self.args.resolved_warmup_steps(spe),
            "epochs": None if self._streaming else self.args.total_steps(spe) / spe,
            "min_lr": self.args.min_lr,
            "weight_decay": self.args.weight_decay,
            "optimizer": f"AdamW (betas=({self.args.adam_beta1}, {self.args.adam_beta2}), eps={self.args.adam_epsilon})",
            "lr_schedule": "linear warmup + half-cycle cosine",
            "max_grad_norm": self.args.max_grad_norm,
            "mixed_precision": self.accelerator.mixed_precision,
            "seed": self.args.seed,
        }
        config = self.model.config
        image = RECONSTRUCTION_NAME if (self.output_dir / RECONSTRUCTION_NAME).is_file() else None
        return write_model_card(
            self.output_dir / "README.md",
            config=config,
            hyperparameters={k: v for k, v in hyperparameters.items() if v is not None},
            results={"global_step": self.state["global_step"], **self._last_metrics()},
            dataset_name=self.dataset_name,
            model_name=self.args.hub_model_id or self.output_dir.name,
            reconstruction_image=image,
        )

    def push_to_hub(self, commit_message: str = "End of training") -> str:
        """Upload `output_dir` (model, image processor, card, reconstructions; not checkpoints) to the Hub."""
        api = HfApi(token=self.args.hub_token)
        repo_id = self.args.hub_model_id or self.output_dir.resolve().name
        repo_id = api.create_repo(repo_id, private=self.args.hub_private_repo, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(self.output_dir),
            commit_message=commit_message,
            ignore_patterns=["checkpoint-*", ".tmp-checkpoint-*", ".old-checkpoint-*"],
        )
        return repo_id
