"""One pretraining step under the paper's design choices, against the official MAE step, in one process.

The contenders share the weights they have in common, see the same images, draw their masks every step as a trainer
does (`maekit.masking.sample_mask_noise` from a seeded generator), use the same AdamW, and are timed alternately:

- `mae`: the official design: random masks, the encoder sees the visible patches only, pixel target;
- `encoder mask token`: the encoder sees every patch, removed ones replaced by a mask token (paper Table 1(c); the
  paper's Table 2 reports the official design 2.8-4.1x faster to train for ViT-L/H);
- `hog target`: MaskFeat's HOG features as the target (the cost of computing them);
- `block masks`, `grid masks`: the cost of sampling those masks for the batch.

    python benchmarks/pretraining_variants.py --preset vit-small-patch16 --batch-size 8 --repeats 5
    python benchmarks/pretraining_variants.py --preset vit-tiny-patch16 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from common import (
    DTYPES,
    autocast,
    configure_threads,
    count_flops,
    format_table,
    machine_info,
    median,
    paired_ratio,
    parse_checked,
    record_command,
    time_alternating,
)
from train_step import make_optimizer, parse_overrides

from maekit import PRESETS, MAEConfig, MAEForPreTraining
from maekit.masking import sample_mask_noise

VARIANTS = {
    "mae": {},
    "encoder mask token": {"encoder_mask_token": True},
    "hog target": {"target": "hog"},
    "block masks": {"mask_strategy": "block"},
    "grid masks": {"mask_strategy": "grid"},
}
COLUMNS = ("variant", "dtype", "img/s", "ms/step", "best ms", "GFLOP/step", "vs mae")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-small-patch16", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES), help="bf16 = torch.autocast")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--config-overrides", default=None, help="extra MAEConfig fields, e.g. 'num_hidden_layers=2'")
    return parse_checked(parser, argv, positive=("batch_size", "image_size", "repeats"))


def make_step(
    model: MAEForPreTraining, pixel_values: torch.Tensor, device: torch.device, dtype: str, seed: int
) -> Callable[[], torch.Tensor]:
    """A closure running one full step, masks included: noise of the model's strategy drawn for the batch."""
    optimizer = make_optimizer(model, "fused" if device.type == "cpu" else "foreach")
    config, step_index = model.config, [0]

    def step() -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 100_003 + step_index[0])
        step_index[0] += 1
        noise = sample_mask_noise(
            config.mask_strategy, pixel_values.shape[0], config.grid_size, config.mask_ratio, generator
        )
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model(pixel_values=pixel_values, noise=noise.to(device)).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run(args: argparse.Namespace) -> dict:
    """Build the variants, time them alternately, and return a JSON-ready result (rows and settings)."""
    device = torch.device(args.device)
    threads = configure_threads(args.threads)
    torch.manual_seed(args.seed)
    base = dict(image_size=args.image_size, **parse_overrides(args.config_overrides))
    reference = MAEForPreTraining(MAEConfig.from_preset(args.preset, **base)).state_dict()
    models = {}
    for name in args.variants:
        model = MAEForPreTraining(MAEConfig.from_preset(args.preset, **base, **VARIANTS[name]))
        shared = {k: v for k, v in reference.items() if k in model.state_dict()}
        shared = {k: v for k, v in shared.items() if v.shape == model.state_dict()[k].shape}
        model.load_state_dict(shared, strict=False)  # same weights where they exist in both
        models[name] = model.to(device).train()
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)

    steps = {
        (name, dtype): make_step(model, pixel_values, device, dtype, args.seed)
        for dtype in args.dtype
        for name, model in models.items()
    }
    times = time_alternating(steps, args.repeats, args.warmup, device)
    rows = []
    for (name, dtype), seconds in times.items():
        gflop = count_flops(steps[(name, dtype)]) / 1e9
        row = {
            "variant": name,
            "dtype": dtype,
            "img/s": args.batch_size / median(seconds),
            "ms/step": median(seconds) * 1e3,
            "best ms": min(seconds) * 1e3,
            "GFLOP/step": gflop,
            "times_s": seconds,
        }
        if ("mae", dtype) in times:
            # Within each repeat (same load), median over repeats: > 1 means slower than the official step.
            row["vs mae"] = f"{paired_ratio(seconds, times['mae', dtype]):.2f}x"
        rows.append(row)
    return {
        "benchmark": "pretraining_variants",
        "settings": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "dtypes": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "variants": {name: VARIANTS[name] for name in args.variants},
            "config_overrides": parse_overrides(args.config_overrides),
        },
        "machine": {**machine_info(device), "threads": threads},
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    record_command(result, "pretraining_variants.py", argv, args.output)
    settings, machine = result["settings"], result["machine"]
    print(
        f"MAE pretraining step variants: {settings['preset']}, batch {settings['batch_size']}, "
        f"{settings['image_size']}², {machine['threads']} threads, {machine['processor']}, "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up ('vs mae' > 1: slower)"
    )
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
