"""Linear probing of a pretrained MAE encoder with the official recipe: frozen encoder, cls-token features,
`BatchNorm1d(affine=False) + Linear` head, LARS, warmup + cosine.

    python examples/linear_probe.py --model_name_or_path outputs/mae-default      # the pretrained demo, digits
    accelerate launch examples/linear_probe.py --model_name_or_path facebook/vit-mae-base --dataset_name imagenet-1k \
        --per_device_train_batch_size 512 --gradient_accumulation_steps 4       # 8 GPUs: the official batch 16384

Arguments as examples/finetune.py (`--help`); the defaults are the official probe recipe
(`maekit.training.recipes.LINEAR_PROBE`: base learning rate 0.1 scaled by batch / 256, weight decay 0, 10 warmup
epochs, 90 epochs, no mixup, no label smoothing, RandomResizedCrop + flip only), and the demo on the digits without
data arguments (`recipes.LINEAR_PROBE_DEMO`).
"""

from __future__ import annotations

import sys

from maekit.training import ClassificationTrainingArguments
from maekit.training.recipes import LINEAR_PROBE as PROBE_DEFAULTS
from maekit.training.recipes import LINEAR_PROBE_DEMO as DEMO_DEFAULTS
from maekit.training.scripts import (
    ClassificationDataArguments,
    ClassifierModelArguments,
    parse_script_arguments,
    run_classification,
)

ARGUMENTS = (ClassifierModelArguments, ClassificationDataArguments, ClassificationTrainingArguments)


def parse_arguments(
    argv: list[str], demo_defaults: dict = DEMO_DEFAULTS, base_defaults: dict = PROBE_DEFAULTS
) -> tuple:
    """Defaults: the official probe recipe, then the demo's (no data arguments); what `argv` says wins."""
    return parse_script_arguments(ARGUMENTS, argv, demo_defaults, base_defaults, description=__doc__)


def main(argv: list[str] | None = None) -> dict:
    return run_classification(*parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
