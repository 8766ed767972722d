"""Fine-tune a pretrained MAE encoder for image classification with the official recipe, on one CPU or many GPUs.

    python examples/finetune.py --model_name_or_path outputs/mae-default    # the pretrained demo MAE, on the digits
    python examples/finetune.py                                              # the same model from scratch
    accelerate launch examples/finetune.py --model_name_or_path facebook/vit-mae-base --dataset_name imagenet-1k \
        --per_device_train_batch_size 32 --gradient_accumulation_steps 4    # 8 GPUs: the official global batch 1024

Arguments: `maekit.training.scripts.ClassifierModelArguments`, `ClassificationDataArguments` and every
`maekit.training.ClassificationTrainingArguments` field (`--help`). For ViT-B/L/H encoders the defaults are the
official FINETUNE.md recipe of that size (`maekit.training.recipes.FINETUNE_RECIPES`); without
`--dataset_name`/`--data_dir` the run is the demo on scikit-learn's digits (offline, `recipes.FINETUNE_DEMO`).
Arguments you pass always win. The best model (eval top-1) is saved in `output_dir/best`, the last one in
`output_dir`. `maekit.training.scripts.run_classification` does the wiring: data, model, transforms, trainer.
"""

from __future__ import annotations

import sys

from maekit.training import ClassificationTrainingArguments
from maekit.training.recipes import FINETUNE_DEMO as DEMO_DEFAULTS
from maekit.training.scripts import (
    ClassificationDataArguments,
    ClassifierModelArguments,
    finetune_recipe,
    parse_script_arguments,
    run_classification,
)

ARGUMENTS = (ClassifierModelArguments, ClassificationDataArguments, ClassificationTrainingArguments)


def parse_arguments(argv: list[str], demo_defaults: dict = DEMO_DEFAULTS, base_defaults: dict | None = None,
                    recipes: bool = True) -> tuple:  # fmt: skip
    """Defaults: `base_defaults`, then the official recipe of the model's size (`recipes=True`), then the demo's
    (no data arguments); what `argv` says wins."""
    recipe = finetune_recipe if recipes else None
    return parse_script_arguments(ARGUMENTS, argv, demo_defaults, base_defaults, recipe, description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    return run_classification(*parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
