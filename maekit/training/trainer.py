"""`Trainer`: one training loop with Accelerate, one CPU to many GPUs, for any `Task`.

The loop reads top to bottom: build the data order, `accelerator.prepare`, then for every micro-batch the task's loss,
`accelerator.backward` under `accelerator.accumulate`, and on every optimizer step the learning rate of the schedule,
a check that the loss and the gradient norm are finite, logging, evaluation and checkpoints. What the loss is, what
evaluation means and what is saved besides the model are the task's (`maekit.training.task.Task`); checkpoints are
`checkpointing.py`'s, the data order `data_order.py`'s, the model card and the Hub `hub.py`'s.

Determinism. The data order, the augmentations and the task's randomness (e.g. pretraining masks) depend only on
`(seed, epoch, sample)` and `(seed, step)`, never on the number of processes or on the process RNG: every optimizer
step consumes one global batch of `per_device_train_batch_size * num_processes * gradient_accumulation_steps` images
from a per-epoch permutation. Hence a run resumed from a checkpoint continues exactly, and 1 process with
accumulation matches N processes at the same global batch. A streaming training set is split between the processes
and workers; its checkpoint records each reader's position (see `data_order.py`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed
from torch.utils.data import Dataset, IterableDataset
from transformers.trainer_utils import TrainOutput

from ..data import MAEIterableImageDataset, build_dataloader, collate_fn
from ..image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .arguments import TrainingArguments
from .checkpointing import (
    Checkpoints,
    RunSignature,
    TrainerState,
    all_finite,
    load_model_folder,
    save_model_folder,
)
from .data_order import StreamPosition, epoch_loader, stream_batches
from .hub import HubPusher, ModelCard, check_hub_access, finish_outputs, push_snapshot, write_model_card
from .nonfinite import NonFinitePolicy
from .schedule import lr_with_warmup
from .task import StepContext, Task

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class _Rollback(Exception):
    """Raised inside the loop to go back to the newest checkpoint (`nonfinite_loss="rollback"`)."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@dataclass
class _LogWindow:
    """What happened since the last log line."""

    losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    skipped: int = 0  # unreadable images, this process
    grad_norm: float | None = None  # of the last applied step


def _check_dataset(name: str, dataset: Any, streams_allowed: bool) -> None:
    if dataset is None or (streams_allowed and isinstance(dataset, MAEIterableImageDataset)):
        return
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        streams = " or a maekit.data.MAEIterableImageDataset" if streams_allowed else ""
        raise TypeError(
            f"{name} must be a map-style dataset (with __len__ and __getitem__){streams} so that the data order can be "
            f"resumed exactly; got {type(dataset).__name__}."
        )


def _check_stream(dataset: MAEIterableImageDataset, args: TrainingArguments) -> None:
    import datasets

    from ..shards import ShardedImageDataset

    source = dataset.dataset
    if not isinstance(source, (datasets.IterableDataset, ShardedImageDataset)):
        raise TypeError(
            "A streaming train_dataset must be a MAEIterableImageDataset over a datasets.IterableDataset (e.g. from "
            "load_image_dataset(..., streaming=True)) or over tar shards (a maekit.shards.ShardedImageDataset, e.g. "
            f"from load_image_dataset('shards/train-{{0000..0099}}.tar')); got one over {type(source).__name__}."
        )
    if isinstance(source, ShardedImageDataset) and source.world_size != 1:
        raise ValueError(
            f"The tar shards given to the trainer are already split (rank={source.rank}, world_size="
            f"{source.world_size}); pass all of them (rank=0, world_size=1): the trainer splits them between its "
            "processes and DataLoader workers itself."
        )
    # Tar shards are always a stream, even without --streaming: say so where it is needed.
    shards = " (tar shards are always streamed)" if isinstance(source, ShardedImageDataset) else ""
    if args.max_steps <= 0:
        raise ValueError(
            f"max_steps must be > 0 with a streaming train_dataset{shards}, whose length (hence epochs) is unknown; "
            f"got max_steps={args.max_steps}. Set max_steps (--max_steps in the example scripts)."
        )
    if args.warmup_steps is None:
        raise ValueError(
            f"warmup_steps must be set with a streaming train_dataset{shards}: warmup_epochs cannot be converted to "
            "steps when the length of an epoch is unknown. Set warmup_steps (--warmup_steps in the example scripts)."
        )
    if args.save_steps is None:
        logger.warning(
            "save_steps is not set: a streaming run (one pass of unknown length) writes its only checkpoint at the "
            "end, so a crash loses it all. Set save_steps."
        )


def configure_deepspeed(accelerator: Accelerator, args: TrainingArguments, global_batch_size: int) -> None:
    """Fill the "auto" fields of an Accelerate DeepSpeed config that only the trainer knows."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    # DeepSpeed needs the micro-batch size; Accelerate infers it only from prepared data loaders.
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = global_batch_size
    # Clipping is DeepSpeed's own: follow max_grad_norm (off by default, as official) unless the config sets it.
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = args.max_grad_norm or 0.0
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation != "auto" and accumulation != args.gradient_accumulation_steps:
        raise ValueError(
            f"The DeepSpeed config has gradient_accumulation_steps={accumulation} but the trainer was given "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}; make them equal (or 'auto')."
        )


# Setups where every process holds whole gradients (after DDP's all-reduce): their norm needs no collective.
_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def _total_norm(parameters) -> torch.Tensor:
    """The 2-norm of all gradients together, as `clip_grad_norm_` computes it, without touching them."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: one fused (foreach) pass per device and dtype
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _dataset_fingerprint(dataset: Any) -> str | None:
    """What identifies the training data from one run to the next (None for data that is not a `datasets.Dataset`).

    Images stored as files (an image folder): a hash of their names relative to the folder that holds them all, in
    order, so that a copy of the data elsewhere (e.g. to a node's local disk) or touched files are the same data
    (`datasets`' own fingerprint depends on the paths and modification times). Otherwise `datasets`' fingerprint,
    a hash of the content for data in memory.
    """
    data = getattr(dataset, "dataset", dataset)
    fingerprint = getattr(data, "_fingerprint", None)
    column = getattr(getattr(dataset, "load_record", None), "image_column", None)
    if fingerprint is None or column is None or column not in getattr(data, "column_names", ()):
        return fingerprint
    import pyarrow.compute as pc

    try:
        images = data.with_format("arrow")[column]  # {bytes, path} structs of the (selected) rows, in order
        paths, stored = pc.struct_field(images, "path"), pc.struct_field(images, "bytes")
    except (TypeError, KeyError, ValueError, IndexError):  # not undecoded image records
        return fingerprint
    if len(paths) == 0 or stored.null_count != len(stored) or paths.null_count:
        return fingerprint  # images held as bytes: the content fingerprint is the right one
    names = paths.to_pylist()
    root = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
    relative = "\n".join(os.path.relpath(name, root) for name in names)
    return "files:" + hashlib.sha256(relative.encode()).hexdigest()[:16]


class Trainer:
    """Trains `model` on `task`'s objective with Accelerate (`MAETrainer` and `ClassificationTrainer` are this class
    with their task).

    Args:
        model (`torch.nn.Module`): the model (a maekit `PreTrainedModel`).
        args (`TrainingArguments`): the arguments (the task's own subclass).
        task (`Task`): the objective.
        train_dataset: map-style dataset of dicts with `"pixel_values"` (and what the task needs), or a
            `maekit.data.MAEIterableImageDataset` stream.
        eval_dataset (*optional*): map-style evaluation dataset.
        image_processor (*optional*): saved next to the model and in every checkpoint.
        data_collator (`Callable`, *optional*): training collate function (default: the task's, else
            `maekit.data.collate_fn`). Evaluation batches are the task's (`maekit.data.collate_fn` for pretraining and
            classification).
        dataset_name (`str`, *optional*): the dataset's Hub id, for the model card (local paths are not published).
        monitor (`Callable`, *optional*): `monitor(trainer, step) -> metrics`, called every `monitor.every_n_steps`
            steps and at the end (e.g. `maekit.training.KNNMonitor`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        task: Task,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        image_processor: Any = None,
        data_collator: Callable | None = None,
        dataset_name: str | None = None,
        monitor: Callable[[Trainer, int], dict[str, float]] | None = None,
    ):
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a maekit TrainingArguments, got {type(args).__name__}.")
        self.streaming = isinstance(train_dataset, MAEIterableImageDataset)
        _check_dataset("train_dataset", train_dataset, streams_allowed=True)
        _check_dataset("eval_dataset", eval_dataset, streams_allowed=False)
        if self.streaming:
            _check_stream(train_dataset, args)
        self.model = model
        self.args = args
        self.task = task
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.image_processor = image_processor
        self.dataset_name = dataset_name
        self.monitor = monitor
        self.output_dir = Path(args.output_dir)
        task.setup(self)
        self.data_collator = data_collator or task.default_collator(self) or collate_fn

        self.trackers = args.resolved_report_to()
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,  # None: as `accelerate launch` / its config says
            dynamo_backend="inductor" if args.torch_compile else None,  # None: as `accelerate launch` says
            log_with=self.trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=args.logging_dir or str(self.output_dir / "runs")
            ),
        )
        set_seed(args.seed)
        self.state = TrainerState()
        self.checkpoints = Checkpoints(
            self.accelerator, self.output_dir, args.save_total_limit, args.overwrite_output_dir
        )
        self.checkpoints.use_model_folder(self._load_model_folder)
        self.nonfinite = NonFinitePolicy(args)
        self.hub = (
            HubPusher(self.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
            if args.push_to_hub
            else None
        )
        self.stream_position = StreamPosition.start(max(args.dataloader_num_workers, 1))
        self.optimizer: torch.optim.Optimizer | None = None
        self.wrapped_model: torch.nn.Module | None = None  # the model `accelerator.prepare` returned, during `train`
        self.progress = None  # the tqdm bar, during `train`
        self._postfix: dict[str, str] = {}  # what the progress bar shows
        self._window = _LogWindow()
        self._eval_loader = None

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
        if self.streaming:
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
    def total_steps(self) -> int:
        """Length of the run in optimizer steps."""
        return self.args.total_steps(self.steps_per_epoch)

    @property
    def learning_rate(self) -> float:
        """Peak learning rate: `learning_rate`, or `base_learning_rate * global batch / 256`."""
        return self.args.resolved_learning_rate(self.accelerator.num_processes)

    def lr_at(self, step: int) -> float:
        """Learning rate used by optimizer step `step` (0-based)."""
        return lr_with_warmup(
            self.args.lr_schedule,
            step,
            learning_rate=self.learning_rate,
            total_steps=self.total_steps,
            warmup_steps=self.args.resolved_warmup_steps(self.steps_per_epoch),
            min_lr=self.args.min_lr,
            poly_power=self.args.lr_poly_power,
        )

    def epoch_at(self, step: int) -> float:
        """Epochs done after `step` optimizer steps; for a stream, the number of completed passes over it."""
        return self.stream_position.epoch if self.streaming else step / self.steps_per_epoch

    @cached_property
    def _train_data_fingerprint(self) -> str | None:
        """`_dataset_fingerprint` of the training data, computed once per run (it reads every file name)."""
        return _dataset_fingerprint(self.train_dataset)

    def signature(self) -> RunSignature:
        """What a resumed run must share with its checkpoint."""
        spe = self.steps_per_epoch
        return RunSignature(
            global_batch_size=self.global_batch_size,
            steps_per_epoch=None if self.streaming else spe,  # a stream's "epoch" is the run
            num_train_samples=None if self.streaming else len(self.train_dataset),
            dataset_fingerprint=self._train_data_fingerprint,
            total_steps=self.total_steps,
            warmup_steps=self.args.resolved_warmup_steps(spe),
            learning_rate=self.learning_rate,
            min_lr=self.args.min_lr,
            lr_schedule=self.args.lr_schedule,
            lr_poly_power=self.args.lr_poly_power if self.args.lr_schedule == "poly" else None,
            seed=self.args.seed,
            task=self.task.resume_signature(self) or None,
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Training

    def train(self) -> TrainOutput:
        """Train, evaluate and checkpoint as the arguments say; finally save the model, its card (and push it).

        Returns:
            `transformers.trainer_utils.TrainOutput`: `global_step`, `training_loss` (mean over this call's steps)
            and `metrics` (the last values of the task's summary metrics, runtime).
        """
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        spe, total_steps = self.steps_per_epoch, self.total_steps
        if total_steps > 1 and (warmup := args.resolved_warmup_steps(spe)) >= total_steps:
            self.warn(
                f"The warmup ({warmup} steps from warmup_steps={args.warmup_steps}, "
                f"warmup_epochs={args.warmup_epochs}) covers the whole run of {total_steps} steps: the learning rate "
                "only rises. Set warmup_steps (or warmup_epochs) below the run length."
            )
        if self.hub is not None:
            check_hub_access(self)  # before hours of training, not after
        configure_deepspeed(accelerator, args, self.global_batch_size)
        self.optimizer = self.task.create_optimizer(self)
        if args.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        model, optimizer = accelerator.prepare(self.model, self.optimizer)
        self.wrapped_model = model
        # Per-process random streams (drop path, mixup in the collator), as the official `seed + rank`; the data
        # order, augmentations and masks do not use them. A resumed run restores them from the checkpoint.
        set_seed(args.seed, device_specific=True)
        if args.resume_from_checkpoint:
            self._resume(args.resume_from_checkpoint)
        self.checkpoints.claim(self.state.global_step)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.announce(self._checkpoint_plan())
        if self.trackers:
            accelerator.init_trackers(args.run_name or f"mae-{self.task.name}", config=self._tracker_config())

        step = self.state.global_step
        self.progress = tqdm(
            total=total_steps,
            initial=step,
            desc=self.task.name,
            disable=args.disable_tqdm or not accelerator.is_local_main_process,
        )
        if args.eval_on_start and step == 0:
            self._evaluate_and_log(0)
        self._window = _LogWindow()
        session_losses, start_time = [], time.perf_counter()
        while step < total_steps:
            try:
                for loss in self._train_steps(model, optimizer, step, total_steps):
                    step = self.state.global_step
                    self.progress.update(1)
                    if loss is not None:
                        session_losses.append(loss)
                    self._maybe_log_evaluate_save(step, total_steps)
                    model.train()
            except _Rollback as rollback:
                step = self._roll_back(rollback.step)
                self._maybe_log_evaluate_save(step, total_steps)  # the skipped step's log, evaluation and checkpoint
        self.progress.close()

        self._warn_if_the_loss_did_not_move()
        self._check_weights_finite("the end of training")
        self.save_model(self.output_dir)
        finish_outputs(self)
        if self.trackers:
            accelerator.end_training()
        training_loss = sum(session_losses) / len(session_losses) if session_losses else float("nan")
        metrics = {
            "train_runtime": time.perf_counter() - start_time,
            "train_loss": training_loss,
            "epoch": self.epoch_at(step),
        }
        return TrainOutput(step, training_loss, {**metrics, **self.last_metrics()})

    def _micro_batches(self, first_step: int, total_steps: int) -> Iterator[tuple[dict | None, int]]:
        """`(batch, images skipped)` for this process from optimizer step `first_step` on (a batch of None only
        reports skipped images)."""
        args, accelerator = self.args, self.accelerator
        pin = args.dataloader_pin_memory and torch.cuda.is_available()
        if self.streaming:
            yield from stream_batches(
                self.train_dataset, self.stream_position, batch_size=args.per_device_train_batch_size,
                process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                collate_fn=self.data_collator, num_workers=args.dataloader_num_workers, pin_memory=pin,
                on_position=self._set_stream_position,
            )  # fmt: skip
            return
        spe, step = self.steps_per_epoch, first_step
        while step < total_steps:
            epoch = step // spe
            loader = epoch_loader(
                self.train_dataset, epoch=epoch, first=step - epoch * spe, last=min(spe, total_steps - epoch * spe),
                batch_size=args.per_device_train_batch_size, accumulation=args.gradient_accumulation_steps,
                num_processes=accelerator.num_processes, process_index=accelerator.process_index, seed=args.seed,
                collate_fn=self.data_collator, num_workers=args.dataloader_num_workers, pin_memory=pin,
            )  # fmt: skip
            for batch in loader:
                yield batch, int(torch.as_tensor(batch.get("num_skipped", 0)).sum())
            step = (epoch + 1) * spe

    def _set_stream_position(self, position: StreamPosition) -> None:
        self.stream_position = position

    def _train_steps(self, model, optimizer, first_step: int, total_steps: int) -> Iterator[float | None]:
        """Run optimizer steps from `first_step` on; yield each step's loss (None for a step not applied).

        Accelerate's accumulation counter is the one source of the micro-batch index: a step ends when
        `accelerator.sync_gradients` says so (every `gradient_accumulation_steps` micro-batches)."""
        args, accelerator = self.args, self.accelerator
        micro_batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        step, step_loss = first_step, 0.0
        model.train()
        for batch, skipped in self._micro_batches(first_step, total_steps):
            self._window.skipped += skipped
            if batch is None:
                continue
            with accelerator.accumulate(model):
                micro = (accelerator.step - 1) % accumulation  # Accelerate counted this micro-batch on entry
                if micro == 0:
                    # Set before the forward: DeepSpeed steps its optimizer inside `accelerator.backward`.
                    for group in optimizer.param_groups:  # lr_scale: layer-wise decay groups, when present
                        group["lr"] = self.lr_at(step) * group.get("lr_scale", 1.0)
                offset = (micro * accelerator.num_processes + accelerator.process_index) * micro_batch
                context = StepContext(step, offset, self.global_batch_size, accelerator.device)
                with accelerator.autocast():
                    loss = self.compute_loss(model, batch, context)
                accelerator.backward(loss)
                step_loss = step_loss + loss.detach().float()
                if not accelerator.sync_gradients:
                    continue
                mean_loss = self._optimizer_step(model, optimizer, step, step_loss / accumulation)
            step, step_loss = step + 1, 0.0
            self.state.global_step = step
            yield mean_loss
            if step == total_steps:  # a stream does not end by itself
                return

    def compute_loss(self, model: torch.nn.Module, batch: dict, context: StepContext | None = None) -> torch.Tensor:
        """The task's loss of one micro-batch (`context` defaults to the first micro-batch of the current step)."""
        if context is None:
            context = StepContext(self.state.global_step, 0, self.global_batch_size, self.accelerator.device)
        return self.task.compute_loss(self, model, batch, context)

    def _optimizer_step(self, model, optimizer, step: int, loss: torch.Tensor) -> float | None:
        """Check that the loss and the gradient norm are finite, then clip and step. Returns the step's mean loss,
        None if the step was not applied."""
        args, accelerator = self.args, self.accelerator
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # steps inside `backward`
        # The gradient norm, clipped by `max_grad_norm` when set. A finite loss can still give an infinite gradient,
        # and a step with one would write NaN into every weight.
        if deepspeed:
            grad_norm = None
        elif args.max_grad_norm is None and accelerator.scaler is None and accelerator.distributed_type in _PLAIN:
            grad_norm = _total_norm(model.parameters())  # measured only: no pass that multiplies every gradient by 1
        else:  # Accelerate unscales fp16 gradients first and knows how FSDP shards them
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor (replicated): its value as a plain tensor
                grad_norm = grad_norm.full_tensor()
        # One host sync per step, as the official loop: the mean loss over all processes (and the norm, the same on
        # every process), so that all processes decide the same.
        mean_loss = accelerator.reduce(loss, reduction="mean")
        norm = grad_norm.float().to(mean_loss.device) if grad_norm is not None else mean_loss
        loss_value, norm_value = torch.stack([mean_loss, norm]).tolist()
        if not math.isfinite(loss_value) or (not math.isfinite(norm_value) and accelerator.scaler is None):
            if accelerator.scaler is not None:  # fp16: the scaler sees the non-finite gradients, skips the step
                optimizer.step()  # and lowers its scale (it must be told, or its next unscale_ fails)
            optimizer.zero_grad(set_to_none=True)
            latest = self.checkpoints.latest()
            epoch = step // self.steps_per_epoch
            action = self.nonfinite.decide(self.state, step, epoch, loss_value, norm_value, latest, applied=deepspeed)
            if action == "rollback":
                raise _Rollback(step)
            self.warn(
                f"Skipped step {step + 1}: non-finite loss {loss_value} or gradient norm {norm_value} "
                f"({self.state.num_nonfinite_steps} skipped so far)."
            )
            return None
        # With fp16's GradScaler an infinite gradient norm is an overflow: the scaler skips the step and lowers
        # its scale (`optimizer.step` must still run for that).
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if accelerator.optimizer_step_was_skipped:
            return None
        self.state.consecutive_nonfinite_steps = 0
        self._window.losses.append(loss_value)
        self._window.grad_norm = None if grad_norm is None else norm_value
        return loss_value

    def _roll_back(self, bad_step: int) -> int:
        """Reload the newest checkpoint and continue after `bad_step`, skipping the global batches in between."""
        path = self.checkpoints.latest()
        live, stream_position = self.state, self.stream_position
        self._load_checkpoint(path)  # weights, optimizer, random state (and its own counters, replaced below)
        # What happened since the checkpoint still happened: the run's counters, history and best model stay.
        for name in ("num_skipped_images", "num_nonfinite_steps", "consecutive_nonfinite_steps", "log_history"):
            setattr(self.state, name, getattr(live, name))
        self.state.best_metric, self.state.best_step = live.best_metric, live.best_step
        self.state.num_rollbacks = live.num_rollbacks + 1
        if self.streaming:  # a stream cannot rewind: going on from where it is skips the batches since the checkpoint
            self.stream_position = stream_position
        skipped = bad_step + 1 - int(path.name.split("-")[-1])
        self.state.global_step = bad_step + 1
        self.progress.n = bad_step + 1
        self.warn(
            f"Non-finite step {bad_step + 1}: rolled back to {path.name} and skipped the {skipped} global batch(es) "
            f"since then (rollback {self.state.num_rollbacks})."
        )
        self._window = _LogWindow()
        return bad_step + 1

    def _maybe_log_evaluate_save(self, step: int, total_steps: int) -> None:
        args, spe = self.args, self.steps_per_epoch
        last, end_of_epoch = step == total_steps, step % spe == 0
        if step % args.logging_steps == 0 or last:
            self._log_window(step)
        if self.monitor is not None and (last or step % self.monitor.every_n_steps == 0):
            monitored = self.monitor(self, step)
            self.log(monitored, step)
            self._show(**monitored)
        if last or (args.eval_steps and step % args.eval_steps == 0) or (not args.eval_steps and end_of_epoch):
            self._evaluate_and_log(step)
        if last or step % args.resolved_save_steps(spe) == 0:
            self._save_checkpoint(step)
            if self.hub is not None and args.hub_strategy == "every_save":
                push_snapshot(self, step)

    def _log_window(self, step: int) -> None:
        window = self._window
        self._flush_skipped()
        elapsed = time.perf_counter() - window.start
        metrics = {
            "loss": sum(window.losses) / len(window.losses) if window.losses else float("nan"),
            "learning_rate": self.lr_at(step - 1),
            "epoch": self.epoch_at(step),
            "images_per_second": len(window.losses) * self.global_batch_size / max(elapsed, 1e-9),
            "num_skipped_images": self.state.num_skipped_images,
            "num_nonfinite_steps": self.state.num_nonfinite_steps,
        }
        if window.grad_norm is not None:
            metrics["grad_norm"] = window.grad_norm
        self.log(metrics, step)
        self._show(loss=metrics["loss"], lr=metrics["learning_rate"], img_s=metrics["images_per_second"])
        self._show(epoch=metrics["epoch"])
        self._window = _LogWindow()

    def _flush_skipped(self) -> None:
        """Add the images skipped (on every process) since the last flush to `state.num_skipped_images`."""
        skipped = torch.tensor(self._window.skipped, device=self.accelerator.device)
        self.state.num_skipped_images += int(self.accelerator.reduce(skipped, reduction="sum").item())
        self._window.skipped = 0

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation of the current model on `eval_dataset` (every process must call it)."""
        return self.task.evaluate(self)

    def _evaluate_and_log(self, step: int) -> None:
        metrics = self.evaluate() if self.eval_dataset is not None else {}
        metrics = {**metrics, **self.task.after_evaluation(self, step, metrics)}
        if metrics:
            self.log(metrics, step)
            self._show(**{k: v for k, v in metrics.items() if k.startswith("eval_")})

    def model_for_inference(self) -> torch.nn.Module:
        """The model to run forwards with: the prepared (wrapped) one during training, else the model on the device."""
        # Before `train` the model is not wrapped; preparing it alone here would wrap it twice later.
        return self.wrapped_model if self.wrapped_model is not None else self.model.to(self.accelerator.device)

    def eval_loader(
        self,
        indices: list[int] | None = None,
        generator: torch.Generator | None = None,
        collate: Callable = collate_fn,
    ):
        """A loader of `eval_dataset[i] for i in indices` in that order (this process's share, chosen by the task), or
        of the whole `eval_dataset` in order; every sample kept, batched by `collate` (`maekit.data.collate_fn`)."""
        return build_dataloader(
            self.eval_dataset,
            self.args.per_device_eval_batch_size,
            shuffle=False,
            sampler=indices,
            drop_last=False,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            persistent_workers=False,
            generator=generator,
        )

    def sharded_eval_loader(self):
        """The whole `eval_dataset` sharded over the processes by Accelerate (`gather_for_metrics` drops the samples
        that pad the last batch); built once."""
        if self._eval_loader is None:
            self._eval_loader = self.accelerator.prepare_data_loader(self.eval_loader())
        return self._eval_loader

    def image_statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The normalization (mean, std) of the images: the image processor's, else ImageNet's."""
        mean = getattr(self.image_processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN
        std = getattr(self.image_processor, "image_std", None) or IMAGENET_DEFAULT_STD
        return tuple(mean), tuple(std)

    # ------------------------------------------------------------------------------------------------------------------
    # Logging and messages

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` at `step` in the log history and send them to the trackers."""
        self.state.log_history.append({**metrics, "step": step})
        if self.trackers:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as err:  # a tracker is a side job: training goes on
                self.warn(f"Logging to the trackers failed at step {step}: {type(err).__name__}: {err}")

    def _show(self, **values: float) -> None:
        """Put values on the progress bar, next to those already there (losses, rate, epoch, evaluation...)."""
        for key, value in values.items():
            self._postfix[key] = f"{value:.3g}" if key == "epoch" else f"{value:.4g}"
        if self.progress is not None:
            self.progress.set_postfix(self._postfix, refresh=False)

    def announce(self, message: str) -> None:
        """Tell the user something about the run (main process; printed above the progress bar)."""
        if not self.accelerator.is_main_process:
            return
        logger.info(message)
        if not self.args.disable_tqdm:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def warn(self, message: str) -> None:
        """A warning from the main process."""
        if self.accelerator.is_main_process:
            logger.warning(message)

    def _warn_if_the_loss_did_not_move(self) -> None:
        """A run whose training loss ends where it started (within 2%) most likely had too small a learning rate
        for its length: say so, rather than let a chance-level result pass silently."""
        losses = [entry["loss"] for entry in self.state.log_history if math.isfinite(entry.get("loss", math.nan))]
        if len(losses) < 4:
            return
        quarter = max(1, len(losses) // 4)
        first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
        if last >= 0.98 * first:
            self.warn(
                f"The training loss has not moved ({first:.4g} at the start, {last:.4g} at the end of "
                f"{self.state.global_step} steps): the learning rate ({self.learning_rate:.3g} at its peak) is probably "
                "too small for a run this short, or the data carry no signal. Raise learning_rate (or "
                "base_learning_rate), or train for more steps."
            )

    def last_metrics(self) -> dict[str, float]:
        """The last logged value of each of the task's summary metrics."""
        last = {}
        for entry in self.state.log_history:
            for key in self.task.summary_metrics:
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

    def _checkpoint_plan(self) -> str:
        every = self.args.resolved_save_steps(self.steps_per_epoch)
        limit = self.args.save_total_limit
        kept = f"keeping the newest {limit}" if limit else "keeping them all"
        return (
            f"Checkpoints: {self.output_dir}/checkpoint-<step> every {every} steps and at step {self.total_steps}, "
            f"{kept}; the model goes to {self.output_dir}."
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def _check_weights_finite(self, when: str) -> None:
        """Raise `NonFiniteLossError` (on every process) if a weight is NaN/inf: such weights are never saved."""
        model = self.model_for_inference()
        finite = all_finite(p.detach() for p in model.parameters())
        finite = self.accelerator.reduce(torch.tensor(float(finite), device=self.accelerator.device), "min")
        if finite.item() < 1:
            raise NonFinitePolicy.weights_error(when, self.state.global_step, self.checkpoints.latest())

    def _save_checkpoint(self, step: int) -> None:
        self._flush_skipped()  # the checkpoint's count includes images skipped since the last log
        self._check_weights_finite(f"checkpoint {step}")
        # Every process's stream position (a collective call, hence on all processes).
        positions = gather_object([self.stream_position.to_record()]) if self.streaming else None
        spe = self.steps_per_epoch
        record = {
            **asdict(self.state),
            **asdict(self.signature()),
            "epoch": self.epoch_at(step),
            "epoch_index": step // spe,  # data position: this epoch's order ...
            "step_in_epoch": step % spe,  # ... after this many global batches of it
            "num_processes": self.accelerator.num_processes,
            "weights_finite": True,
        }
        if positions is not None:
            record["stream_positions"] = positions
        self.checkpoints.save(step, record, lambda folder: self.save_model(folder, checkpoint=True))

    def _resume(self, checkpoint: str) -> None:
        path = self.checkpoints.resolve(checkpoint)
        if path is None:
            self.announce(f"No checkpoint in {self.output_dir} yet: starting from scratch.")
            return
        record = self.checkpoints.read_record(path)
        if record["global_batch_size"] != self.global_batch_size:
            raise ValueError(
                f"Checkpoint {path} was trained with a global batch of {record['global_batch_size']} images, this run "
                f"has {self.global_batch_size}; keep per_device_train_batch_size × processes × "
                "gradient_accumulation_steps equal to resume (the data order and schedule depend on it)."
            )
        position = (  # the same split of the same stream, checked before anything else
            StreamPosition.from_record(
                record, path, self.accelerator, len(self.stream_position.batches), self.train_dataset
            )
            if self.streaming
            else None
        )
        differences = self.signature().differences(record)
        if differences and not self.args.ignore_resume_mismatch:
            raise ValueError(
                f"Checkpoint {path} belongs to another run: {'; '.join(differences)}. Resuming would not continue it "
                "(the data order and the learning-rate schedule depend on these). Resume with the same data and "
                "arguments, start in another output_dir, or pass ignore_resume_mismatch=True to resume anyway."
            )
        if differences:
            self.warn(f"Resuming from {path} although {'; '.join(differences)} (ignore_resume_mismatch=True).")
        self._load_checkpoint(path, record, position)
        self.announce(
            f"Resumed from {path} at step {self.state.global_step} (epoch {self.epoch_at(self.state.global_step):.2f})."
        )

    def _load_checkpoint(
        self, path: str | Path, record: dict | None = None, position: StreamPosition | None = None
    ) -> None:
        """Load checkpoint `path`; `record` (its trainer_state.json) and `position` (its stream position) when the
        caller has read them already."""
        path = Path(path)
        record = self.checkpoints.read_record(path) if record is None else record
        if self.streaming:
            self.stream_position = position or StreamPosition.from_record(
                record, path, self.accelerator, len(self.stream_position.batches), self.train_dataset
            )
        self.accelerator.load_state(str(path))
        self.state = TrainerState.from_record(record)
        self.task.after_resume(self)

    def _load_model_folder(self, folder: Path) -> None:
        load_model_folder(self.accelerator.unwrap_model(self.model_for_inference()), folder)

    # ------------------------------------------------------------------------------------------------------------------
    # Model, card, Hub

    def save_model(self, folder: str | Path, checkpoint: bool = False) -> None:
        """`save_pretrained` the (gathered) model and the image processor into `folder` (every process must call it).

        With `checkpoint=True` the tensors a resumed run needs beyond the model folder are written too."""
        save_model_folder(
            self.accelerator, self.model_for_inference(), Path(folder), self.task, self.image_processor, checkpoint
        )

    def create_model_card(self) -> Path:
        """Write `output_dir/README.md` from the task's `ModelCard`."""
        card: ModelCard = self.task.model_card(self)
        return write_model_card(self.output_dir / "README.md", card)

    def push_to_hub(self, commit_message: str = "End of training") -> str:
        """Upload `output_dir` (model, image processor, card, figures; not checkpoints) to the Hub; returns the repo
        id. Raises on failure (the trainer's own pushes during `train` only warn)."""
        pusher = self.hub or HubPusher(
            self.output_dir, self.args.hub_model_id, self.args.hub_token, self.args.hub_private_repo
        )
        repo_id = pusher.check_access()
        if not pusher.push(commit_message):
            raise RuntimeError(f"Pushing {self.output_dir} to {repo_id} failed: {pusher.failures[-1]}")
        return repo_id
