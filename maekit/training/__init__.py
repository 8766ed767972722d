"""Training with Accelerate: one loop (`Trainer`) for every objective (`Task`): pretraining (`MAETrainer`,
`PretrainingTask`), fine-tuning and linear probing (`ClassificationTrainer`, `ClassificationTask`), semantic
segmentation (`SegmentationTrainer`, `SegmentationTask`); their arguments, the `KNNMonitor`, the optimizer groups, the
learning-rate schedules, checkpoints, the model card and the Hub."""

from .arguments import (
    ClassificationTrainingArguments,
    MAETrainingArguments,
    SegmentationTrainingArguments,
    TrainingArguments,
)
from .checkpointing import CheckpointWriteError, TrainerState, find_latest_checkpoint
from .classification import ClassificationTask, ClassificationTrainer, fold_linear_probe_head
from .hub import HubAccessError, ModelCard, write_model_card
from .lars import LARS
from .layer_decay import param_groups_layer_decay
from .monitor import KNNMonitor
from .nonfinite import NonFiniteLossError
from .optim import create_optimizer, param_groups_weight_decay
from .pretraining import MAETrainer, PretrainingTask
from .schedule import cosine_lr_with_warmup, lr_with_warmup, poly_lr_with_warmup
from .segmentation import SegmentationTask, SegmentationTrainer
from .task import StepContext, Task
from .trainer import Trainer

__all__ = [
    "LARS",
    "CheckpointWriteError",
    "ClassificationTask",
    "ClassificationTrainer",
    "ClassificationTrainingArguments",
    "HubAccessError",
    "KNNMonitor",
    "MAETrainer",
    "MAETrainingArguments",
    "ModelCard",
    "NonFiniteLossError",
    "PretrainingTask",
    "SegmentationTask",
    "SegmentationTrainer",
    "SegmentationTrainingArguments",
    "StepContext",
    "Task",
    "Trainer",
    "TrainerState",
    "TrainingArguments",
    "cosine_lr_with_warmup",
    "create_optimizer",
    "find_latest_checkpoint",
    "fold_linear_probe_head",
    "lr_with_warmup",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
    "poly_lr_with_warmup",
    "write_model_card",
]
