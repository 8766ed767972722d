"""Feature extraction (encoder on all patches, no masking): maekit `MAEModel` vs transformers' `ViTMAEModel`.

transformers' `ViTMAEModel` masks `config.mask_ratio` (75%) of the patches by default, even at inference; here its
`mask_ratio` is set to 0.0 so that both encode every patch (transformers still shuffles the patches and gathers them,
which is part of what its users pay). Same weights (`maekit.convert.to_transformers`), same images, same threads,
timed alternately under `torch.inference_mode()` next to a square matmul of the same dtype.

    python benchmarks/inference.py                                     # ViT-B/16, batch 32, 224², fp32
    python benchmarks/inference.py --dtype fp32 bf16 --output inference.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from common import (
    add_comparison_arguments,
    autocast,
    comparison_rows,
    configure_threads,
    count_flops,
    format_table,
    machine_info,
    matmul_step,
    parse_checked,
    peak_memory,
    record_command,
    time_alternating,
)

from maekit import MAEConfig, MAEModel
from maekit.convert import to_transformers

COLUMNS = (
    "impl",
    "dtype",
    "img/s",
    "ms/batch",
    "best ms",
    "GFLOP/batch",
    "GFLOP/s",
    "% matmul peak",
    "act MiB",
    "vs transformers",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_arguments(parser, batch_size=32)
    return parse_checked(parser, argv)


def make_forward(model: torch.nn.Module, pixel_values: torch.Tensor, device: torch.device, dtype: str) -> Callable:
    """A closure extracting the final-norm features of one batch."""

    def forward() -> torch.Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return model(pixel_values=pixel_values).last_hidden_state

    return forward


def run(args: argparse.Namespace) -> dict:
    """Build both encoders, time them and the matmul, and return a JSON-ready result (rows and settings)."""
    device = torch.device(args.device)
    threads = configure_threads(args.threads)
    torch.manual_seed(args.seed)
    config = MAEConfig.from_preset(args.preset, image_size=args.image_size)
    models = {"maekit": MAEModel(config).to(device).eval()}
    if not args.no_transformers:
        models["transformers"] = to_transformers(models["maekit"]).eval()
        models["transformers"].config.mask_ratio = 0.0  # read at call time: encode every patch

    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)

    # Both must compute the same features: transformers shuffles the patches unless the noise is already sorted.
    max_abs_diff = None
    if "transformers" in models:
        with torch.inference_mode():
            ours = models["maekit"](pixel_values).last_hidden_state
            identity = torch.arange(config.num_patches, device=device, dtype=torch.float32).expand(args.batch_size, -1)
            theirs = models["transformers"](pixel_values=pixel_values, noise=identity).last_hidden_state
            max_abs_diff = (ours - theirs).abs().max().item()

    forwards, matmul_flops = {}, {}
    for dtype in args.dtype:
        for name, model in models.items():
            forwards[(name, dtype)] = make_forward(model, pixel_values, device, dtype)
        forwards[("matmul", dtype)], matmul_flops[dtype] = matmul_step(device, dtype, args.matmul_size)

    times = time_alternating(forwards, args.repeats, args.warmup, device)
    measured = [key for key in forwards if key[0] != "matmul"]
    flops = {key: count_flops(forwards[key]) for key in measured}
    memory = {key: peak_memory(forwards[key], device) for key in measured}

    rows = comparison_rows(
        times,
        flops,
        matmul_flops,
        batch_size=args.batch_size,
        unit="batch",
        matmul_name=f"matmul {args.matmul_size}²",
        extra={key: {"act MiB": memory[key] / 2**20} for key in measured},
    )

    return {
        "benchmark": "inference",
        "settings": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "dtypes": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "matmul_size": args.matmul_size,
            "transformers_mask_ratio": 0.0,
            "attention": {name: model.config._attn_implementation for name, model in models.items()},
        },
        "machine": {**machine_info(device), "threads": threads},
        "features_max_abs_diff_fp32": max_abs_diff,
        "memory_measure": "act MiB = peak live tensor bytes during the forward above the weights",
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    record_command(result, "inference.py", argv, args.output)
    settings, machine = result["settings"], result["machine"]
    print(
        f"MAE feature extraction (no masking; transformers with mask_ratio=0.0): {settings['preset']}, "
        f"batch {settings['batch_size']}, {settings['image_size']}², {machine['threads']} threads, "
        f"{machine['processor']}, median of {settings['repeats']} after {settings['warmup']} warm-up"
    )
    print(f"max |maekit - transformers| of the fp32 features: {result['features_max_abs_diff_fp32']}")
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
