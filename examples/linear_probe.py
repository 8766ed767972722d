"""Linear probing of a pretrained MAE encoder with the official recipe: frozen encoder, cls-token features,
`BatchNorm1d(affine=False) + Linear` head, LARS, warmup + cosine.

    python examples/linear_probe.py --model_name_or_path outputs/mae-default      # the pretrained demo, digits
    accelerate launch examples/linear_probe.py --model_name_or_path facebook/vit-mae-base --dataset_name imagenet-1k \
        --per_device_train_batch_size 512 --gradient_accumulation_steps 4       # 8 GPUs: the official batch 16384

Arguments as examples/finetune.py (`--help`); the defaults are the official probe recipe (`PROBE_DEFAULTS`: base
learning rate 0.1 scaled by batch / 256, weight decay 0, 10 warmup epochs, 90 epochs, no mixup, no label smoothing,
RandomResizedCrop + flip only), and the demo on the digits without data arguments (`DEMO_DEFAULTS`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # share examples/finetune.py's pieces

from finetune import parse_arguments, run  # noqa: E402

PROBE_DEFAULTS = dict(
    output_dir="outputs/mae-linear-probe",
    linear_probe=True,
    pooling="cls",
    drop_path_rate=0.0,
    base_learning_rate=0.1,
    weight_decay=0.0,
    warmup_epochs=10,
    num_train_epochs=90,
    min_lr=0.0,
    mixup=0.0,
    cutmix=0.0,
    label_smoothing=0.0,
    rand_augment=False,
    reprob=0.0,
)
DEMO_DEFAULTS = dict(
    output_dir="outputs/mae-linear-probe-default",
    per_device_train_batch_size=256,
    per_device_eval_batch_size=256,
    num_train_epochs=30,
    warmup_epochs=3,
    # LARS moves each weight by ~lr * 0.001 of its norm per step: 180 steps need a far larger rate than ImageNet's 7k.
    base_learning_rate=20.0,
    hflip_prob=0.0,  # mirrored digits are other glyphs
    crop_min_scale=0.5,
    logging_steps=10,
    save_total_limit=1,
)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return run(*parse_arguments(argv, DEMO_DEFAULTS, base_defaults=PROBE_DEFAULTS, recipes=False))


if __name__ == "__main__":
    main()
