"""The building blocks of the example scripts (`examples/pretrain.py`, `finetune.py`, `linear_probe.py`): their
argument dataclasses, how defaults are layered (recipe < demo < what the user passes), the data sets, the models and
the transforms. The scripts only wire these together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser

from ..configuration_mae import PRESETS, TARGETS, MAEConfig
from ..data import (
    LABEL_COLUMN_NAMES,
    MAEEvalTransform,
    MAETrainTransform,
    find_column,
    load_default_dataset,
    load_image_dataset,
)
from .recipes import DEMO_MODEL, FINETUNE_RECIPES, finetune_recipe_for

__all__ = [
    "ClassificationDataArguments",
    "ClassifierModelArguments",
    "DataArguments",
    "PretrainDataArguments",
    "PretrainModelArguments",
    "build_classifier",
    "build_pretraining_model",
    "class_names",
    "classification_transforms",
    "demo_epilog",
    "finetune_recipe",
    "is_demo",
    "is_stream",
    "load_datasets",
    "parse_config_overrides",
    "parse_script_arguments",
    "pretraining_transforms",
    "run_classification",
    "use_few_threads_for_tiny_models",
]

# With --streaming, the evaluation images are read once into memory: the first this many of the evaluation split.
STREAMING_EVAL_SAMPLES = 1000


@dataclass
class PretrainModelArguments:
    preset: str | None = field(default=None, metadata={"help": f"Model size: one of {', '.join(PRESETS)}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a maekit / transformers vit_mae model (folder or Hub id)."}
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of patches removed (0.75)."})
    norm_pix_loss: bool | None = field(default=None, metadata={"help": "Regress per-patch normalized pixels."})
    target: str | None = field(
        default=None,
        metadata={"help": f"What the decoder regresses: one of {TARGETS} ('norm_pixel' is --norm_pix_loss true)."},
    )
    encoder_mask_token: bool | None = field(
        default=None,
        metadata={
            "help": "The encoder sees every patch, removed ones replaced by a learned token (SimMIM; the paper's "
            "Table 1(c)): slower, for ablations. The masking strategy is --mask_strategy (a training argument)."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Training resolution (new models only)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (new models only)."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Other MAEConfig fields of a new model, comma-separated: 'hidden_size=128,num_hidden_layers=6' "
            "(on the preset's or the demo's config; as transformers' run_mae.py)."
        },
    )


@dataclass
class ClassifierModelArguments:
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
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local dataset (folder of images, parquet, ...)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of image files (imagefolder)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (found automatically)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction for evaluation when there is no validation split (with --streaming: this "
            "number of examples, the first of the stream)."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Use only this many evaluation images (with --streaming: {STREAMING_EVAL_SAMPLES} if unset)."
        },
    )


@dataclass
class PretrainDataArguments(DataArguments):
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the data set instead of downloading it (needs --max_steps and --warmup_steps). Tar shards "
            "('train-{0000..0099}.tar') are always streamed."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={"help": "With --streaming or tar shards: examples in the shuffle buffer (0: no shuffling)."},
    )
    crop_min_scale: float = field(default=0.2, metadata={"help": "Smallest RandomResizedCrop area (official 0.2)."})
    default_dataset: str = field(default="digits", metadata={"help": "Demo data: 'digits' or 'photos'."})


@dataclass
class ClassificationDataArguments(DataArguments):
    crop_min_scale: float = field(default=0.08, metadata={"help": "Smallest RandomResizedCrop area (official 0.08)."})
    hflip_prob: float = field(default=0.5, metadata={"help": "Horizontal-flip probability."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment m9, mstd 0.5 (official)."})
    reprob: float = field(default=0.25, metadata={"help": "Random-erasing probability (official 0.25)."})


def is_demo(data_args: DataArguments) -> bool:
    """Whether the script runs its offline demo (no data set given)."""
    return data_args.dataset_name is None and data_args.data_dir is None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after every help line (as HfArgumentParser's), the description (a script's docstring) as written."""


def parse_script_arguments(
    dataclass_types: tuple[type, ...],
    argv: list[str],
    demo_defaults: dict[str, Any],
    base_defaults: dict[str, Any] | None = None,
    recipe_for_model: Any = None,
    description: str | None = None,
    epilog: str | None = None,
) -> tuple:
    """Parse a script's arguments (the command line, or a single JSON / YAML file), with defaults in layers:
    the dataclasses' own, then `base_defaults`, then the official recipe of the model's size (`recipe_for_model(model
    arguments) -> dict`), then `demo_defaults` when no data set is given; whatever `argv` says wins over all.
    `description` (e.g. the script's docstring) heads `--help` and `epilog` (e.g. `demo_epilog(demo_defaults)`) ends
    it, both as written."""
    parser = HfArgumentParser(dataclass_types, description=description, epilog=epilog, formatter_class=_HelpFormatter)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0]) as f:
            given = json.load(f) if argv[0].endswith(".json") else yaml.safe_load(f)
        parsed = parser.parse_dict(given, allow_extra_keys=False)
        return parser.parse_dict(
            {**_layered_defaults(parsed, demo_defaults, base_defaults, recipe_for_model), **given}
        )
    if base_defaults:
        parser.set_defaults(**base_defaults)
    parsed = parser.parse_args_into_dataclasses(argv)
    parser.set_defaults(**_layered_defaults(parsed, demo_defaults, base_defaults, recipe_for_model))
    return parser.parse_args_into_dataclasses(argv)


def demo_epilog(demo_defaults: dict[str, Any]) -> str:
    """A `--help` epilog saying which defaults the offline demo replaces (`--help` shows the others), wrapped to the
    terminal as argparse wraps its help, never between an option and its value.

    Example:

    ```python
    from maekit.training.scripts import demo_epilog

    text = demo_epilog({"max_steps": 600, "scale": [128, 128]})
    assert " ".join(text.split()).endswith("are replaced: --max_steps 600, --scale 128 128.")
    ```
    """
    options = [
        f"--{name} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
        for name, value in demo_defaults.items()
    ]
    text = "Without --dataset_name or --data_dir (the offline demo), these defaults are replaced: "
    text += ", ".join(option.replace(" ", "\0") for option in options) + "."  # textwrap never breaks at a NUL
    width = max(shutil.get_terminal_size().columns - 2, 40)  # argparse's width
    return textwrap.fill(text, width, break_on_hyphens=False).replace("\0", " ")


def _layered_defaults(parsed: tuple, demo_defaults, base_defaults, recipe_for_model) -> dict[str, Any]:
    model_args, data_args = parsed[0], parsed[1]
    defaults = dict(base_defaults or {})
    if recipe_for_model is not None:
        defaults.update(recipe_for_model(model_args))
    if is_demo(data_args):
        defaults.update(demo_defaults)
    return defaults


def finetune_recipe(model_args: ClassifierModelArguments) -> dict[str, Any]:
    """The official fine-tuning recipe of the model's size (from its checkpoint's config, or its preset)."""
    if model_args.model_name_or_path is not None:
        config = MAEConfig.from_pretrained(model_args.model_name_or_path)
        return finetune_recipe_for(config.hidden_size, config.num_hidden_layers)
    return FINETUNE_RECIPES.get(model_args.preset, {})


def use_few_threads_for_tiny_models(demo: bool) -> None:
    """The demos' matrices are tiny: extra intra-op threads gain little and, on a busy machine, spin-wait for cores
    instead of computing. Set OMP_NUM_THREADS to choose yourself."""
    if demo and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def is_stream(dataset: Any) -> bool:
    """Whether a loaded training set is a stream (`datasets.IterableDataset`, or tar shards, which are always read
    as one) rather than a map-style data set."""
    import datasets

    from ..shards import ShardedImageDataset

    return isinstance(dataset, (datasets.IterableDataset, ShardedImageDataset))


def load_datasets(data_args: DataArguments, seed: int, image_size: int = 32, labels: bool = False):
    """`(train, eval)` for a script: the demo data (no data set given), else `load_image_dataset`; trimmed to
    `max_*_samples`; for a stream (`streaming`, or tar shards, always streamed), the training stream shuffled (a
    buffer of `shuffle_buffer_size`) and the first evaluation images read into memory. With `labels=True` an
    evaluation split is required."""
    from ..shards import ShardedImageDataset

    streaming = getattr(data_args, "streaming", False)
    if is_demo(data_args):
        if streaming:
            raise ValueError("--streaming needs --dataset_name or --data_dir (the demo data set is in memory).")
        source = getattr(data_args, "default_dataset", "digits") if not labels else "digits"
        train, evaluation = load_default_dataset(image_size=image_size, source=source, seed=seed)
    else:
        split = data_args.train_val_split
        if streaming and split is not None and float(split).is_integer():
            split = int(split)  # a number of examples (the parser reads a float)
        train, evaluation = load_image_dataset(
            data_args.dataset_name,
            data_dir=data_args.data_dir,
            config_name=data_args.dataset_config_name,
            split=data_args.train_split,
            streaming=streaming,
            image_column=data_args.image_column,
            label_column=data_args.label_column,
            train_val_split=split,
            seed=seed,
            shuffle_buffer=getattr(data_args, "shuffle_buffer_size", 1000),
        )
    if isinstance(train, ShardedImageDataset) and not hasattr(data_args, "streaming"):
        raise ValueError(
            f"{data_args.dataset_name or data_args.data_dir!r} is tar shards, which are read as a stream; this script "
            "needs a map-style data set (an image folder, parquet files, a Hub id without streaming). Tar shards "
            "train with examples/pretrain.py."
        )
    if labels and evaluation is None:
        raise ValueError("No evaluation split: pass --train_val_split to hold out part of the training set.")
    if streaming or isinstance(train, ShardedImageDataset):
        return _prepare_streams(train, evaluation, data_args, seed)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _prepare_streams(train, evaluation, data_args: PretrainDataArguments, seed: int):
    """Shuffle the training stream (a buffer, reseeded every pass; tar shards shuffle themselves); read the first
    evaluation images into memory."""
    import datasets

    from ..shards import ShardedImageDataset, ShardReader

    if isinstance(train, ShardedImageDataset):
        if data_args.max_train_samples is not None:
            raise ValueError(
                "--max_train_samples does not apply to tar shards; name fewer shards instead (e.g. "
                "'train-{0000..0009}.tar')."
            )
    else:
        if data_args.max_train_samples is not None:
            train = train.take(data_args.max_train_samples)
        if data_args.shuffle_buffer_size > 0:
            train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    if evaluation is None:
        return train, None
    count = data_args.max_eval_samples or STREAMING_EVAL_SAMPLES
    if isinstance(evaluation, ShardedImageDataset):  # its first images, in shard order
        reader = ShardReader(
            evaluation.urls, shuffle_buffer=0, shuffle_shards=False, require_label=evaluation.has_labels
        )
        features = evaluation.features
        first = [{name: record[name] for name in features} for _, record in zip(range(count), reader)]
        reader.close()
        return train, datasets.Dataset.from_list(first, features=features)
    # Undecoded records (file bytes or paths): the evaluation transform decodes them, as for the training set.
    first = list(evaluation.decode(False).take(count))
    return train, datasets.Dataset.from_list(first, features=evaluation.decode(False).features)


def class_names(train, label_column: str | None = None) -> list[str]:
    """The class names of a labeled `datasets.Dataset` (its `ClassLabel` names, else "0", "1", ...), from the label
    column the datasets use (`maekit.data.find_column`)."""
    column = find_column(train.features, LABEL_COLUMN_NAMES, label_column, "label")
    if column is None:
        raise ValueError(
            f"No label column found among {list(train.features)}; pass label_column= (--label_column) to name it."
        )
    feature = train.features[column]
    return feature.names if hasattr(feature, "names") else [str(i) for i in range(max(train[column]) + 1)]


def build_pretraining_model(args: PretrainModelArguments):
    """A `MAEForPreTraining`: from a checkpoint, of a preset size, or the demo's tiny model."""
    from ..modeling_mae import MAEForPreTraining

    model_overrides = {
        k: v
        for k, v in (
            ("mask_ratio", args.mask_ratio),
            ("norm_pix_loss", args.norm_pix_loss),
            ("target", args.target),
            ("encoder_mask_token", args.encoder_mask_token),
        )
        if v is not None
    }
    shape_overrides = {
        k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size)) if v is not None
    }
    if args.config_overrides:
        fields = parse_config_overrides(args.config_overrides)
        if both := sorted(fields.keys() & (model_overrides.keys() | shape_overrides.keys())):
            raise ValueError(
                f"--config_overrides sets {', '.join(both)}, which have their own arguments: set them once."
            )
        shape_overrides.update(fields)
    if args.model_name_or_path is not None:
        if args.preset is not None or shape_overrides:
            raise ValueError(
                "--model_name_or_path takes its size from the checkpoint; drop "
                "--preset/--image_size/--patch_size/--config_overrides."
            )
        if args.target is not None or args.encoder_mask_token is not None:
            _check_same_layers(args.model_name_or_path, model_overrides)
        return MAEForPreTraining.from_pretrained(args.model_name_or_path, **model_overrides)
    if args.preset is not None:
        config = MAEConfig.from_preset(args.preset, **shape_overrides, **model_overrides)
    else:
        config = MAEConfig(**{**DEMO_MODEL, **shape_overrides, **model_overrides})
    return MAEForPreTraining(config)


def parse_config_overrides(text: str) -> dict[str, Any]:
    """`"hidden_size=128,norm_pix_loss=true"` -> `{"hidden_size": 128, "norm_pix_loss": True}`, each value of the type
    of that `MAEConfig` field (`PretrainedConfig.update_from_string`'s parsing)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or any("=" not in item for item in items):
        raise ValueError(f"--config_overrides must be 'field=value' pairs separated by commas, got {text!r}.")
    probe = MAEConfig(**DEMO_MODEL)
    try:
        probe.update_from_string(",".join(items))
    except (ValueError, TypeError) as err:
        raise ValueError(f"--config_overrides {text!r}: {err}") from None
    return {item.split("=", 1)[0]: getattr(probe, item.split("=", 1)[0]) for item in items}


def _check_same_layers(model_name_or_path: str, overrides: dict[str, Any]) -> None:
    """Refuse overrides that would change a checkpoint's layers (the HOG target's output size, a mask token moved
    between decoder and encoder): loading would silently drop trained weights and start new ones at random."""
    from ..targets import target_dim

    saved = MAEConfig.from_pretrained(model_name_or_path)
    wanted = MAEConfig.from_pretrained(model_name_or_path, **overrides)
    for name, old, new in (
        ("--target", target_dim(saved), target_dim(wanted)),
        ("--encoder_mask_token", saved.encoder_mask_token, wanted.encoder_mask_token),
    ):
        if old != new:
            raise ValueError(
                f"{name} changes the layers of {model_name_or_path} (target {saved.target!r}, encoder_mask_token "
                f"{saved.encoder_mask_token}): its decoder or mask token would start again at random. Start a new "
                "model (--preset, or no model argument for the demo's) to train with these settings."
            )


def build_classifier(args: ClassifierModelArguments, labels: list[str]):
    """A `MAEForImageClassification` for `labels`: from a pretrained checkpoint, of a preset size, or the demo's
    tiny encoder."""
    from ..modeling_mae import MAEForImageClassification

    overrides = dict(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pooling=args.pooling,
        drop_path_rate=args.drop_path_rate,
    )
    if args.model_name_or_path is not None:
        return MAEForImageClassification.from_pretrained(args.model_name_or_path, **overrides)
    if args.preset is not None:
        return MAEForImageClassification(MAEConfig.from_preset(args.preset, **overrides))
    encoder = {k: v for k, v in DEMO_MODEL.items() if not k.startswith("decoder_")}
    return MAEForImageClassification(MAEConfig(**encoder, **overrides))


def pretraining_transforms(config: MAEConfig, crop_min_scale: float) -> tuple[MAETrainTransform, MAEEvalTransform]:
    """The train / eval transforms for a model; the eval transform's image processor carries the patch size."""
    size, channels = config.image_hw, config.num_channels
    train = MAETrainTransform(size=size, scale=(crop_min_scale, 1.0), num_channels=channels)
    evaluation = MAEEvalTransform(size=size, num_channels=channels)
    evaluation.image_processor.patch_size = config.patch_size
    return train, evaluation


def classification_transforms(config: MAEConfig, data_args: ClassificationDataArguments):
    """The official fine-tuning train / eval transforms for a model."""
    from ..augment import FineTuneEvalTransform, FineTuneTrainTransform

    size, channels = config.image_hw, config.num_channels
    train = FineTuneTrainTransform(
        size=size,
        scale=(data_args.crop_min_scale, 1.0),
        hflip_prob=data_args.hflip_prob,
        auto_augment=data_args.rand_augment,
        reprob=data_args.reprob,
        num_channels=channels,
    )
    evaluation = FineTuneEvalTransform(size=size, num_channels=channels)
    evaluation.image_processor.patch_size = config.patch_size
    return train, evaluation


def run_classification(model_args: ClassifierModelArguments, data_args: ClassificationDataArguments, training_args):
    """Fine-tune or linearly probe (`training_args.linear_probe`) as `examples/finetune.py` and
    `examples/linear_probe.py` do: data, model, transforms, `ClassificationTrainer`; prints and returns the final
    metrics."""
    from transformers import set_seed

    from ..data import MAEImageDataset
    from .classification import ClassificationTrainer

    use_few_threads_for_tiny_models(is_demo(data_args))
    set_seed(training_args.seed)
    train, evaluation = load_datasets(data_args, training_args.seed, DEMO_MODEL["image_size"], labels=True)
    model = build_classifier(model_args, class_names(train, data_args.label_column))
    train_transform, eval_transform = classification_transforms(model.config, data_args)
    columns = dict(image_column=data_args.image_column, label_column=data_args.label_column)
    trainer = ClassificationTrainer(
        model,
        training_args,
        MAEImageDataset(train, train_transform, seed=training_args.seed, **columns),
        eval_dataset=MAEImageDataset(evaluation, eval_transform, **columns),
        image_processor=eval_transform.image_processor,
        dataset_name=data_args.dataset_name,
    )
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        state = trainer.state
        print(f"Done: {result.metrics}; best eval top-1 {state.best_metric} at step {state.best_step}.")
    trainer.accelerator.end_training()  # trackers closed, process group torn down: every process exits cleanly
    return result.metrics
