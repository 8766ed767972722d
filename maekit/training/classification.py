"""Fine-tuning and linear probing as a task of the training loop, and `ClassificationTrainer`, the loop with it.

Two recipes of the official code:

- fine-tuning (`linear_probe=False`): every parameter trains; AdamW over layer-wise decayed groups
  (`param_groups_layer_decay`), Mixup / CutMix soft targets with label smoothing (`Mixup`, drawn from (seed, step)),
  or label smoothing alone, and the drop path of `config.drop_path_rate`;
- linear probing (`linear_probe=True`): the encoder is frozen (and kept in eval mode), the head is replaced by the
  official `BatchNorm1d(affine=False) + Linear` (`LinearProbeHead`) and trained with `LARS`.

After every evaluation, top-1 / top-5 accuracy and the loss on the evaluation set are gathered over all processes;
the best model by top-1 is kept in `output_dir/best` (a plain `MAEForImageClassification`: a probe head is folded
into one linear layer when saved).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from ..augment import Mixup, one_hot_targets
from ..data import sample_rng
from ..evaluation import LinearProbeHead
from .arguments import ClassificationTrainingArguments
from .checkpointing import best_from_history, keep_best_model
from .hub import ModelCard, card_hyperparameters, card_results, card_title, public_dataset_name
from .lars import LARS
from .layer_decay import param_groups_layer_decay
from .optim import adamw
from .task import StepContext, Task
from .trainer import Trainer

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

__all__ = ["ClassificationTask", "ClassificationTrainer", "fold_linear_probe_head"]

# `sample_rng(seed, step, index)` streams above 2**32 are not samples: the mixing of a micro-batch is drawn from
# `sample_rng(seed, step, _MIXUP_STREAM + its offset in the global batch)`.
_MIXUP_STREAM = 2**32 + 16


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


class ClassificationTask(Task):
    """Image classification with the official fine-tuning or linear-probing recipe (`args.linear_probe`)."""

    summary_metrics = ("loss", "eval_loss", "eval_acc1", "eval_acc5", "best_eval_acc1")

    def __init__(self, linear_probe: bool = False):
        self.linear_probe = linear_probe
        self.name = "linear-probing" if linear_probe else "fine-tuning"
        self.num_labels = 0  # set by `setup`
        # Mixup / CutMix (set by `setup` when the arguments mix): applied to each micro-batch in `compute_loss` with
        # draws from (seed, step, position in the global batch), so a resumed run mixes as the interrupted one would
        # have (a collator in DataLoader workers draws from their seeds instead).
        self.mixup: Mixup | None = None

    def setup(self, trainer: Trainer) -> None:
        """Check the model; for linear probing, put the probe head on and freeze everything else."""
        model = trainer.model
        config = getattr(model, "config", None)
        self.num_labels = getattr(config, "num_labels", 0)
        if not isinstance(getattr(model, "head", None), nn.Module) or not hasattr(model, "mae") or self.num_labels < 1:
            raise TypeError(
                f"model must be an MAEForImageClassification with config.num_labels >= 1, got {type(model).__name__}"
                f" with num_labels={self.num_labels}."
            )
        if self.linear_probe:
            # Official linear probing: only the head trains; the features are normalized by a non-affine BatchNorm.
            if not isinstance(model.head, LinearProbeHead):
                model.head = LinearProbeHead(config.hidden_size, self.num_labels)
            for name, param in model.named_parameters():
                param.requires_grad = name.startswith("head.")
        args = trainer.args
        if args.mixes:
            self.mixup = Mixup(
                self.num_labels,
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                label_smoothing=args.label_smoothing,
            )

    def create_optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        """LARS over the head (linear probing) or AdamW over the layer-decay groups (fine-tuning).

        The groups' `lr_scale` (layer decay) multiplies the schedule's rate at every step.
        """
        args, model = trainer.args, trainer.model
        if self.linear_probe:
            return LARS(model.head.parameters(), lr=trainer.learning_rate, weight_decay=args.weight_decay)
        groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
        return adamw(
            groups,
            learning_rate=trainer.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    def compute_loss(self, trainer: Trainer, model: nn.Module, batch: dict, context: StepContext) -> torch.Tensor:
        """Cross-entropy against the batch's soft targets (Mixup / CutMix) or its smoothed class indices."""
        if self.linear_probe:  # a frozen encoder runs as at inference (no drop path / dropout)
            trainer.accelerator.unwrap_model(model).mae.eval()
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if self.mixup is not None and labels.ndim == 1:  # (a collator may have mixed already: soft targets)
            generator = sample_rng(trainer.args.seed, context.step, _MIXUP_STREAM + context.offset)
            pixel_values, labels = self.mixup(pixel_values, labels, generator)
        labels = labels.to(context.device, non_blocking=True)
        if labels.ndim == 1 and trainer.args.label_smoothing > 0:
            labels = one_hot_targets(labels, self.num_labels, trainer.args.label_smoothing)
        return model(pixel_values=pixel_values.to(context.device, non_blocking=True), labels=labels).loss

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy (in percent) over `eval_dataset`, gathered over all processes.

        `gather_for_metrics` drops the samples that pad the last batch, so every image counts once whatever the
        number of processes. Top-5 is left out with under 5 classes.
        """
        accelerator = trainer.accelerator
        if trainer.eval_dataset is None or len(trainer.eval_dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        model = trainer.model_for_inference()
        topk = (1, 5) if self.num_labels >= 5 else (1,)
        totals = torch.zeros(1 + len(topk), dtype=torch.float64, device=accelerator.device)  # loss, hits@k...
        count = 0
        model.eval()
        with torch.no_grad():
            for batch in trainer.sharded_eval_loader():
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

    def after_evaluation(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Keep the best model by top-1 in `output_dir/best` (with its `eval_results.json`)."""
        if "eval_acc1" not in metrics:
            return {}
        return {"best_eval_acc1": keep_best_model(trainer, step, metrics, "eval_acc1")}

    def after_resume(self, trainer: Trainer) -> None:
        """The best evaluation so far, from the restored log history."""
        best_from_history(trainer.state, "eval_acc1")

    def resume_signature(self, trainer: Trainer) -> dict:
        config = trainer.model.config
        return {"linear_probe": self.linear_probe, "num_labels": self.num_labels, "pooling": config.pooling}

    @contextmanager
    def exported_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> Iterator[dict]:
        """A probe head is saved folded into a plain linear layer, so the folder reloads as a classifier."""
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

    def training_only_state(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unfolded probe head (batch-norm statistics and the linear layer), which a resumed run trains on."""
        if not self.linear_probe:
            return {}
        return {key: value for key, value in state_dict.items() if key.startswith("head.")}

    def model_card(self, trainer: Trainer) -> ModelCard:
        args, config = trainer.args, trainer.model.config
        recipe = "linear probing (frozen encoder, LARS)" if args.linear_probe else "fine-tuning (AdamW, layer decay)"
        title = card_title(trainer)
        on = f" on `{trainer.dataset_name}`" if public_dataset_name(trainer) else ""
        results = card_results(trainer)
        return ModelCard(
            title=title,
            summary=(
                f"An MAE ViT encoder (depth {config.num_hidden_layers}, width {config.hidden_size}) with a "
                f"{self.num_labels}-class head, trained by {recipe} with [maekit](https://github.com/maekit/maekit){on}."
            ),
            usage=f'from maekit import MAEForImageClassification\n\nmodel = MAEForImageClassification.from_pretrained("{title}")',
            pipeline_tag="image-classification",
            tags=["maekit", "mae", "image-classification"],
            results=results,
            hyperparameters={
                **card_hyperparameters(trainer),
                "layer_decay": None if args.linear_probe else args.layer_decay,
                "label_smoothing": args.label_smoothing,
                "mixup / cutmix": f"{args.mixup} / {args.cutmix}" if args.mixes else None,
                "drop_path_rate": config.drop_path_rate,
            },
            dataset_name=public_dataset_name(trainer),
        )


class ClassificationTrainer(Trainer):
    """Fine-tunes or linearly probes an `MAEForImageClassification` with the official recipes through `accelerate`:
    `Trainer` with the `ClassificationTask`.

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
        data_collator (`Callable`, *optional*): training collate function (default `maekit.data.collate_fn`); with
            `args.mixes` the task mixes each micro-batch itself (Mixup / CutMix, reproducible from (seed, step)).
            Evaluation always uses `collate_fn`.
        dataset_name (`str`, *optional*): the dataset's Hub id, recorded in the model card (a local path is not).

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
        super().__init__(
            model,
            args,
            ClassificationTask(linear_probe=args.linear_probe),
            train_dataset,
            eval_dataset=eval_dataset,
            image_processor=image_processor,
            data_collator=data_collator,
            dataset_name=dataset_name,
        )
