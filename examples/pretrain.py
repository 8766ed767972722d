"""Pretrain a Masked Autoencoder on your images, on one CPU or many GPUs.

    python examples/pretrain.py                                   # a tiny MAE on the embedded digits, a few minutes
    python examples/pretrain.py --dataset_name path/to/images --preset vit-base-patch16 --norm_pix_loss true
    accelerate launch examples/pretrain.py --dataset_name imagenet-1k --preset vit-large-patch16 ...
    python examples/pretrain.py --dataset_name some/hub-dataset --streaming true --max_steps 100000 --warmup_steps 5000
    python examples/pretrain.py my_run.yaml                       # every argument from a JSON / YAML file

Arguments: the `ModelArguments` and `DataArguments` below and every `maekit.MAETrainingArguments` field (see
`--help`). Without `--dataset_name`/`--data_dir` the run is the demo: scikit-learn's handwritten digits (shipped with
the package, offline), a tiny model and a short recipe (`DEMO_DEFAULTS`); arguments you pass still win.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
import yaml
from transformers import HfArgumentParser, set_seed

from maekit import PRESETS, MAEConfig, MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.data import (
    MAEEvalTransform,
    MAEImageDataset,
    MAEIterableImageDataset,
    MAETrainTransform,
    load_default_dataset,
    load_image_dataset,
)

# A 4-block, 64-wide encoder on 32x32 images in 4x4 patches: learns the digits in minutes on two CPU cores.
DEMO_MODEL = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=256,
    decoder_hidden_size=64,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=256,
    image_size=32,
    patch_size=4,
)
DEMO_DEFAULTS = dict(
    output_dir="outputs/mae-default",
    per_device_train_batch_size=64,
    per_device_eval_batch_size=128,
    num_train_epochs=25,
    learning_rate=2e-3,
    warmup_epochs=2,
    logging_steps=20,
    save_total_limit=1,
    eval_on_start=True,
)
# With --streaming, the evaluation images are read once into memory: the first this many of the evaluation split.
STREAMING_EVAL_SAMPLES = 1000


@dataclass
class ModelArguments:
    preset: str | None = field(default=None, metadata={"help": f"Model size: one of {', '.join(PRESETS)}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a maekit / transformers vit_mae model (folder or Hub id)."}
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of patches removed (0.75)."})
    norm_pix_loss: bool | None = field(default=None, metadata={"help": "Regress per-patch normalized pixels."})
    image_size: int | None = field(default=None, metadata={"help": "Training resolution (new models only)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size (new models only)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or local image folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of image files (imagefolder)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction for evaluation when there is no validation split (with --streaming: this "
            "number of examples, the first of the stream)."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the data set instead of downloading it (needs --max_steps and --warmup_steps)."},
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "With --streaming: examples in the shuffle buffer (0: no shuffling)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": f"Use only this many evaluation images (with --streaming: {STREAMING_EVAL_SAMPLES} if unset)."
        },
    )
    crop_min_scale: float = field(default=0.2, metadata={"help": "Smallest RandomResizedCrop area (official 0.2)."})
    default_dataset: str = field(default="digits", metadata={"help": "Demo data: 'digits' or 'photos'."})


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, MAETrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, MAETrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        with open(argv[0]) as f:
            values = json.load(f) if argv[0].endswith(".json") else yaml.safe_load(f)
        if not values.get("dataset_name") and not values.get("data_dir"):
            values = {**DEMO_DEFAULTS, **values}
        return parser.parse_dict(values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    if data_args.dataset_name is None and data_args.data_dir is None:
        parser.set_defaults(**DEMO_DEFAULTS)  # the demo recipe, below anything given on the command line
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    return model_args, data_args, training_args


def build_model(args: ModelArguments) -> MAEForPreTraining:
    loss_overrides = {
        k: v for k, v in (("mask_ratio", args.mask_ratio), ("norm_pix_loss", args.norm_pix_loss)) if v is not None
    }
    shape_overrides = {
        k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size)) if v is not None
    }
    if args.model_name_or_path is not None:
        if args.preset is not None or shape_overrides:
            raise ValueError(
                "--model_name_or_path takes its size from the checkpoint; drop --preset/--image_size/--patch_size."
            )
        return MAEForPreTraining.from_pretrained(args.model_name_or_path, **loss_overrides)
    if args.preset is not None:
        config = MAEConfig.from_preset(args.preset, **shape_overrides, **loss_overrides)
    else:
        config = MAEConfig(**{**DEMO_MODEL, **shape_overrides, **loss_overrides})
    return MAEForPreTraining(config)


def prepare_streams(train, evaluation, data_args: DataArguments, seed: int):
    """Shuffle the training stream (a buffer, reseeded every pass); read the first evaluation images into memory."""
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    if data_args.shuffle_buffer_size > 0:
        train = train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
    if evaluation is not None:
        # Undecoded records (file bytes or paths): the evaluation transform decodes them, as for the training set.
        first = list(evaluation.decode(False).take(data_args.max_eval_samples or STREAMING_EVAL_SAMPLES))
        evaluation = datasets.Dataset.from_list(first, features=evaluation.decode(False).features)
    return train, evaluation


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    demo = data_args.dataset_name is None and data_args.data_dir is None
    if demo and "OMP_NUM_THREADS" not in os.environ:
        # The demo's matrices are tiny: extra intra-op threads gain little and, on a busy machine, spin-wait for
        # cores (measured 5x slower with 2 threads on 2 shared cores). Set OMP_NUM_THREADS to choose yourself.
        torch.set_num_threads(1)
    set_seed(training_args.seed)  # the model's initialisation
    model = build_model(model_args)
    config = model.config
    if demo:
        if data_args.streaming:
            raise ValueError("--streaming needs --dataset_name or --data_dir (the demo data set is in memory).")
        train, evaluation = load_default_dataset(image_size=config.image_hw[0], source=data_args.default_dataset)
        dataset_name = None  # not a Hub dataset: no `datasets:` entry in the model card
    else:
        train_val_split = data_args.train_val_split
        if data_args.streaming and train_val_split is not None and float(train_val_split).is_integer():
            train_val_split = int(train_val_split)  # a number of examples (the parser reads a float)
        train, evaluation = load_image_dataset(
            data_args.dataset_name,
            data_dir=data_args.data_dir,
            config_name=data_args.dataset_config_name,
            split=data_args.train_split,
            streaming=data_args.streaming,
            image_column=data_args.image_column,
            train_val_split=train_val_split,
            seed=training_args.seed,
        )
        dataset_name = data_args.dataset_name
    if data_args.streaming:
        train, evaluation = prepare_streams(train, evaluation, data_args, training_args.seed)
    else:
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
        if evaluation is not None and data_args.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))

    size, channels = config.image_hw, config.num_channels
    train_transform = MAETrainTransform(size=size, scale=(data_args.crop_min_scale, 1.0), num_channels=channels)
    eval_transform = MAEEvalTransform(size=size, num_channels=channels)
    image_processor = eval_transform.image_processor
    image_processor.patch_size = config.patch_size
    column = data_args.image_column
    train_class = MAEIterableImageDataset if data_args.streaming else MAEImageDataset
    trainer = MAETrainer(
        model,
        training_args,
        train_class(train, train_transform, image_column=column, seed=training_args.seed),
        eval_dataset=None if evaluation is None else MAEImageDataset(evaluation, eval_transform, image_column=column),
        image_processor=image_processor,
        dataset_name=dataset_name,
    )
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Done: {result.metrics}. Model, card and reconstruction.png in {training_args.output_dir}")
    trainer.accelerator.end_training()  # trackers closed, process group torn down: every process exits cleanly


if __name__ == "__main__":
    main()
