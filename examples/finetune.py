"""Fine-tune a pretrained MAE encoder for image classification with the official recipe, on one CPU or many GPUs.

    python examples/finetune.py --model_name_or_path outputs/mae-default    # the pretrained demo MAE, on the digits
    python examples/finetune.py                                              # the same model from scratch
    accelerate launch examples/finetune.py --model_name_or_path facebook/vit-mae-base --dataset_name imagenet-1k \
        --per_device_train_batch_size 32 --gradient_accumulation_steps 4    # 8 GPUs: the official global batch 1024

Arguments: `ModelArguments`, `DataArguments` below and every `maekit.training.ClassificationTrainingArguments` field
(`--help`). For ViT-B/L/H encoders the defaults are the official FINETUNE.md recipe of that size (`RECIPES`); without
`--dataset_name`/`--data_dir` the run is the demo on scikit-learn's digits (offline) with `DEMO_DEFAULTS`. Arguments
you pass always win. The best model (eval top-1) is saved in `output_dir/best`, the last one in `output_dir`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, set_seed

from maekit import PRESETS, MAEConfig, MAEForImageClassification
from maekit.augment import FineTuneEvalTransform, FineTuneTrainTransform
from maekit.data import MAEImageDataset, load_default_dataset, load_image_dataset
from maekit.training import ClassificationTrainer, ClassificationTrainingArguments

# Official fine-tuning recipes (FINETUNE.md; global batch 1024, i.e. 32 per GPU x 4 accumulation x 8 GPUs).
RECIPES = {
    "vit-base-patch16": dict(base_learning_rate=5e-4, layer_decay=0.65, drop_path_rate=0.1, num_train_epochs=100),
    "vit-large-patch16": dict(base_learning_rate=1e-3, layer_decay=0.75, drop_path_rate=0.2, num_train_epochs=50),
    "vit-huge-patch14": dict(base_learning_rate=1e-3, layer_decay=0.75, drop_path_rate=0.3, num_train_epochs=50),
}
# The tiny model of examples/pretrain.py's demo (also the from-scratch model when no checkpoint is given).
DEMO_MODEL = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=4
)
DEMO_DEFAULTS = dict(
    output_dir="outputs/mae-finetune-default",
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    num_train_epochs=10,
    learning_rate=2e-3,
    warmup_epochs=1,
    layer_decay=0.75,
    drop_path_rate=0.1,
    # Milder than the ImageNet recipe for 32x32 digits in few epochs. Measured on the pretrained demo MAE: the full
    # recipe 79% (15 epochs); without Mixup/CutMix/erasing 84%; and with crops of at least half the digit 94%.
    crop_min_scale=0.5,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    hflip_prob=0.0,  # mirrored digits are other glyphs
    logging_steps=20,
    save_total_limit=1,
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained maekit / transformers vit_mae model (folder or Hub id)."}
    )
    preset: str | None = field(
        default=None, metadata={"help": f"Without a checkpoint: a new model of this size ({', '.join(PRESETS)})."}
    )
    pooling: str = field(default="mean", metadata={"help": "'mean' (+ fc_norm, official) or 'cls'."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth (0.1 B, 0.2 L, 0.3 H)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or local image folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of image files in class sub-folders."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (found automatically)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    train_val_split: float | None = field(
        default=None, metadata={"help": "Hold out this fraction for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation images."})
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest RandomResizedCrop area (official 0.08)."})
    hflip_prob: float = field(default=0.5, metadata={"help": "Horizontal-flip probability."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment m9, mstd 0.5 (official)."})
    reprob: float = field(default=0.25, metadata={"help": "Random-erasing probability (official 0.25)."})


def recipe_for(config: MAEConfig) -> dict:
    """The official recipe whose preset has this encoder's width and depth (empty for other sizes)."""
    for name, recipe in RECIPES.items():
        preset = PRESETS[name]
        if (config.hidden_size, config.num_hidden_layers) == (preset["hidden_size"], preset["num_hidden_layers"]):
            return recipe
    return {}


def parse_arguments(
    argv: list[str], demo_defaults: dict = DEMO_DEFAULTS, base_defaults: dict | None = None, recipes: bool = True
) -> tuple[ModelArguments, DataArguments, ClassificationTrainingArguments]:
    """Parse twice: once to find the data and the model, then with the defaults below `argv`: `base_defaults`, then
    the demo's (no data arguments), then the official recipe of the model's size (`recipes=True`)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, ClassificationTrainingArguments))
    if base_defaults:
        parser.set_defaults(**base_defaults)
    model_args, data_args, _ = parser.parse_args_into_dataclasses(argv)
    defaults = {}
    if data_args.dataset_name is None and data_args.data_dir is None:
        defaults.update(demo_defaults)
    if recipes and model_args.model_name_or_path is not None:
        defaults.update(recipe_for(MAEConfig.from_pretrained(model_args.model_name_or_path)))
    elif recipes and model_args.preset is not None:
        defaults.update(RECIPES.get(model_args.preset, {}))
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(argv)


def load_datasets(data_args: DataArguments, seed: int):
    """(train, eval, class names) as `datasets.Dataset`s: the demo digits or the given dataset."""
    if data_args.dataset_name is None and data_args.data_dir is None:
        train, evaluation = load_default_dataset(image_size=DEMO_MODEL["image_size"], source="digits", seed=seed)
    else:
        train, evaluation = load_image_dataset(
            data_args.dataset_name,
            data_dir=data_args.data_dir,
            config_name=data_args.dataset_config_name,
            split=data_args.train_split,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            train_val_split=data_args.train_val_split,
            seed=seed,
        )
    if evaluation is None:
        raise ValueError("No evaluation split: pass --train_val_split to hold out part of the training set.")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    column = data_args.label_column or next(
        (name for name, feature in train.features.items() if hasattr(feature, "names")), "label"
    )
    feature = train.features[column]
    names = feature.names if hasattr(feature, "names") else [str(i) for i in range(max(train[column]) + 1)]
    return train, evaluation, names


def build_model(model_args: ModelArguments, labels: list[str]) -> MAEForImageClassification:
    overrides = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pooling=model_args.pooling,
        drop_path_rate=model_args.drop_path_rate,
    )
    if model_args.model_name_or_path is not None:
        return MAEForImageClassification.from_pretrained(model_args.model_name_or_path, **overrides)
    if model_args.preset is not None:
        return MAEForImageClassification(MAEConfig.from_preset(model_args.preset, **overrides))
    return MAEForImageClassification(MAEConfig(**DEMO_MODEL, **overrides))


def build_trainer(model_args, data_args, training_args, transform_kwargs: dict | None = None) -> ClassificationTrainer:
    """The model, the datasets with the official transforms, and the trainer."""
    demo = data_args.dataset_name is None and data_args.data_dir is None
    if demo and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny matrices: extra threads only spin on a busy machine (see pretrain.py)
    set_seed(training_args.seed)
    train, evaluation, labels = load_datasets(data_args, training_args.seed)
    model = build_model(model_args, labels)
    size, channels = model.config.image_hw, model.config.num_channels
    train_transform = FineTuneTrainTransform(
        size=size,
        scale=(data_args.crop_min_scale, 1.0),
        hflip_prob=data_args.hflip_prob,
        auto_augment=data_args.rand_augment,
        reprob=data_args.reprob,
        num_channels=channels,
        **(transform_kwargs or {}),
    )
    eval_transform = FineTuneEvalTransform(size=size, num_channels=channels)
    image_processor = eval_transform.image_processor
    image_processor.patch_size = model.config.patch_size
    columns = dict(image_column=data_args.image_column, label_column=data_args.label_column)
    return ClassificationTrainer(
        model,
        training_args,
        MAEImageDataset(train, train_transform, seed=training_args.seed, **columns),
        eval_dataset=MAEImageDataset(evaluation, eval_transform, **columns),
        image_processor=image_processor,
        dataset_name=None if demo else data_args.dataset_name,
    )


def run(model_args: ModelArguments, data_args: DataArguments, training_args: ClassificationTrainingArguments) -> dict:
    """Train, print the outcome and return the final metrics."""
    trainer = build_trainer(model_args, data_args, training_args)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        best = trainer.state["best_metric"]
        print(f"Done: {result.metrics}; best eval top-1 {best} at step {trainer.state['best_step']}.")
    trainer.accelerator.end_training()  # trackers closed, process group torn down: every process exits cleanly
    return result.metrics


def main(argv: list[str] | None = None) -> dict:
    return run(*parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
