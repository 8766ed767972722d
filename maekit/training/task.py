"""`Task`: what a training objective adds to the loop of `maekit.training.Trainer`.

The loop (data order, accumulation, schedule, logging, checkpoints, the Hub) knows no objective. A task says what a
batch's loss is, how the optimizer is built, what evaluation means and what is saved besides the model. Pretraining
(`PretrainingTask`) and classification (`ClassificationTask`) are tasks; a new objective is a new task class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .hub import ModelCard
    from .trainer import Trainer

__all__ = ["StepContext", "Task"]


@dataclass(frozen=True)
class StepContext:
    """Where a micro-batch sits in the run.

    Args:
        step (`int`): the optimizer step (0-based) it belongs to.
        offset (`int`): the index of its first image within the step's global batch (the same on any number of
            processes, so per-image randomness drawn for the whole global batch can be sliced).
        global_batch_size (`int`): images in the step's global batch.
        device (`torch.device`): where the model runs.
    """

    step: int
    offset: int
    global_batch_size: int
    device: torch.device


class Task:
    """Base class of training objectives; override what differs. Every method gets the trainer, whose `args`,
    `accelerator`, datasets and `state` it may read.

    Attributes:
        name (`str`): progress-bar label and default tracker run name (`mae-{name}`).
        summary_metrics (`tuple[str, ...]`): logged metrics whose last values end `train()`'s metrics and the card.
    """

    name: str = "training"
    summary_metrics: tuple[str, ...] = ("loss", "eval_loss")

    def setup(self, trainer: Trainer) -> None:
        """Check the model and arguments, adjust the model (e.g. freeze it); called at the end of `Trainer.__init__`."""

    def default_collator(self, trainer: Trainer) -> Callable | None:
        """The training collate function when none is given (None: `maekit.data.collate_fn`)."""
        return None

    def create_optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters, at the peak learning rate `trainer.learning_rate`; groups may
        carry an `lr_scale` that the schedule multiplies in."""
        raise NotImplementedError

    def compute_loss(
        self, trainer: Trainer, model: torch.nn.Module, batch: dict, context: StepContext
    ) -> torch.Tensor:
        """The loss of one micro-batch (a scalar tensor, averaged over the micro-batch)."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Metrics on `trainer.eval_dataset`, the same on every process (every process calls it)."""
        raise NotImplementedError

    def after_evaluation(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Called after every evaluation (and where there is no evaluation set, at the evaluation points with empty
        `metrics`); returns further metrics to log with them (e.g. the best so far)."""
        return {}

    def after_resume(self, trainer: Trainer) -> None:
        """Called once `trainer.state` holds a checkpoint's state."""

    def resume_signature(self, trainer: Trainer) -> dict[str, Any]:
        """The settings of the objective a resumed run must share with its checkpoint (JSON values), e.g. the mask
        ratio: resuming with others would train another objective without saying so."""
        return {}

    @contextmanager
    def exported_state_dict(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> Iterator[dict]:
        """The state dict `save_pretrained` writes (a task may present the model differently while saving)."""
        yield state_dict

    def training_only_state(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs that the exported model folder does not hold as they are."""
        return {}

    def model_card(self, trainer: Trainer) -> ModelCard:
        """What the model card says about the trained model."""
        raise NotImplementedError
