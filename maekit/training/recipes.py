"""Recipes: the official fine-tuning and linear-probing hyper-parameters, and the offline demos' defaults.

Each recipe is a dict of argument names to values, applied by the example scripts below whatever the user passes.
"""

from __future__ import annotations

__all__ = [
    "DEMO_MODEL",
    "FINETUNE_DEMO",
    "FINETUNE_DIGITS",
    "FINETUNE_RECIPES",
    "LINEAR_PROBE",
    "LINEAR_PROBE_DEMO",
    "PRETRAIN_DEMO",
    "PRETRAIN_DIGITS",
    "finetune_recipe_for",
]

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

# `examples/pretrain.py` without data arguments: the demo model on the embedded digits.
PRETRAIN_DEMO = dict(
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

# The digits recipe (docs/results.md, "A recipe that matches raw pixels"): on top of the demos' defaults, a 6-block, 128-wide
# encoder pretrained for 2000 steps, then fine-tuned for only 100 steps without RandAugment. Pretraining + fine-tuning
# take about 7 CPU-minutes. `python benchmarks/digits_results.py --recipe digits` runs it against training from scratch
# with the same fine-tuning and against raw-pixel baselines; from the command line, pass these as arguments to
# examples/pretrain.py and examples/finetune.py (the commands are in docs/results.md).
PRETRAIN_DIGITS = dict(
    output_dir="outputs/mae-digits",
    config_overrides="hidden_size=128,num_hidden_layers=6,intermediate_size=512",
    max_steps=2000,
    warmup_steps=100,
    eval_steps=500,
)
FINETUNE_DIGITS = dict(
    output_dir="outputs/mae-digits-finetune",
    max_steps=100,
    warmup_steps=10,
    learning_rate=4e-3,
    rand_augment=False,
)

# Official fine-tuning recipes (FINETUNE.md; global batch 1024, i.e. 32 per GPU x 4 accumulation x 8 GPUs).
FINETUNE_RECIPES = {
    "vit-base-patch16": dict(base_learning_rate=5e-4, layer_decay=0.65, drop_path_rate=0.1, num_train_epochs=100),
    "vit-large-patch16": dict(base_learning_rate=1e-3, layer_decay=0.75, drop_path_rate=0.2, num_train_epochs=50),
    "vit-huge-patch14": dict(base_learning_rate=1e-3, layer_decay=0.75, drop_path_rate=0.3, num_train_epochs=50),
}

# `examples/finetune.py` without data arguments, on the digits. Milder augmentation than ImageNet's for 32x32 digits
# in few epochs (docs/results.md has what each choice measured).
FINETUNE_DEMO = dict(
    output_dir="outputs/mae-finetune-default",
    per_device_train_batch_size=64,
    per_device_eval_batch_size=256,
    num_train_epochs=10,
    learning_rate=2e-3,
    warmup_epochs=1,
    layer_decay=0.75,
    drop_path_rate=0.1,
    crop_min_scale=0.5,
    mixup=0.0,
    cutmix=0.0,
    reprob=0.0,
    hflip_prob=0.0,  # mirrored digits are other glyphs
    logging_steps=20,
    save_total_limit=1,
)

# The official linear-probing recipe (LINPROBE.md): frozen encoder, cls token, BatchNorm + Linear head, LARS.
LINEAR_PROBE = dict(
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

# `examples/linear_probe.py` without data arguments, on the digits. LARS moves each weight by about lr * 0.001 of its
# norm per step: 180 steps need a larger rate than ImageNet's 7,000 (6.4).
LINEAR_PROBE_DEMO = dict(
    output_dir="outputs/mae-linear-probe-default",
    per_device_train_batch_size=256,
    per_device_eval_batch_size=256,
    num_train_epochs=30,
    warmup_epochs=3,
    learning_rate=20.0,
    hflip_prob=0.0,
    crop_min_scale=0.5,
    logging_steps=10,
    save_total_limit=1,
)


def finetune_recipe_for(hidden_size: int, num_hidden_layers: int) -> dict:
    """The official fine-tuning recipe of the preset with this encoder width and depth (empty for other sizes)."""
    from ..configuration_mae import PRESETS

    for name, recipe in FINETUNE_RECIPES.items():
        if (hidden_size, num_hidden_layers) == (PRESETS[name]["hidden_size"], PRESETS[name]["num_hidden_layers"]):
            return recipe
    return {}
