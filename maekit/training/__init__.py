"""Training with Accelerate: `MAETrainer` (pretraining), `ClassificationTrainer` (fine-tuning, linear probing), their
arguments, the `KNNMonitor`, the optimizer groups and the learning-rate schedule."""

from .arguments import MAETrainingArguments
from .finetune import ClassificationTrainer, ClassificationTrainingArguments, fold_linear_probe_head
from .lars import LARS
from .layer_decay import param_groups_layer_decay
from .monitor import KNNMonitor
from .optim import create_optimizer, param_groups_weight_decay
from .schedule import cosine_lr_with_warmup
from .trainer import MAETrainer, NonFiniteLossError, find_latest_checkpoint

__all__ = [
    "ClassificationTrainer",
    "ClassificationTrainingArguments",
    "KNNMonitor",
    "LARS",
    "MAETrainer",
    "MAETrainingArguments",
    "NonFiniteLossError",
    "cosine_lr_with_warmup",
    "create_optimizer",
    "find_latest_checkpoint",
    "fold_linear_probe_head",
    "param_groups_layer_decay",
    "param_groups_weight_decay",
]
