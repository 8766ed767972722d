"""Semantic segmentation as a task of the training loop, and `SegmentationTrainer`, the loop with it.

The ADE20K recipe of the MAE paper (`SegmentationTrainingArguments`): a UperNet on an MAE backbone
(`maekit.segmentation.upernet_from_pretrained`) trained end to end with AdamW over layer-wise decayed groups
(`param_groups_layer_decay` finds the encoder at `backbone.mae`), the loss of UperNet itself (cross-entropy with
the model's `loss_ignore_index`, plus the auxiliary FCN head's), and a poly schedule (`lr_schedule="poly"`).

Evaluation runs sliding-window or whole-image inference (`eval_mode`) on every image of `eval_dataset` at its own
size, the logits resized to its label map: each process scores its shard (images `process_index`,
`process_index + num_processes`, ...) into a confusion matrix, the matrices are summed over the processes, and mean
IoU, pixel accuracy and mean accuracy (in percent) come from the sum, so the result is the same on any number of
processes. The best model by mean IoU is kept in `output_dir/best`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import Dataset

from ..segmentation.inference import slide_inference, whole_inference
from ..segmentation.metrics import SegmentationMetric
from ..segmentation.transforms import segmentation_collate_fn
from .arguments import SegmentationTrainingArguments
from .checkpointing import best_from_history, keep_best_model
from .hub import ModelCard, card_hyperparameters, card_results, card_title, public_dataset_name
from .layer_decay import param_groups_layer_decay
from .optim import adamw
from .task import StepContext, Task
from .trainer import Trainer

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

__all__ = ["SegmentationEvaluation", "SegmentationTask", "SegmentationTrainer"]

TAGS = ["maekit", "mae", "image-segmentation", "semantic-segmentation", "upernet", "vision"]


@dataclass
class SegmentationEvaluation:
    """What one process's share of an evaluation adds up to; shares are summed over processes before `metrics`.

    Args:
        confusion (`torch.Tensor`): `(num_labels, num_labels)` int64 pixel counts, rows labels, columns predictions.
        loss_sum (`float`): cross-entropy of the (main head's) logits summed over the scored pixels.
    """

    confusion: torch.Tensor
    loss_sum: float

    def metrics(self, ignore_index: int) -> tuple[dict[str, float], dict[str, list[float | None]]]:
        """`eval_loss` (per scored pixel) and `eval_mean_iou`, `eval_pixel_accuracy`, `eval_mean_accuracy`; and the
        per-class IoU / accuracy (None for a class absent from both labels and predictions). All in percent."""
        metric = SegmentationMetric(self.confusion.shape[0], ignore_index)
        metric.confusion = self.confusion.long().cpu()
        scores = metric.compute()
        pixels = int(self.confusion.sum())
        metrics = {
            "eval_loss": self.loss_sum / pixels if pixels else math.nan,
            "eval_mean_iou": 100.0 * scores["mean_iou"],
            "eval_pixel_accuracy": 100.0 * scores["pixel_accuracy"],
            "eval_mean_accuracy": 100.0 * scores["mean_accuracy"],
        }
        per_class = {
            key: [None if math.isnan(value) else 100.0 * value for value in scores[key]]
            for key in ("per_class_iou", "per_class_accuracy")
        }
        return metrics, per_class


def _stacks(samples: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(pixel_values (B, 3, h, w), labels (B, H, W))`: the samples stacked when their sizes agree, else one by one."""
    same = len({(s["pixel_values"].shape, s["labels"].shape) for s in samples}) == 1
    if same:
        batch = segmentation_collate_fn([{"pixel_values": s["pixel_values"], "labels": s["labels"]} for s in samples])
        return [(batch["pixel_values"], batch["labels"])]
    return [(s["pixel_values"][None], s["labels"][None]) for s in samples]


class SegmentationTask(Task):
    """Semantic segmentation with a transformers segmentation model (UperNet on an `MAEBackbone`): the model's own
    loss on `{"pixel_values", "labels"}` batches, mIoU evaluation, the best model by mean IoU."""

    name = "segmentation"
    summary_metrics = (
        "loss",
        "eval_loss",
        "eval_mean_iou",
        "eval_pixel_accuracy",
        "eval_mean_accuracy",
        "best_eval_mean_iou",
    )

    def __init__(self):
        self.num_labels = 0  # set by `setup`
        self.ignore_index = 255  # the model's `loss_ignore_index`, set by `setup`
        self.last_per_class: dict[str, list[float | None]] = {}  # of the last evaluation

    def setup(self, trainer: Trainer) -> None:
        """Check the model (a segmentation model with `config.num_labels`, its ignore index) against the data."""
        config = getattr(trainer.model, "config", None)
        self.num_labels = getattr(config, "num_labels", 0)
        if self.num_labels < 2 or not hasattr(trainer.model, "backbone"):
            raise TypeError(
                "model must be a semantic segmentation model with a backbone and config.num_labels >= 2 (e.g. "
                f"maekit.segmentation.upernet_from_pretrained), got {type(trainer.model).__name__} with "
                f"num_labels={self.num_labels}."
            )
        self.ignore_index = getattr(config, "loss_ignore_index", 255)
        for name in ("train_dataset", "eval_dataset"):
            transform = getattr(getattr(trainer, name), "transform", None)
            ignored = getattr(transform, "ignore_index", self.ignore_index)
            if ignored != self.ignore_index:
                raise ValueError(
                    f"The {name}'s transform marks ignored pixels with {ignored}, the model's loss ignores "
                    f"{self.ignore_index} (config.loss_ignore_index): make them equal."
                )

    def default_collator(self, trainer: Trainer) -> Callable | None:
        """Same-size crops stacked into `{"pixel_values": (B, 3, H, W), "labels": (B, H, W)}`."""
        return segmentation_collate_fn

    def create_optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        """AdamW over the layer-decay groups (the encoder's blocks decayed, the pyramid and heads at the full rate).

        On more than one CUDA process, UperNet's BatchNorms become SyncBatchNorms first (as the official recipe);
        the state dict keeps the same names, so saved folders load as plain UperNet models."""
        args, accelerator, model = trainer.args, trainer.accelerator, trainer.model
        if accelerator.distributed_type == DistributedType.MULTI_GPU and accelerator.num_processes > 1:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root (the same parameters)
        self._check_evaluation_can_run(trainer)
        groups = param_groups_layer_decay(model, weight_decay=args.weight_decay, layer_decay=args.layer_decay)
        return adamw(
            groups,
            learning_rate=trainer.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    @staticmethod
    def _check_evaluation_can_run(trainer: Trainer) -> None:
        # Every process runs its own number of forwards on the unwrapped model: sharded parameters cannot do that.
        accelerator = trainer.accelerator
        plugin = accelerator.state.deepspeed_plugin
        if trainer.eval_dataset is not None and (
            accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)
        ):
            raise ValueError(
                "Segmentation evaluation runs each process's images through the whole (unwrapped) model, which FSDP "
                "and DeepSpeed ZeRO-3 shard; use DDP or ZeRO-1/2, or train without eval_dataset."
            )

    def compute_loss(self, trainer: Trainer, model: nn.Module, batch: dict, context: StepContext) -> torch.Tensor:
        """UperNet's loss: cross-entropy (ignoring `loss_ignore_index`) + `auxiliary_loss_weight` × the auxiliary
        head's."""
        pixel_values = batch["pixel_values"].to(context.device, non_blocking=True)
        labels = batch["labels"].to(context.device, non_blocking=True)
        return model(pixel_values=pixel_values, labels=labels).loss

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Loss, mean IoU, pixel accuracy and mean accuracy over `eval_dataset`, the confusion matrices of every
        process's shard summed with `accelerator.reduce` (the same result on any number of processes)."""
        accelerator = trainer.accelerator
        if trainer.eval_dataset is None or len(trainer.eval_dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        share = self.evaluate_shard(trainer, accelerator.process_index, accelerator.num_processes)
        totals = torch.cat([share.confusion.flatten().double(), torch.tensor([share.loss_sum], dtype=torch.float64)])
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        n = self.num_labels
        summed = SegmentationEvaluation(totals[: n * n].round().long().view(n, n), float(totals[-1]))
        metrics, self.last_per_class = summed.metrics(self.ignore_index)
        return metrics

    def evaluate_shard(self, trainer: Trainer, process_index: int, num_processes: int) -> SegmentationEvaluation:
        """The confusion matrix and summed loss of images `process_index::num_processes` of `eval_dataset`.

        Runs the unwrapped model (no collective calls: processes may run different numbers of forwards) with the
        arguments' inference (`eval_mode`, `eval_crop_size`, `eval_stride`), logits resized to the label maps."""
        args, accelerator = trainer.args, trainer.accelerator
        model = accelerator.unwrap_model(trainer.model_for_inference())
        indices = list(range(process_index, len(trainer.eval_dataset), num_processes))
        loader = trainer.eval_loader(indices, collate=list)  # sizes may differ: `_stacks` groups what can be stacked
        metric = SegmentationMetric(self.num_labels, self.ignore_index)
        loss_sum = 0.0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for samples in loader:
                    for pixel_values, labels in _stacks(samples):
                        pixel_values = pixel_values.to(accelerator.device)
                        labels = labels.to(accelerator.device).long()
                        with accelerator.autocast():
                            if args.eval_mode == "slide":
                                logits = slide_inference(
                                    model, pixel_values, args.eval_crop_size, args.eval_stride, labels.shape[-2:]
                                )
                            else:
                                logits = whole_inference(model, pixel_values, labels.shape[-2:])
                        logits = logits.float()  # (B, num_labels, H, W) at the labels' size
                        loss = nn.functional.cross_entropy(
                            logits, labels, ignore_index=self.ignore_index, reduction="sum"
                        )
                        loss_sum += loss.item()
                        metric.update(logits.argmax(dim=1), labels)
        finally:
            model.train(was_training)
        return SegmentationEvaluation(metric.confusion, loss_sum)

    def after_evaluation(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Keep the best model by mean IoU in `output_dir/best`, with its `eval_results.json` (metrics, step and
        per-class IoU / accuracy by class name)."""
        if not math.isfinite(metrics.get("eval_mean_iou", math.nan)):
            return {} if trainer.state.best_metric is None else {"best_eval_mean_iou": trainer.state.best_metric}
        names = trainer.model.config.id2label
        per_class = {
            key: {names.get(i, str(i)): value for i, value in enumerate(values)}
            for key, values in self.last_per_class.items()
        }
        return {"best_eval_mean_iou": keep_best_model(trainer, step, metrics, "eval_mean_iou", per_class)}

    def after_resume(self, trainer: Trainer) -> None:
        """The best evaluation so far, from the restored log history."""
        best_from_history(trainer.state, "eval_mean_iou")

    def resume_signature(self, trainer: Trainer) -> dict:
        return {"num_labels": trainer.model.config.num_labels}

    def model_card(self, trainer: Trainer) -> ModelCard:
        args, config = trainer.args, trainer.model.config
        backbone = getattr(config, "backbone_config", None)
        title = card_title(trainer)
        on = f" on `{trainer.dataset_name}`" if public_dataset_name(trainer) else ""
        encoder = (
            f"an MAE ViT encoder (depth {backbone.num_hidden_layers}, width {backbone.hidden_size}, patch "
            f"{backbone.patch_size})"
            if backbone is not None and hasattr(backbone, "num_hidden_layers")
            else "an MAE encoder"
        )
        results = card_results(trainer)
        usage = (
            "import maekit  # registers the MAE backbone with transformers\n"
            "from transformers import AutoModelForSemanticSegmentation, pipeline\n\n"
            f'model = AutoModelForSemanticSegmentation.from_pretrained("{title}")\n'
            f'segmenter = pipeline("image-segmentation", model="{title}")'
        )
        return ModelCard(
            title=title,
            summary=(
                f"A {type(trainer.model).__name__} ({self.num_labels} classes) on {encoder}, fine-tuned end to end "
                f"for semantic segmentation with [maekit](https://github.com/maekit/maekit){on}. Metrics (percent): "
                f"mean IoU, pixel accuracy and mean accuracy with "
                f"{'sliding-window' if args.eval_mode == 'slide' else 'whole-image'} inference."
            ),
            usage=usage,
            pipeline_tag="image-segmentation",
            tags=TAGS,
            results=results,
            hyperparameters={
                **card_hyperparameters(trainer),
                "layer_decay": args.layer_decay,
                "drop_path_rate": getattr(backbone, "drop_path_rate", None),
                "eval_mode": args.eval_mode,
                "eval_crop_size / stride": f"{args.eval_crop_size} / {args.eval_stride}"
                if args.eval_mode == "slide"
                else None,
            },
            dataset_name=public_dataset_name(trainer),
        )


class SegmentationTrainer(Trainer):
    """Fine-tunes a semantic segmentation model on an MAE backbone with the ADE20K recipe through `accelerate`:
    `Trainer` with the `SegmentationTask`.

    Args:
        model (`UperNetForSemanticSegmentation`): e.g. `maekit.segmentation.upernet_from_pretrained(pretrained_dir,
            id2label=..., drop_path_rate=0.1)`.
        args (`SegmentationTrainingArguments`): the training arguments.
        train_dataset (`torch.utils.data.Dataset`): map-style dataset of same-size `{"pixel_values", "labels"}`
            crops (e.g. `maekit.segmentation.SegmentationDataset` with `SegmentationTrainTransform`).
        eval_dataset (`torch.utils.data.Dataset`, *optional*): items of any size with labels at full size (e.g.
            `SegmentationDataset` with `SegmentationEvalTransform`); without it there is no evaluation and no best
            model.
        image_processor (*optional*): saved next to the model and in every checkpoint; the segmentation one
            (`maekit.segmentation.segmentation_image_processor`), so that `pipeline("image-segmentation")` loads the
            folders.
        data_collator (`Callable`, *optional*): training collate function (default:
            `maekit.segmentation.segmentation_collate_fn`).
        dataset_name (`str`, *optional*): the dataset's Hub id, recorded in the model card (a local path is not).

    Example:

    ```python
    import tempfile

    import torch
    from transformers import AutoModelForSemanticSegmentation, UperNetConfig, UperNetForSemanticSegmentation

    from maekit import MAEBackboneConfig
    from maekit.training import SegmentationTrainer, SegmentationTrainingArguments

    backbone = MAEBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=16)
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=3, hidden_size=16,
                                                         auxiliary_channels=8))
    items = [{"pixel_values": torch.randn(3, 32, 32), "labels": torch.randint(0, 3, (32, 32))} for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        args = SegmentationTrainingArguments(output_dir=tmp, per_device_train_batch_size=4, max_steps=2,
                                             warmup_steps=1, eval_mode="whole", report_to="none", disable_tqdm=True)
        result = SegmentationTrainer(model, args, items, eval_dataset=items[:2]).train()
        best = AutoModelForSemanticSegmentation.from_pretrained(f"{tmp}/best")
    assert result.global_step == 2 and 0.0 <= result.metrics["eval_mean_iou"] <= 100.0
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        args: SegmentationTrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        image_processor: BaseImageProcessor | None = None,
        data_collator: Callable | None = None,
        dataset_name: str | None = None,
    ):
        if not isinstance(args, SegmentationTrainingArguments):
            raise TypeError(f"args must be a SegmentationTrainingArguments, got {type(args).__name__}.")
        super().__init__(
            model,
            args,
            SegmentationTask(),
            train_dataset,
            eval_dataset=eval_dataset,
            image_processor=image_processor,
            data_collator=data_collator,
            dataset_name=dataset_name,
        )
