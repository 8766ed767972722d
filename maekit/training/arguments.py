"""Arguments of `MAETrainer`: the official MAE pretraining recipe, with `TrainingArguments` names where one exists."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field

__all__ = ["MAETrainingArguments"]

_MIXED_PRECISION = ("no", "fp16", "bf16")
_HUB_STRATEGIES = ("end", "every_save")
_NONFINITE = ("error", "skip")


@dataclass
class MAETrainingArguments:
    """Arguments of `MAETrainer`, parsable by `transformers.HfArgumentParser` (command line, JSON or YAML).

    Defaults follow the official MAE pretraining recipe (AdamW with betas (0.9, 0.95), weight decay 0.05, base
    learning rate 1.5e-4 scaled by global batch / 256, 40 warmup epochs then half-cycle cosine, 800 epochs). The global
    batch is `per_device_train_batch_size * num_processes * gradient_accumulation_steps`; the official runs use 4096.

    Example:

    ```python
    from maekit import MAETrainingArguments

    args = MAETrainingArguments(output_dir="out", per_device_train_batch_size=64, gradient_accumulation_steps=4)
    assert args.global_batch_size(num_processes=16) == 4096
    assert abs(args.resolved_learning_rate(num_processes=16) - 1.5e-4 * 16) < 1e-12
    ```
    """

    output_dir: str = field(default="outputs/mae", metadata={"help": "Where checkpoints, logs and the model go."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training images per process and step."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation images per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=800.0, metadata={"help": "Epochs to train (ignored if max_steps > 0)."})
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "Optimizer steps to train; overrides num_train_epochs if > 0 (required for streaming data)."
        },
    )
    base_learning_rate: float = field(
        default=1.5e-4, metadata={"help": "Base learning rate: lr = base_learning_rate * global batch / 256."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Absolute peak learning rate; overrides base_learning_rate when set."}
    )
    min_lr: float = field(default=0.0, metadata={"help": "Learning rate at the end of the cosine schedule."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases / 1-D params)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    warmup_epochs: float = field(default=40.0, metadata={"help": "Epochs of linear learning-rate warmup."})
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of linear warmup; overrides warmup_epochs when set (required for streaming data)."
        },
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Clip the gradient norm to this value (off by default, as official)."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": f"Mixed precision {_MIXED_PRECISION}; default: as `accelerate launch`/config says, else 'no'."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds checkpoints of another run (they are deleted); without "
            "it such a run is refused, so no checkpoint is ever pruned or shadowed by a run that did not write it."
        },
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (inductor), through Accelerate's dynamo plugin."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute every block in backward: less activation memory for more time "
            "(ViT-B, CPU: 0.66x step memory, +23% time; docs/performance.md)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order, augmentations and masks."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training metrics every this many steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every this many steps (default: at the end of every epoch)."}
    )
    eval_on_start: bool = field(
        default=False, metadata={"help": "Evaluate (and draw reconstructions) before training."}
    )
    save_steps: int | None = field(
        default=None,
        metadata={"help": "Save a checkpoint every this many steps (default: at the end of every epoch)."},
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep at most this many checkpoints (the oldest are deleted)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to resume from, or 'latest' for the newest in output_dir."},
    )
    nonfinite_loss: str = field(
        default="error",
        metadata={"help": "On a NaN/inf loss: 'error' stops naming the step; 'skip' drops the step and counts it."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Trackers for Accelerate ('tensorboard', 'wandb', ..., 'all', 'none'); 'auto' = tensorboard if installed."
        },
    )
    logging_dir: str | None = field(default=None, metadata={"help": "Tracker folder (default: output_dir/runs)."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run in the trackers."})
    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Fixed evaluation images shown in the reconstruction grid (0: none)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading worker processes per process."})
    dataloader_pin_memory: bool = field(default=True, metadata={"help": "Pin memory when training on CUDA."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model to the Hugging Face Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (default: output_dir's name)."})
    hub_strategy: str = field(default="end", metadata={"help": f"When to push: {_HUB_STRATEGIES}."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def __post_init__(self):
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("eval_steps", "save_steps", "save_total_limit"):  # 0 would silently mean "not set"
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be None (the default) or a positive integer, got {value!r}.")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be None or a non-negative integer, got {self.warmup_steps!r}.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(
                f"Set max_steps > 0 or num_train_epochs > 0; got max_steps={self.max_steps}, "
                f"num_train_epochs={self.num_train_epochs}."
            )
        if not self.base_learning_rate > 0 or (self.learning_rate is not None and not self.learning_rate > 0):
            raise ValueError(
                f"base_learning_rate / learning_rate must be > 0, got {self.base_learning_rate!r} / "
                f"{self.learning_rate!r}."
            )
        if self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError(
                f"min_lr, weight_decay and warmup_epochs must be >= 0, got {self.min_lr!r}, "
                f"{self.weight_decay!r}, {self.warmup_epochs!r}."
            )
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None (no clipping) or > 0, got {self.max_grad_norm!r}.")
        for name, value, accepted in (
            ("mixed_precision", self.mixed_precision, (*_MIXED_PRECISION, None)),
            ("hub_strategy", self.hub_strategy, _HUB_STRATEGIES),
            ("nonfinite_loss", self.nonfinite_loss, _NONFINITE),
        ):
            if value not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {value!r}.")

    def global_batch_size(self, num_processes: int = 1) -> int:
        """Images per optimizer step: per-device batch × processes × accumulation steps."""
        return self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps

    def resolved_learning_rate(self, num_processes: int = 1) -> float:
        """`learning_rate` if set, otherwise `base_learning_rate * global batch / 256` (the official scaling rule)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return self.base_learning_rate * self.global_batch_size(num_processes) / 256

    def resolved_report_to(self) -> list[str]:
        """The tracker names to pass to `accelerate.Accelerator(log_with=...)`; empty for none."""
        names = [name for name in self.report_to if name != "none"]
        if "auto" in names:
            names.remove("auto")
            if (
                importlib.util.find_spec("tensorboard") is not None
                or importlib.util.find_spec("tensorboardX") is not None
            ):
                names.append("tensorboard")
        return sorted(set(names))

    def total_steps(self, steps_per_epoch: int) -> int:
        """Length of the run in optimizer steps."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def resolved_warmup_steps(self, steps_per_epoch: int) -> int:
        """Warmup length in optimizer steps, at most the whole run."""
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_epochs * steps_per_epoch)
        return min(warmup, self.total_steps(steps_per_epoch))

    def to_dict(self) -> dict:
        """The arguments as a JSON-serialisable dict (the hub token is left out)."""
        values = asdict(self)
        values.pop("hub_token")
        return values
