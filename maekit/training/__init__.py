"""Pretraining with Accelerate: `MAETrainer`, its arguments, the optimizer groups and the learning-rate schedule."""

from .arguments import MAETrainingArguments
from .lars import LARS
from .layer_decay import param_groups_layer_decay
from .optim import create_optimizer, param_groups_weight_decay
from .schedule import cosine_lr_with_warmup
from .trainer import MAETrainer, NonFiniteLossError, find_latest_checkpoint

__all__ = [
    "LARS",
    "MAETrainer",
    "MAETrainingArguments",
    "NonFiniteLossError",
    "cosine_lr_with_warmup",
    "create_optimizer",
    "find_latest_checkpoint",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
]
