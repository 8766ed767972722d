"""Pretrain a Masked Autoencoder on your images, on one CPU or many GPUs.

    python examples/pretrain.py                                   # a tiny MAE on the embedded digits, a few minutes
    python examples/pretrain.py --dataset_name path/to/images --preset vit-base-patch16 --norm_pix_loss true
    python examples/pretrain.py --mask_strategy block --target hog   # the paper's design space (docs/results.md)
    accelerate launch examples/pretrain.py --dataset_name imagenet-1k --preset vit-large-patch16 ...
    python examples/pretrain.py --dataset_name some/hub-dataset --streaming true --max_steps 100000 --warmup_steps 5000
    python examples/pretrain.py --dataset_name 'shards/train-{0000..0099}.tar' --max_steps 100000 --warmup_steps 5000
    python examples/pretrain.py my_run.yaml                       # every argument from a JSON / YAML file

Arguments: `maekit.training.scripts.PretrainModelArguments` (model size, `--mask_ratio`, `--target`,
`--encoder_mask_token`, ...) and `PretrainDataArguments`, and every `maekit.MAETrainingArguments` field (`--help`),
among them `--mask_strategy` (random / block / grid, saved in the model's config). Without `--dataset_name`/`--data_dir` the run is the demo:
scikit-learn's handwritten digits (shipped with the package, offline), a tiny model and a short recipe
(`maekit.training.recipes.PRETRAIN_DEMO`); arguments you pass still win.
"""

from __future__ import annotations

import sys

from transformers import set_seed

from maekit import MAETrainer, MAETrainingArguments
from maekit.data import MAEImageDataset, MAEIterableImageDataset
from maekit.training.recipes import DEMO_MODEL
from maekit.training.recipes import PRETRAIN_DEMO as DEMO_DEFAULTS
from maekit.training.scripts import PretrainDataArguments as DataArguments
from maekit.training.scripts import PretrainModelArguments as ModelArguments
from maekit.training.scripts import (
    build_pretraining_model,
    is_demo,
    is_stream,
    load_datasets,
    parse_script_arguments,
    pretraining_transforms,
    use_few_threads_for_tiny_models,
)

__all__ = ["DEMO_DEFAULTS", "DEMO_MODEL", "DataArguments", "ModelArguments", "build_model", "main", "parse_arguments"]


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, MAETrainingArguments]:
    arguments = (ModelArguments, DataArguments, MAETrainingArguments)
    return parse_script_arguments(arguments, argv, DEMO_DEFAULTS, description=__doc__)


build_model = build_pretraining_model


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    use_few_threads_for_tiny_models(is_demo(data_args))
    set_seed(training_args.seed)  # the model's initialisation
    model = build_model(model_args)
    train, evaluation = load_datasets(data_args, training_args.seed, image_size=model.config.image_hw[0])
    train_transform, eval_transform = pretraining_transforms(model.config, data_args.crop_min_scale)
    column, seed = data_args.image_column, training_args.seed
    train_class = MAEIterableImageDataset if is_stream(train) else MAEImageDataset  # tar shards are streams too
    trainer = MAETrainer(
        model,
        training_args,
        train_class(train, train_transform, image_column=column, seed=seed),
        eval_dataset=None if evaluation is None else MAEImageDataset(evaluation, eval_transform, image_column=column),
        image_processor=eval_transform.image_processor,
        dataset_name=data_args.dataset_name,
    )
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"Done: {result.metrics}. Model, card and reconstruction.png in {training_args.output_dir}")
    trainer.accelerator.end_training()  # trackers closed, process group torn down: every process exits cleanly


if __name__ == "__main__":
    main()
