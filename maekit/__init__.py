"""maekit: Masked Autoencoders (He et al., 2021) with a Hugging Face-native API.

Importing maekit registers its classes with transformers' Auto classes.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTMAEConfig,
)

from .compat import fix_auto_backbone_local_folders
from .configuration_backbone import MAEBackboneConfig
from .configuration_mae import PRESETS, MAEConfig
from .image_processing_mae import MAEImageProcessor
from .modeling_backbone import MAEBackbone
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEForPreTrainingOutput,
    MAEImageClassifierOutput,
    MAEModel,
    MAEModelOutput,
    MAEPreTrainedModel,
    patchify,
    unpatchify,
)

# Training (Accelerate, tqdm, the Hub client) is imported when first used: `import maekit` stays light.
_TRAINING_NAMES = (
    "ClassificationTrainer",
    "ClassificationTrainingArguments",
    "KNNMonitor",
    "MAETrainer",
    "MAETrainingArguments",
    "SegmentationTrainer",
    "SegmentationTrainingArguments",
)


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_TRAINING_NAMES})


__version__ = "0.1.0.dev0"

__all__ = [
    "PRESETS",
    "ClassificationTrainer",
    "ClassificationTrainingArguments",
    "KNNMonitor",
    "MAEBackbone",
    "MAEBackboneConfig",
    "MAEConfig",
    "MAEForImageClassification",
    "MAEForPreTraining",
    "MAEForPreTrainingOutput",
    "MAEImageProcessor",
    "MAEModel",
    "MAEImageClassifierOutput",
    "MAEModelOutput",
    "MAEPreTrainedModel",
    "MAETrainer",
    "MAETrainingArguments",
    "SegmentationTrainer",
    "SegmentationTrainingArguments",
    "patchify",
    "unpatchify",
]

AutoConfig.register(MAEConfig.model_type, MAEConfig, exist_ok=True)
AutoModel.register(MAEConfig, MAEModel, exist_ok=True)
AutoModelForPreTraining.register(MAEConfig, MAEForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MAEConfig, MAEForImageClassification, exist_ok=True)
AutoImageProcessor.register(MAEConfig, image_processor_classes={"pil": MAEImageProcessor}, exist_ok=True)
AutoConfig.register(MAEBackboneConfig.model_type, MAEBackboneConfig, exist_ok=True)
AutoBackbone.register(MAEBackboneConfig, MAEBackbone, exist_ok=True)
# Any maekit or transformers vit_mae folder is an MAE backbone (`AutoBackbone.register` insists that the config class is
# the model's own `config_class`; `MAEBackbone.from_pretrained` turns these configs into an `MAEBackboneConfig`).
AutoBackbone._model_mapping.register(MAEConfig, MAEBackbone, exist_ok=True)
AutoBackbone._model_mapping.register(ViTMAEConfig, MAEBackbone, exist_ok=True)
fix_auto_backbone_local_folders()
