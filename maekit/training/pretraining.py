"""MAE pretraining as a task of the training loop, and `MAETrainer`, the loop with that task.

Masks are reproducible: the mask noise of optimizer step `s` is drawn for the whole global batch from
`sample_rng(seed, s, ...)` with the model's `mask_strategy` (`maekit.masking.sample_mask_noise`) and sliced per process
and micro-batch, so it depends neither on the number of processes nor on a resume; evaluation uses a fixed mask per
evaluation image. `MAETrainingArguments.mask_strategy`, when set, is written into the model config before training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import sample_rng
from ..masking import sample_mask_noise
from ..visualize import reconstruction_grid
from .arguments import MAETrainingArguments
from .data_order import LOADER_STREAM
from .hub import ModelCard, card_hyperparameters, card_results, card_title, public_dataset_name
from .optim import create_optimizer
from .task import StepContext, Task
from .trainer import Trainer

if TYPE_CHECKING:
    from transformers import BaseImageProcessor

__all__ = ["MAETrainer", "PretrainingTask"]

logger = logging.getLogger(__name__)

RECONSTRUCTION_NAME = "reconstruction.png"
# `sample_rng(seed, epoch, index)` streams above 2**32 are not samples (maekit.data orders epochs with 2**32).
_TRAIN_MASK_STREAM, _EVAL_MASK_STREAM = 2**32 + 1, 2**32 + 2
TAGS = ["maekit", "mae", "masked-autoencoder", "self-supervised", "vision", "image-feature-extraction"]


class PretrainingTask(Task):
    """Masked-image reconstruction (the MAE objective): the model's own loss under reproducible masks; evaluation is
    the reconstruction loss with a fixed mask per image, and a grid of reconstructions is saved at every evaluation."""

    name = "pretraining"

    def __init__(self):
        self._noise_step: int | None = None
        self._noise: torch.Tensor | None = None

    def setup(self, trainer: Trainer) -> None:
        """`args.mask_strategy`, when set, becomes the model config's: the masks are drawn with it and every saved
        config (checkpoints, final model) says so."""
        strategy = trainer.args.mask_strategy
        if strategy is not None and trainer.model.config.mask_strategy != strategy:
            logger.info(
                f"mask_strategy={strategy!r} (training arguments) replaces the model config's "
                f"{trainer.model.config.mask_strategy!r}."
            )
            trainer.model.config.mask_strategy = strategy

    def create_optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        """AdamW over the weight-decay groups of the official recipe (no decay on biases and norms)."""
        args = trainer.args
        return create_optimizer(
            trainer.model,
            learning_rate=trainer.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    def compute_loss(
        self, trainer: Trainer, model: torch.nn.Module, batch: dict, context: StepContext
    ) -> torch.Tensor:
        """The reconstruction loss of a micro-batch under its slice of the step's mask noise."""
        if self._noise_step != context.step:  # (G, L) noise for the whole global batch of this step
            config = trainer.accelerator.unwrap_model(model).config
            generator = sample_rng(trainer.args.seed, context.step, _TRAIN_MASK_STREAM)
            self._noise = sample_mask_noise(
                config.mask_strategy, context.global_batch_size, config.grid_size, config.mask_ratio, generator
            )
            self._noise_step = context.step
        pixel_values = batch["pixel_values"].to(context.device, non_blocking=True)
        noise = self._noise[context.offset : context.offset + pixel_values.shape[0]].to(context.device)
        return model(pixel_values=pixel_values, noise=noise).loss

    def resume_signature(self, trainer: Trainer) -> dict:
        config = trainer.model.config
        fields = ("mask_ratio", "mask_strategy", "target", "encoder_mask_token", "drop_path_rate")
        return {name: getattr(config, name) for name in fields}

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Mean reconstruction loss over `eval_dataset` with fixed masks, gathered over all processes.

        Every process evaluates the same number of batches (its shard is padded with weight-0 repeats), so the result
        does not depend on the number of processes.
        """
        accelerator, dataset = trainer.accelerator, trainer.eval_dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset.")
        model = trainer.model_for_inference()
        unwrapped = accelerator.unwrap_model(model)
        num_eval, num_processes = len(dataset), accelerator.num_processes
        indices = [accelerator.process_index + i * num_processes for i in range(math.ceil(num_eval / num_processes))]
        weights = torch.tensor([float(i < num_eval) for i in indices], device=accelerator.device)
        indices = [i % num_eval for i in indices]
        loader = trainer.eval_loader(
            indices, generator=sample_rng(trainer.args.seed, _EVAL_MASK_STREAM, LOADER_STREAM)
        )
        total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        seen = 0
        model.eval()
        with torch.no_grad():
            for batch in loader:
                pixel_values = batch["pixel_values"].to(accelerator.device)
                size = pixel_values.shape[0]
                noise = self.eval_noise(trainer, indices[seen : seen + size], unwrapped.config)
                with accelerator.autocast():
                    out = model(pixel_values=pixel_values, noise=noise.to(accelerator.device))
                # Per-image losses from the model's own loss function, so padding can be weighted out.
                per_image = unwrapped.forward_loss(pixel_values, out.logits, out.mask, reduction="none")
                total += (per_image.double() * weights[seen : seen + size]).sum()
                seen += size
        total = accelerator.reduce(total, reduction="sum")
        return {"eval_loss": float(total.item() / num_eval)}

    @staticmethod
    def eval_noise(trainer: Trainer, indices: list[int], config) -> torch.Tensor:
        """The fixed mask noise `(len(indices), num_patches)` of evaluation images `indices` (the model's strategy)."""
        seed, strategy, grid, ratio = trainer.args.seed, config.mask_strategy, config.grid_size, config.mask_ratio
        return torch.cat(
            [sample_mask_noise(strategy, 1, grid, ratio, sample_rng(seed, _EVAL_MASK_STREAM, i)) for i in indices]
        )

    def after_evaluation(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        if trainer.args.num_reconstruction_images > 0:
            self.save_reconstructions(trainer, step)
        return {}

    def save_reconstructions(self, trainer: Trainer, step: int) -> Path | None:
        """Reconstruct the fixed first images of the eval set (train set if none) with fixed masks; save the grid
        as `output_dir/reconstructions/step-{step}.png` and `output_dir/reconstruction.png`, and send it to the
        trackers. Returns the path on the main process. A failure only warns: a figure never stops a run."""
        try:
            return self._save_reconstructions(trainer, step)
        except Exception as err:  # a side job (disk, PIL, a tracker): training goes on
            trainer.warn(f"Could not save the reconstructions of step {step}: {type(err).__name__}: {err}")
            return None

    def _save_reconstructions(self, trainer: Trainer, step: int) -> Path | None:
        accelerator = trainer.accelerator
        dataset = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
        if not hasattr(dataset, "__len__"):  # a stream and no eval set: no fixed images to show
            return None
        count = min(trainer.args.num_reconstruction_images, len(dataset))
        batch = trainer.data_collator([dataset[i] for i in range(count)])
        pixel_values = batch["pixel_values"].to(accelerator.device)
        model = trainer.model_for_inference()
        unwrapped = accelerator.unwrap_model(model)
        model.eval()
        noise = self.eval_noise(trainer, list(range(count)), unwrapped.config)
        with torch.no_grad(), accelerator.autocast():  # every process runs it: FSDP needs all ranks in a forward
            out = model(pixel_values=pixel_values, noise=noise.to(accelerator.device))
        if not accelerator.is_main_process:
            return None
        mean, std = trainer.image_statistics()
        grid = reconstruction_grid(
            pixel_values, out.logits, out.mask, unwrapped.config, image_mean=mean, image_std=std
        )
        folder = trainer.output_dir / "reconstructions"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step}.png"
        grid.save(path)
        grid.save(trainer.output_dir / RECONSTRUCTION_NAME)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"reconstructions": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"reconstructions": [grid]}, step=step)
        return path

    def model_card(self, trainer: Trainer) -> ModelCard:
        config, args = trainer.model.config, trainer.args
        (height, width), (p, q) = config.image_hw, config.patch_hw
        title = card_title(trainer)
        on = f" on `{trainer.dataset_name}`" if public_dataset_name(trainer) else ""
        images = {}
        if (trainer.output_dir / RECONSTRUCTION_NAME).is_file():
            images["Reconstructions"] = (
                "Columns: original, masked, reconstruction, reconstruction with the visible patches pasted back.",
                RECONSTRUCTION_NAME,
            )
        return ModelCard(
            title=title,
            summary=(
                "A Masked Autoencoder (He et al., 2021, [arXiv:2111.06377](https://arxiv.org/abs/2111.06377)) "
                f"pretrained with [maekit](https://github.com/maekit/maekit){on}: a ViT encoder (depth "
                f"{config.num_hidden_layers}, width {config.hidden_size}) on {height}x{width} images in {p}x{q} "
                f"patches, trained to reconstruct {config.mask_ratio:.0%} removed patches"
                f"{' (per-patch normalized pixel targets)' if config.norm_pix_loss else ''}."
            ),
            usage=(
                "from maekit import MAEForPreTraining, MAEModel\n\n"
                f'encoder = MAEModel.from_pretrained("{title}")  # features of all patches, no masking\n'
                f'mae = MAEForPreTraining.from_pretrained("{title}")  # encoder + decoder, for reconstructions'
            ),
            pipeline_tag="image-feature-extraction",
            tags=TAGS,
            results=card_results(trainer),
            hyperparameters={
                **card_hyperparameters(trainer),
                "base_learning_rate": None if args.learning_rate is not None else args.base_learning_rate,
                "optimizer": f"AdamW (betas=({args.adam_beta1}, {args.adam_beta2}), eps={args.adam_epsilon})",
            },
            dataset_name=public_dataset_name(trainer),
            images=images,
        )


class MAETrainer(Trainer):
    """Pretrains a `MAEForPreTraining` with the official recipe through `accelerate`: `Trainer` with the
    `PretrainingTask`.

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
        image_processor (`MAEImageProcessor`, *optional*): saved next to the model and in every checkpoint; its
            `image_mean`/`image_std` de-normalize the reconstructions (ImageNet statistics otherwise).
        data_collator (`Callable`, *optional*): turns a list of items into a batch; defaults to
            `maekit.data.collate_fn`.
        dataset_name (`str`, *optional*): the dataset's Hub id, recorded in the model card (a local path is not).
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
        checkpoint = MAEForPreTraining.from_pretrained(f"{tmp}/checkpoint-4")  # every checkpoint is a model folder
    assert result.global_step == 4
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: MAETrainingArguments,
        train_dataset: Dataset,
        eval_dataset: Dataset | None = None,
        image_processor: BaseImageProcessor | None = None,
        data_collator: Callable | None = None,
        dataset_name: str | None = None,
        monitor: Callable[[Trainer, int], dict[str, float]] | None = None,
    ):
        if not isinstance(args, MAETrainingArguments):
            raise TypeError(f"args must be a MAETrainingArguments, got {type(args).__name__}.")
        super().__init__(
            model,
            args,
            PretrainingTask(),
            train_dataset,
            eval_dataset=eval_dataset,
            image_processor=image_processor,
            data_collator=data_collator,
            dataset_name=dataset_name,
            monitor=monitor,
        )

    def save_reconstructions(self, step: int) -> Path | None:
        """Reconstruct the fixed first images of the eval set (train set if none) with fixed masks; save the grid
        as `output_dir/reconstructions/step-{step}.png` and `output_dir/reconstruction.png`, and send it to the
        trackers. Returns the path on the main process. A failure only warns: a figure never stops a run."""
        return self.task.save_reconstructions(self, step)
