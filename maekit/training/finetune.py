"""`ClassificationTrainer`: fine-tuning and linear probing of an `MAEForImageClassification` with Accelerate.

It is `MAETrainer` with a classification loss, optimizer and evaluation: the data order, accumulation, the per-step
warmup + cosine schedule (times each group's `lr_scale`), logging, checkpoints and resuming are the pretraining
trainer's. Two recipes of the official code:

- fine-tuning (`linear_probe=False`): every parameter trains; AdamW over layer-wise decayed groups
  (`param_groups_layer_decay`), Mixup / CutMix soft targets with label smoothing (`MixupCollator`), or label smoothing
  alone, and the drop path of `config.drop_path_rate`;
- linear probing (`linear_probe=True`): the encoder is frozen (and kept in eval mode), the head is replaced by the
  official `BatchNorm1d(affine=False) + Linear` (`LinearProbeHead`) and trained with `LARS`.

After every evaluation, top-1 / top-5 accuracy and the loss on the evaluation set are gathered over all processes;
the best model by top-1 is kept in `output_dir/best` (a plain `MAEForImageClassification`: a probe head is folded
into one linear layer when saved).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import BaseImageProcessor

from ..augment import Mixup, MixupCollator, one_hot_targets
from ..data import collate_fn
from ..evaluation import LinearProbeHead
from .arguments import MAETrainingArguments
from .lars import LARS
from .layer_decay import param_groups_layer_decay
from .optim import adamw
from .trainer import MAETrainer

__all__ = ["ClassificationTrainer", "ClassificationTrainingArguments", "fold_linear_probe_head"]

BEST_MODEL_DIR = "best"
BEST_RESULTS_NAME = "eval_results.json"


@dataclass
class ClassificationTrainingArguments(MAETrainingArguments):
    """Arguments of `ClassificationTrainer`: every `MAETrainingArguments` field, with the official fine-tuning
    defaults, plus the classification ones below.

    Defaults are the official ViT-B fine-tuning recipe except `layer_decay` (0.75, the official argument default;
    ViT-B uses 0.65): AdamW (0.9, 0.999), weight decay 0.05, base learning rate 5e-4 scaled by global batch / 256,
    5 warmup epochs, cosine to `min_lr` 1e-6, 100 epochs, label smoothing 0.1, Mixup 0.8 / CutMix 1.0. For linear
    probing set `linear_probe=True` with the official probe recipe: `base_learning_rate=0.1, weight_decay=0.0,
    warmup_epochs=10, num_train_epochs=90, min_lr=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0`
    (`examples/linear_probe.py` does). `num_reconstruction_images` is not used.

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
    num_reconstruction_images: int = field(default=0, metadata={"help": "Not used by classification."})
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

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (Mixup or CutMix enabled with a non-zero probability)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def fold_linear_probe_head(head: LinearProbeHead) -> nn.Linear:
    """The `nn.Linear` equal to a trained `LinearProbeHead` in eval mode (its batch norm folded into the weights).

    `W (x - mean) / sqrt(var + eps) + b = (W / sqrt(var + eps)) x + (b - W mean / sqrt(var + eps))`, so the result
    loads into the `head` of a plain `MAEForImageClassification`.
    """
    norm, linear = head[0], head[1]
    scale = (norm.running_var + norm.eps).rsqrt()  # (hidden,)
    folded = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.bias - folded.weight @ norm.running_mean)
    return folded


class ClassificationTrainer(MAETrainer):
    """Fine-tunes or linearly probes an `MAEForImageClassification` with the official recipes through `accelerate`.

    Args:
        model (`MAEForImageClassification`): the classifier, e.g.
            `MAEForImageClassification.from_pretrained(pretrained_dir, num_labels=..., drop_path_rate=0.1)`. For
            linear probing its head is replaced by a `LinearProbeHead` and everything else is frozen.
        args (`ClassificationTrainingArguments`): the training arguments.
        train_dataset (`torch.utils.data.Dataset`): map-style dataset of `{"pixel_values", "labels"}` items (e.g.
            `MAEImageDataset` with `FineTuneTrainTransform`).
        eval_dataset (`torch.utils.data.Dataset`, *optional*): labeled evaluation items (e.g. with
            `FineTuneEvalTransform`); without it there is no evaluation and no best model.
        image_processor (`MAEImageProcessor`, *optional*): saved next to the model (and the best model).
        data_collator (`Callable`, *optional*): training collate function; by default `MixupCollator` when
            `args.mixes`, else `maekit.data.collate_fn`. Evaluation always uses `collate_fn`.
        dataset_name (`str`, *optional*): the dataset's name, recorded in the model card.

    Example:

    ```python
    import tempfile

    import torch
    from maekit import MAEConfig, MAEForImageClassification
    from maekit.training import ClassificationTrainer, ClassificationTrainingArguments

    config = MAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    items = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        args = ClassificationTrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=4,
                                               warmup_steps=1, report_to="none", disable_tqdm=True)
        trainer = ClassificationTrainer(MAEForImageClassification(config), args, items, eval_dataset=items[:6])
        result = trainer.train()
        best = MAEForImageClassification.from_pretrained(f"{tmp}/best")
    assert result.global_step == 4 and 0.0 <= result.metrics["eval_acc1"] <= 100.0
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        args: ClassificationTrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        image_processor: BaseImageProcessor | None = None,
        data_collator: Callable | None = None,
        dataset_name: str | None = None,
    ):
        if not isinstance(args, ClassificationTrainingArguments):
            raise TypeError(f"args must be a ClassificationTrainingArguments, got {type(args).__name__}.")
        config = getattr(model, "config", None)
        num_labels = getattr(config, "num_labels", 0)
        if not isinstance(getattr(model, "head", None), nn.Module) or not hasattr(model, "mae") or num_labels < 1:
            raise TypeError(
                f"model must be an MAEForImageClassification with config.num_labels >= 1, got {type(model).__name__}"
                f" with num_labels={num_labels}."
            )
        if data_collator is None and args.mixes:
            data_collator = MixupCollator(
                Mixup(
                    num_labels,
                    mixup_alpha=args.mixup,
                    cutmix_alpha=args.cutmix,
                    prob=args.mixup_prob,
                    switch_prob=args.mixup_switch_prob,
                    label_smoothing=args.label_smoothing,
                )
            )
        if args.linear_probe:
            # Official linear probing: only the head trains; the features are normalized by a non-affine BatchNorm.
            if not isinstance(model.head, LinearProbeHead):
                model.head = LinearProbeHead(config.hidden_size, num_labels)
            for name, param in model.named_parameters():
                param.requires_grad = name.startswith("head.")
        super().__init__(model, args, train_dataset, eval_dataset, image_processor, data_collator, dataset_name)
        self.task_name = "linear-probing" if args.linear_probe else "fine-tuning"
        self.num_labels = num_labels
        self.state.update(best_metric=None, best_step=None)
        self._eval_loader = None

    # ------------------------------------------------------------------------------------------------------------------
    # Optimizer and loss

    def create_optimizer(self) -> torch.optim.Optimizer:
        """LARS over the head (linear probing) or AdamW over the layer-decay groups (fine-tuning).

        The groups' `lr_scale` (layer decay) multiplies the schedule's rate at every step.
        """
        args = self.args
        if args.linear_probe:
            return LARS(self.model.head.parameters(), lr=self.learning_rate, weight_decay=args.weight_decay)
        groups = param_groups_layer_decay(self.model, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
        return adamw(
            groups, learning_rate=self.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )

    def compute_loss(self, model: nn.Module, batch: dict, noise: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against the batch's soft targets (Mixup / CutMix) or its smoothed class indices.

        `noise` (the pretraining mask noise) is not used: the classifier sees every patch.
        """
        device = self.accelerator.device
        if self.args.linear_probe:  # a frozen encoder runs as at inference (no drop path / dropout)
            self.accelerator.unwrap_model(model).mae.eval()
        labels = batch["labels"].to(device, non_blocking=True)
        if labels.ndim == 1 and self.args.label_smoothing > 0:
            labels = one_hot_targets(labels, self.num_labels, self.args.label_smoothing)
        return model(pixel_values=batch["pixel_values"].to(device, non_blocking=True), labels=labels).loss

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation and the best model

    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy (in percent) over `eval_dataset`, gathered over all processes.

        The loader is sharded by `accelerator.prepare`; `gather_for_metrics` drops the samples that pad the last
        batch, so every image counts once whatever the number of processes. Top-5 is left out with under 5 classes.
        """
        if self.eval_dataset is None or len(self.eval_dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        accelerator = self.accelerator
        if self._eval_loader is None:
            loader = DataLoader(
                self.eval_dataset,
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=collate_fn,
                num_workers=self.args.dataloader_num_workers,
            )
            self._eval_loader = accelerator.prepare_data_loader(loader)
        model = self._model_for_inference()
        topk = (1, 5) if self.num_labels >= 5 else (1,)
        totals = torch.zeros(1 + len(topk), dtype=torch.float64, device=accelerator.device)  # loss, hits@k...
        count = 0
        model.eval()
        with torch.no_grad():
            for batch in self._eval_loader:
                labels = batch["labels"].to(accelerator.device)
                with accelerator.autocast():
                    logits = model(pixel_values=batch["pixel_values"].to(accelerator.device)).logits
                logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
                top = logits.topk(max(topk), dim=1).indices == labels[:, None]  # (N, maxk)
                totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
                for i, k in enumerate(topk):
                    totals[1 + i] += top[:, :k].any(dim=1).sum()
                count += labels.shape[0]
        metrics = {"eval_loss": totals[0].item() / count, "eval_acc1": 100.0 * totals[1].item() / count}
        if len(topk) == 2:
            metrics["eval_acc5"] = 100.0 * totals[2].item() / count
        return metrics

    def _evaluate_and_visualize(self, step: int) -> None:
        if self.eval_dataset is None:
            return
        metrics = self.evaluate()
        best = self.state["best_metric"]
        if best is None or metrics["eval_acc1"] > best:
            self.state.update(best_metric=metrics["eval_acc1"], best_step=step)
            if self.args.save_best_model:
                folder = self.output_dir / BEST_MODEL_DIR
                self._save_model(folder)
                if self.accelerator.is_main_process:
                    (folder / BEST_RESULTS_NAME).write_text(json.dumps({**metrics, "step": step}, indent=2))
        self._log({**metrics, "best_eval_acc1": self.state["best_metric"]}, step)
        progress = getattr(self, "_progress", None)
        if progress is not None:  # the accuracy stays on the progress bar next to the training loss
            self._monitor_postfix["eval_acc1"] = f"{metrics['eval_acc1']:.2f}"
            progress.set_postfix(**self._monitor_postfix, refresh=False)

    def _last_metrics(self) -> dict[str, float]:
        last = {}
        for entry in self.state["log_history"]:
            for key in ("loss", "eval_loss", "eval_acc1", "eval_acc5", "best_eval_acc1"):
                if key in entry:
                    last[key] = entry[key]
        return last

    def _load_checkpoint(self, checkpoint: str) -> None:
        super()._load_checkpoint(checkpoint)  # restores the log history, from which the best evaluation is found
        evaluations = [entry for entry in self.state["log_history"] if "eval_acc1" in entry]
        best = max(evaluations, key=lambda entry: entry["eval_acc1"], default=None)
        self.state.update(
            best_metric=None if best is None else best["eval_acc1"], best_step=None if best is None else best["step"]
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Saving

    @contextmanager
    def _exported_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> Iterator[dict]:
        """A probe head is saved folded into a plain linear layer, so the folder reloads as a classifier."""
        with _exportable_head(model, state_dict) as exported:
            yield exported

    def create_model_card(self) -> Path:
        """Write `output_dir/README.md`: what was trained, the final and best evaluation metrics, the recipe."""
        args, spe = self.args, self.steps_per_epoch
        recipe = "linear probing (frozen encoder, LARS)" if args.linear_probe else "fine-tuning (AdamW, layer decay)"
        hyperparameters = {
            "learning_rate": self.learning_rate,
            "global_batch_size": self.global_batch_size,
            "epochs": args.total_steps(spe) / spe,
            "warmup_steps": args.resolved_warmup_steps(spe),
            "weight_decay": args.weight_decay,
            "layer_decay": None if args.linear_probe else args.layer_decay,
            "label_smoothing": args.label_smoothing,
            "mixup / cutmix": f"{args.mixup} / {args.cutmix}" if args.mixes else None,
            "drop_path_rate": self.model.config.drop_path_rate,
            "seed": args.seed,
        }
        results = {"global_step": self.state["global_step"], **self._last_metrics()}
        if self.state["best_step"] is not None:
            results["best_step"] = self.state["best_step"]
        name = args.hub_model_id or self.output_dir.name
        lines = [
            "---",
            "library_name: maekit",
            "pipeline_tag: image-classification",
            *([f"datasets:\n- {self.dataset_name}"] if self.dataset_name else []),
            "tags:\n- maekit\n- mae\n- image-classification",
            "---",
            "",
            f"# {name}",
            "",
            f"An MAE ViT encoder (depth {self.model.config.num_hidden_layers}, width {self.model.config.hidden_size}) "
            f"with a {self.num_labels}-class head, trained by {recipe} with "
            "[maekit](https://github.com/maekit/maekit)"
            f"{f' on `{self.dataset_name}`' if self.dataset_name else ''}.",
            "",
            "```python",
            "from maekit import MAEForImageClassification",
            "",
            f'model = MAEForImageClassification.from_pretrained("{name}")',
            "```",
            "",
            "| metric | value |",
            "|---|---|",
            *(
                f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
                for key, value in results.items()
            ),
            "",
            "| hyper-parameter | value |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in hyperparameters.items() if value is not None),
            "",
        ]
        path = self.output_dir / "README.md"
        path.write_text("\n".join(lines))
        return path


@contextmanager
def _exportable_head(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the state dict to save; while inside, a `LinearProbeHead` is swapped for its folded `nn.Linear`."""
    probe = getattr(model, "head", None)
    if not isinstance(probe, LinearProbeHead):
        yield state_dict
        return
    trained = LinearProbeHead(probe[1].in_features, probe[1].out_features)
    trained.load_state_dict(
        {key[len("head.") :]: value for key, value in state_dict.items() if key.startswith("head.")}
    )
    model.head = fold_linear_probe_head(trained)
    try:
        exported = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
        yield {**exported, "head.weight": model.head.weight.detach(), "head.bias": model.head.bias.detach()}
    finally:
        model.head = probe
