"""Checkpoints: the trainer's state, atomic `checkpoint-{step}` folders, "latest", pruning, resuming and its checks.

Every `checkpoint-{step}` folder is a complete model folder (`config.json`, `model.safetensors`, the image processor's
`preprocessor_config.json`), so `from_pretrained`, the Auto classes and `maekit-convert` load it, plus what a resumed
run needs: the optimizer, the random states (Accelerate's `save_state`) and `trainer_state.json`, written last. A folder
is written under a temporary name and renamed when complete; weights that are not finite are never written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointWriteError",
    "load_model_folder",
    "save_model_folder",
    "Checkpoints",
    "RunSignature",
    "TrainerState",
    "best_from_history",
    "find_latest_checkpoint",
    "keep_best_model",
]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
BEST_MODEL_DIR = "best"  # output_dir/best: the model with the best evaluation so far (tasks that track one)
BEST_RESULTS_NAME = "eval_results.json"
# Tensors a resumed run needs beyond the saved model (e.g. an unfolded linear-probe head); absent when none.
TRAINING_ONLY_WEIGHTS_NAME = "training_only.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What torch's and safetensors' writers raise when the disk fills up, besides OSError(ENOSPC).
_DISK_FULL_MESSAGES = ("no space left on device", "unexpected pos", "file write failed", "enospc")


@dataclass
class TrainerState:
    """What the loop counts, saved in every checkpoint's `trainer_state.json` (as transformers' `TrainerState`).

    Args:
        global_step (`int`): optimizer steps done (skipped non-finite steps included).
        num_skipped_images (`int`): unreadable images skipped so far, over all processes.
        num_nonfinite_steps (`int`): steps whose loss or gradient norm was NaN/inf (not applied).
        consecutive_nonfinite_steps (`int`): of those, how many in a row up to the last step.
        num_rollbacks (`int`): reloads of an earlier checkpoint after a non-finite step (`nonfinite_loss="rollback"`).
        best_metric (`float`, *optional*): the best evaluation metric so far (tasks that track one).
        best_step (`int`, *optional*): the step it was measured at.
        log_history (`list[dict]`): every logged entry, with its `"step"`.
    """

    global_step: int = 0
    num_skipped_images: int = 0
    num_nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    num_rollbacks: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        """Mapping-style read access (`state["global_step"]`), as maekit 0.1's dict state allowed."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainerState:
        """The state stored in a checkpoint record (fields it lacks, as in older checkpoints, keep their default)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass(frozen=True)
class RunSignature:
    """What a resumed run must share with the checkpoint it resumes, so that it continues the same run: the data
    order and the schedule depend on each field."""

    num_train_samples: int | None
    dataset_fingerprint: str | None
    global_batch_size: int
    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    learning_rate: float
    min_lr: float
    lr_schedule: str = "cosine"
    lr_poly_power: float | None = None  # only with the poly schedule
    seed: int | None = None  # the data order, augmentations and masks
    task: dict[str, Any] | None = None  # the objective (`Task.resume_signature`), e.g. the mask ratio

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """`"name: saved -> now"` for every field that differs from a checkpoint record (fields it lacks are not
        compared; a fingerprint only when both runs have one)."""
        found = []
        for name, value in asdict(self).items():
            if name not in saved or saved[name] is None or value is None:
                continue
            if isinstance(value, dict):  # the task's fields, one by one
                found += [
                    f"{key}: {saved[name][key]!r} in the checkpoint, {item!r} now"
                    for key, item in value.items()
                    if key in saved[name] and not _same(saved[name][key], item)
                ]
            elif not _same(saved[name], value):
                found.append(f"{name}: {saved[name]!r} in the checkpoint, {value!r} now")
        return found


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, float) or isinstance(new, float):
        return isinstance(old, (int, float)) and abs(old - new) <= 1e-12 * max(abs(old), abs(new))
    return old == new


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the partial folder was removed."""


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-{step}` folder of `output_dir` with the highest step, or None.

    A folder is complete when it holds `trainer_state.json`, which is written last, just before the folder is renamed
    from its temporary name; half-written checkpoints are therefore never returned.
    """
    folders = complete_checkpoints(Path(output_dir))
    return str(folders[-1][1]) if folders else None


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of the complete `checkpoint-{step}` folders, by increasing step."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_disk_full(error: BaseException) -> bool:
    """Whether an exception raised while writing files means that the device is full."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(message in str(error).lower() for message in _DISK_FULL_MESSAGES)


def all_finite(tensors) -> bool:
    """Whether every value of every floating-point tensor is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


class Checkpoints:
    """The `checkpoint-{step}` folders of one run in `output_dir`: writing, finding, pruning and loading them.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (collective calls go through it).
        output_dir (`Path`): the run's folder.
        save_total_limit (`int`, *optional*): keep at most this many, the newest.
        overwrite_output_dir (`bool`): let a run delete checkpoints it did not write instead of refusing to run.
    """

    def __init__(self, accelerator, output_dir: Path, save_total_limit: int | None, overwrite_output_dir: bool):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.save_total_limit = save_total_limit
        self.overwrite_output_dir = overwrite_output_dir

    def use_model_folder(self, load_model: Callable[[Path], None]) -> None:
        """Make the model folder the checkpoint's only copy of the weights: Accelerate's `save_state` stops writing
        its own weights file and `load_state` calls `load_model(folder)` instead of reading it. Sharded setups (FSDP,
        DeepSpeed) keep their own shards, which `load_state` reads, next to the consolidated model folder."""

        def drop_weights(models, weights, output_dir) -> None:
            weights.clear()  # empty already with FSDP / DeepSpeed

        def load_models(models, input_dir) -> None:
            if models:  # FSDP / DeepSpeed models are loaded from their shards before this hook
                models.clear()
                load_model(Path(input_dir))

        self.accelerator.register_save_state_pre_hook(drop_weights)
        self.accelerator.register_load_state_pre_hook(load_models)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        found = complete_checkpoints(self.output_dir)
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str) -> Path | None:
        """The folder `resume_from_checkpoint` names ("latest": the newest in `output_dir`, None when there is none
        yet, so that a restarted job can always pass "latest")."""
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not (path / TRAINER_STATE_NAME).is_file():
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} is not a complete checkpoint folder (no "
                f"{TRAINER_STATE_NAME}); pass a checkpoint-{{step}} folder or 'latest'."
            )
        return path

    @staticmethod
    def read_record(path: Path) -> dict[str, Any]:
        """The `trainer_state.json` of a checkpoint folder."""
        return json.loads((path / TRAINER_STATE_NAME).read_text())

    def claim(self, step: int) -> None:
        """Refuse to run where checkpoints of another run (or of a later point of this one) would be pruned,
        overwritten or picked as "latest" — unless `overwrite_output_dir`, which deletes them."""
        later = [path for saved, path in complete_checkpoints(self.output_dir) if saved > step]
        if not later:
            return
        names = ", ".join(p.name for p in later)
        if not self.overwrite_output_dir:
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

    def save(self, step: int, record: dict[str, Any], write_model: Callable[[Path], None]) -> Path:
        """Write `checkpoint-{step}` atomically: Accelerate's state, the model folder (`write_model(folder)`, on every
        process: gathering sharded weights is collective) and `record` as `trainer_state.json`, into a temporary
        folder renamed when complete; then prune. Any failure (on any process) removes the temporary folder and
        raises on every process; a full disk raises `CheckpointWriteError` saying so."""
        accelerator = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        # Every stage runs on every process even after a failure of this one, so that the collective calls inside
        # (barriers, gathering sharded weights) stay in step; the first error is reported below on every process.
        error = None
        for stage in (lambda: accelerator.save_state(str(tmp)), lambda: write_model(tmp)):
            try:
                stage()
            except Exception as err:  # disk full (OSError, torch's RuntimeError, SafetensorError), permissions, ...
                error = error or err
        if accelerator.is_main_process and error is None:
            try:
                (tmp / TRAINER_STATE_NAME).write_text(json.dumps(record, indent=2))
            except Exception as err:
                error = err
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum")
        if failed.item() > 0:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            accelerator.wait_for_everyone()
            latest = self.latest()
            kept = f"the last complete checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
            if error is not None and is_disk_full(error):
                raise CheckpointWriteError(
                    f"No space left on device while writing checkpoint {step} to {tmp}: the partial folder was "
                    f"removed and {kept}. Free disk space (or lower save_total_limit) and resume with "
                    "resume_from_checkpoint='latest'."
                ) from error
            raise CheckpointWriteError(
                f"Writing checkpoint {step} to {tmp} failed"
                f"{f' ({type(error).__name__}: {error})' if error is not None else ' on another process'}: the "
                f"partial folder was removed and {kept}."
            ) from error
        if accelerator.is_main_process:
            if final.exists():  # re-running into the same folder: swap the old copy out before the rename
                old = self.output_dir / f".old-checkpoint-{step}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond `save_total_limit` (only finite weights are ever written,
        so the newest checkpoint kept is always one to resume from)."""
        if not self.save_total_limit:
            return
        for _, path in complete_checkpoints(self.output_dir)[: -self.save_total_limit]:
            shutil.rmtree(path)


def save_model_folder(accelerator, model: torch.nn.Module, folder: Path, task, image_processor=None, checkpoint=False):
    """`save_pretrained` the (gathered) `model` and the image processor into `folder`; every process must call it.

    `task.exported_state_dict` decides how the model is presented (e.g. a probe head folded); with `checkpoint=True`
    the tensors a resumed run needs beyond that (`task.training_only_state`) go to `training_only.safetensors`.
    """

    accelerator.wait_for_everyone()
    # torch.compile (torch_compile=True) prefixes parameter names with `_orig_mod.`; the saved model must not.
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in accelerator.get_state_dict(model).items()}
    error = None
    if accelerator.is_main_process:
        try:
            _write_model_folder(accelerator.unwrap_model(model), state_dict, folder, task, image_processor, checkpoint)
        except Exception as err:  # raised after the barrier: the other processes must not wait for this one forever
            error = err
    accelerator.wait_for_everyone()
    if error is not None:
        raise error


def _write_model_folder(unwrapped, state_dict: dict, folder: Path, task, image_processor, checkpoint: bool) -> None:
    from safetensors.torch import save_file
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its bars would interleave with the training bar
    try:
        with task.exported_state_dict(unwrapped, state_dict) as exported:
            unwrapped.save_pretrained(folder, state_dict=exported)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    extra = task.training_only_state(state_dict) if checkpoint else {}
    if extra:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, folder / TRAINING_ONLY_WEIGHTS_NAME)


def load_model_folder(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint's model folder (and the tensors only training needs) into `model` (unwrapped), strictly."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    # Checkpoints of maekit 0.1 hold Accelerate's raw weights: strip the wrappers' prefixes.
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in weights.items()}
    expected = model.state_dict()
    state_dict = {k: v for k, v in weights.items() if k in expected}
    if (folder / TRAINING_ONLY_WEIGHTS_NAME).is_file():
        state_dict.update(load_file(str(folder / TRAINING_ONLY_WEIGHTS_NAME)))
    model.load_state_dict(state_dict, strict=True)


def keep_best_model(trainer, step: int, metrics: dict[str, float], key: str, details: dict | None = None) -> float:
    """If `metrics[key]` beats the best so far (higher is better), record it in `trainer.state` and, unless the
    arguments' `save_best_model` is off, save the model into `output_dir/best` with `eval_results.json` (the metrics,
    the step and `details`). Returns the best value so far."""
    state = trainer.state
    if state.best_metric is None or metrics[key] > state.best_metric:
        state.best_metric, state.best_step = metrics[key], step
        if getattr(trainer.args, "save_best_model", True):
            folder = trainer.output_dir / BEST_MODEL_DIR
            trainer.save_model(folder)
            if trainer.accelerator.is_main_process:
                results = {**metrics, "step": step, **(details or {})}
                (folder / BEST_RESULTS_NAME).write_text(json.dumps(results, indent=2))
    return state.best_metric


def best_from_history(state: TrainerState, key: str) -> None:
    """Set `state.best_metric` / `best_step` from the logged values of `key` (after a resume: checkpoints of maekit 0.1
    lack the fields)."""
    evaluations = [entry for entry in state.log_history if key in entry]
    best = max(evaluations, key=lambda entry: entry[key], default=None)
    state.best_metric = None if best is None else best[key]
    state.best_step = None if best is None else best["step"]
