"""Arguments of the trainers, parsable by `transformers.HfArgumentParser` (command line, JSON or YAML).

`TrainingArguments` holds what the training loop itself needs (batch sizes, schedule, precision, logging, evaluation
and checkpoint points, resuming, the Hub); `MAETrainingArguments` adds pretraining's fields with the official MAE
pretraining recipe as defaults, `ClassificationTrainingArguments` fine-tuning's and linear probing's,
`SegmentationTrainingArguments` semantic segmentation's (the ADE20K UperNet recipe). Names follow
`transformers.TrainingArguments` where one exists.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field

from ..configuration_mae import MASK_STRATEGIES
from .schedule import LR_SCHEDULES

__all__ = [
    "ClassificationTrainingArguments",
    "MAETrainingArguments",
    "SegmentationTrainingArguments",
    "TrainingArguments",
]

_MIXED_PRECISION = ("no", "fp16", "bf16")
_HUB_STRATEGIES = ("end", "every_save")
_NONFINITE = ("error", "skip", "rollback")
_EVAL_MODES = ("slide", "whole")
# Without save_steps, checkpoints are written at epoch ends at least this many optimizer steps apart.
MIN_STEPS_BETWEEN_EPOCH_SAVES = 500
# The official linear-probing batch; with LARS the scaling rule does not take the rate below this batch's.
LINEAR_PROBE_REFERENCE_BATCH = 16384


def _check_positive_int(owner, names: tuple[str, ...], optional: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            accepted = "None (the default) or a positive integer" if optional else "a positive integer"
            raise ValueError(f"{name} must be {accepted}, got {value!r}.")


@dataclass
class TrainingArguments:
    """What the training loop needs, whatever the objective. Defaults: the official MAE pretraining recipe.

    The global batch is `per_device_train_batch_size * num_processes * gradient_accumulation_steps`; the learning rate
    is `learning_rate`, or `base_learning_rate * global batch / 256` (the official scaling rule).
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
    min_lr: float = field(default=0.0, metadata={"help": "Learning rate at the end of the schedule."})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": f"Learning-rate schedule after the linear warmup: {LR_SCHEDULES}. 'cosine': half-cycle cosine "
            "to min_lr (MAE); 'poly': mmsegmentation's polynomial decay to min_lr over the whole run, power "
            "lr_poly_power (the ADE20K segmentation recipe)."
        },
    )
    lr_poly_power: float = field(default=1.0, metadata={"help": "Power of the 'poly' schedule (1.0: linear decay)."})
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
        metadata={"help": "Recompute every block in backward: less activation memory for more time."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, data order, augmentations and masks."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training metrics every this many steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every this many steps (default: at the end of every epoch)."}
    )
    eval_on_start: bool = field(default=False, metadata={"help": "Evaluate before training."})
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "Save a checkpoint every this many steps (default: at the end of epochs, at least "
            f"{MIN_STEPS_BETWEEN_EPOCH_SAVES} steps apart; always at the end)."
        },
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep at most this many checkpoints, the newest (None: keep them all)."},
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder to resume from, or 'latest' for the newest in output_dir."},
    )
    ignore_resume_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even when the data set or the schedule differ from the checkpoint's (refused otherwise: "
            "the run would no longer continue the one that was interrupted)."
        },
    )
    nonfinite_loss: str = field(
        default="error",
        metadata={
            "help": "On a NaN/inf loss or gradient norm: 'error' stops naming the step; 'skip' drops the step and "
            "counts it; 'rollback' reloads the newest checkpoint and skips the global batches since then. "
            "'skip' and 'rollback' stop after nonfinite_patience bad steps in a row."
        },
    )
    nonfinite_patience: int = field(
        default=10,
        metadata={"help": "With nonfinite_loss 'skip'/'rollback': stop after this many non-finite steps in a row."},
    )
    nonfinite_max_fraction: float = field(
        default=0.1,
        metadata={
            "help": "With nonfinite_loss 'skip'/'rollback': stop when more than this fraction of the steps so far "
            "were non-finite (checked from nonfinite_patience such steps on)."
        },
    )
    report_to: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "Trackers for Accelerate ('tensorboard', 'wandb', ..., 'all', 'none'); 'auto' = tensorboard if installed."
        },
    )
    logging_dir: str | None = field(default=None, metadata={"help": "Tracker folder (default: output_dir/runs)."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run in the trackers."})
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
        _check_positive_int(
            self, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        )
        _check_positive_int(self, ("logging_steps", "nonfinite_patience"))
        # 0 would silently mean "not set": refused.
        _check_positive_int(self, ("eval_steps", "save_steps", "save_total_limit"), optional=True)
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
        if not self.lr_poly_power > 0:
            raise ValueError(f"lr_poly_power must be > 0, got {self.lr_poly_power!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None (no clipping) or > 0, got {self.max_grad_norm!r}.")
        if not 0.0 < self.nonfinite_max_fraction <= 1.0:
            raise ValueError(f"nonfinite_max_fraction must be in (0, 1], got {self.nonfinite_max_fraction!r}.")
        for name, value, accepted in (
            ("mixed_precision", self.mixed_precision, (*_MIXED_PRECISION, None)),
            ("hub_strategy", self.hub_strategy, _HUB_STRATEGIES),
            ("nonfinite_loss", self.nonfinite_loss, _NONFINITE),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
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

    def resolved_save_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps between checkpoints: `save_steps`, else whole epochs at least
        `MIN_STEPS_BETWEEN_EPOCH_SAVES` steps apart."""
        if self.save_steps is not None:
            return self.save_steps
        return steps_per_epoch * math.ceil(MIN_STEPS_BETWEEN_EPOCH_SAVES / steps_per_epoch)

    def to_dict(self) -> dict:
        """The arguments as a JSON-serialisable dict (the hub token is left out)."""
        values = asdict(self)
        values.pop("hub_token")
        return values


@dataclass
class MAETrainingArguments(TrainingArguments):
    """Arguments of `MAETrainer`: every `TrainingArguments` field plus pretraining's own.

    Defaults follow the official MAE pretraining recipe (AdamW with betas (0.9, 0.95), weight decay 0.05, base
    learning rate 1.5e-4 scaled by global batch / 256, 40 warmup epochs then half-cycle cosine, 800 epochs). The global
    batch is `per_device_train_batch_size * num_processes * gradient_accumulation_steps`; the official runs use 4096.

    `mask_strategy`, when set, wins over the model config's `mask_strategy`: the trainer writes it into the config
    before training, so the strategy the masks were drawn with is the one saved with every checkpoint and the final
    model. Left at `None`, the model config's strategy is used (and saved) unchanged.

    Example:

    ```python
    from maekit import MAETrainingArguments

    args = MAETrainingArguments(output_dir="out", per_device_train_batch_size=64, gradient_accumulation_steps=4)
    assert args.global_batch_size(num_processes=16) == 4096
    assert abs(args.resolved_learning_rate(num_processes=16) - 1.5e-4 * 16) < 1e-12
    ```
    """

    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Fixed evaluation images shown in the reconstruction grid (0: none)."}
    )
    mask_strategy: str | None = field(
        default=None,
        metadata={
            "help": f"How the removed patches are chosen during training, one of {MASK_STRATEGIES}; overrides the "
            "model config's mask_strategy, which the trainer sets to it, so every saved config says how the model "
            "was trained (default: the model config's, 'random' for new models)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.mask_strategy is not None and self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(
                f"mask_strategy must be None (the model config's) or one of {MASK_STRATEGIES}, got "
                f"{self.mask_strategy!r}."
            )
        if isinstance(self.num_reconstruction_images, bool) or not isinstance(self.num_reconstruction_images, int):
            raise ValueError(
                f"num_reconstruction_images must be an integer >= 0, got {self.num_reconstruction_images!r}."
            )
        if self.num_reconstruction_images < 0:
            raise ValueError(f"num_reconstruction_images must be >= 0, got {self.num_reconstruction_images}.")


@dataclass
class ClassificationTrainingArguments(TrainingArguments):
    """Arguments of `ClassificationTrainer`: every `TrainingArguments` field, with the official fine-tuning
    defaults, plus the classification ones below.

    Defaults are the official ViT-B fine-tuning recipe except `layer_decay` (0.75, the official argument default;
    ViT-B uses 0.65): AdamW (0.9, 0.999), weight decay 0.05, base learning rate 5e-4 scaled by global batch / 256,
    5 warmup epochs, cosine to `min_lr` 1e-6, 100 epochs, label smoothing 0.1, Mixup 0.8 / CutMix 1.0. For linear
    probing set `linear_probe=True` with the official probe recipe (`maekit.training.recipes.LINEAR_PROBE`:
    `base_learning_rate=0.1, weight_decay=0.0, warmup_epochs=10, num_train_epochs=90, min_lr=0.0, mixup=0.0,
    cutmix=0.0, label_smoothing=0.0`), as `examples/linear_probe.py` does.

    Example:

    ```python
    from maekit.training import ClassificationTrainingArguments

    args = ClassificationTrainingArguments(output_dir="out", per_device_train_batch_size=128, layer_decay=0.65)
    assert abs(args.resolved_learning_rate(num_processes=8) - 5e-4 * 4) < 1e-12
    ```
    """

    output_dir: str = field(
        default="outputs/mae-finetune", metadata={"help": "Where checkpoints, logs and the model go."}
    )
    num_train_epochs: float = field(default=100.0, metadata={"help": "Epochs to train (ignored if max_steps > 0)."})
    base_learning_rate: float = field(
        default=5e-4, metadata={"help": "Base learning rate: lr = base_learning_rate * global batch / 256."}
    )
    min_lr: float = field(default=1e-6, metadata={"help": "Learning rate at the end of the cosine schedule."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (fine-tuning)."})
    warmup_epochs: float = field(default=5.0, metadata={"help": "Epochs of linear learning-rate warmup."})
    linear_probe: bool = field(
        default=False,
        metadata={"help": "Linear probing: freeze the encoder, BatchNorm + Linear head, LARS (else fine-tuning)."},
    )
    layer_decay: float = field(
        default=0.75, metadata={"help": "Layer-wise lr decay (fine-tuning): 0.65 ViT-B, 0.75 ViT-L/H; 1.0 = off."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the targets."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha; 0 disables mixup."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha; 0 disables CutMix."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (Mixup or CutMix)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of CutMix rather than Mixup when both are enabled."}
    )
    save_best_model: bool = field(
        default=True, metadata={"help": "Keep the model with the best eval top-1 accuracy in output_dir/best."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix must be >= 0, got {self.mixup!r} and {self.cutmix!r}.")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}.")

    def resolved_learning_rate(self, num_processes: int = 1) -> float:
        """As `TrainingArguments.resolved_learning_rate`, except that linear probing never scales the rate below the
        official batch's: `base_learning_rate * max(global batch, 16384) / 256`.

        LARS normalizes every layer's update by its gradient norm, so a rate scaled down to a small batch no longer
        moves the head in a short run (measured in docs/evaluation.md)."""
        if self.learning_rate is not None or not self.linear_probe:
            return super().resolved_learning_rate(num_processes)
        batch = max(self.global_batch_size(num_processes), LINEAR_PROBE_REFERENCE_BATCH)
        return self.base_learning_rate * batch / 256

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (Mixup or CutMix enabled with a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class SegmentationTrainingArguments(TrainingArguments):
    """Arguments of `SegmentationTrainer`: every `TrainingArguments` field, with the ADE20K UperNet recipe of the MAE
    paper as defaults (`maekit.segmentation.ADE20K_RECIPE`), plus the segmentation ones below.

    Recipe: AdamW with betas (0.9, 0.999), weight decay 0.05 (none on biases, norms and the cls token), layer-wise lr
    decay 0.65, learning rate 1e-4 at batch 16, 1,500 warmup iterations then polynomial decay (power 1.0) to 0 over
    160,000 iterations, evaluation with sliding 512² windows (stride 341) every 16,000 iterations, a checkpoint as
    often. The official global batch 16 is 2 images × 8 GPUs: on 8 processes pass `per_device_train_batch_size=2`.

    The learning rate follows maekit's scaling rule: `base_learning_rate=1.6e-3` × global batch / 256 is exactly the
    recipe's 1e-4 at batch 16, and scales linearly at other batches; `learning_rate` sets an absolute rate (e.g.
    `learning_rate=1e-4` to keep the recipe's rate at any batch, as mmsegmentation does). The model-side parts of
    the recipe (drop path 0.1, UperNet channels, crops) belong to the model and the transforms.

    Example:

    ```python
    from maekit.training import SegmentationTrainingArguments

    args = SegmentationTrainingArguments(output_dir="out")
    assert args.resolved_learning_rate(num_processes=1) == 1e-4 and args.lr_schedule == "poly"
    assert args.global_batch_size(num_processes=1) == 16 and args.max_steps == 160_000
    ```
    """

    output_dir: str = field(
        default="outputs/mae-segmentation", metadata={"help": "Where checkpoints, logs and the model go."}
    )
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Training crops per process and step (official: 2 per GPU on 8 GPUs = 16)."}
    )
    per_device_eval_batch_size: int = field(
        default=1,
        metadata={"help": "Evaluation images per process and forward (images of different sizes run one by one)."},
    )
    max_steps: int = field(default=160_000, metadata={"help": "Optimizer steps to train (official: 160k)."})
    base_learning_rate: float = field(
        default=1.6e-3,
        metadata={"help": "Base learning rate: lr = base_learning_rate * global batch / 256 (1e-4 at batch 16)."},
    )
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (fine-tuning)."})
    warmup_steps: int | None = field(
        default=1500, metadata={"help": "Optimizer steps of linear warmup (official: 1500 iterations)."}
    )
    lr_schedule: str = field(
        default="poly", metadata={"help": "Learning-rate schedule after the warmup: 'poly' (official) or 'cosine'."}
    )
    eval_steps: int | None = field(
        default=16_000, metadata={"help": "Evaluate every this many steps (official: 16k); always at the end."}
    )
    save_steps: int | None = field(
        default=16_000,
        metadata={"help": "Save a checkpoint every this many steps (official: 16k); always at the end."},
    )
    layer_decay: float = field(
        default=0.65, metadata={"help": "Layer-wise lr decay of the encoder (official ADE20K ViT-B: 0.65); 1.0 = off."}
    )
    eval_mode: str = field(
        default="slide",
        metadata={"help": f"Evaluation inference {_EVAL_MODES}: sliding windows (official) or the whole image."},
    )
    eval_crop_size: int = field(default=512, metadata={"help": "Sliding-window size in pixels (eval_mode 'slide')."})
    eval_stride: int = field(default=341, metadata={"help": "Sliding-window stride in pixels (eval_mode 'slide')."})
    save_best_model: bool = field(
        default=True, metadata={"help": "Keep the model with the best eval mean IoU in output_dir/best."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay!r}.")
        if self.eval_mode not in _EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {_EVAL_MODES}, got {self.eval_mode!r}.")
        _check_positive_int(self, ("eval_crop_size", "eval_stride"))
