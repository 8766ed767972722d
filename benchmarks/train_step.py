"""One MAE pretraining step (forward + backward + AdamW step): maekit vs transformers' `ViTMAEForPreTraining`.

Both models hold the same weights (`maekit.convert.to_transformers`), see the same images and the same masking
`noise`, use the same optimizer and thread count, and are timed alternately in one process. A square matmul in the
same dtype is timed in the same loop, so "% of peak" compares with the machine's matmul rate under the same load.

    python benchmarks/train_step.py                                   # ViT-B/16, batch 8, 224², fp32
    python benchmarks/train_step.py --dtype fp32 bf16 --output train_step.json
    python benchmarks/train_step.py --preset vit-tiny-patch16 --repeats 3   # quick
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
    state_bytes,
    time_alternating,
)

from maekit import MAEConfig, MAEForPreTraining
from maekit.convert import to_transformers

OPTIMIZERS = ("fused", "foreach", "for-loop")
MEMORY_NOTE = {
    False: "step MiB = peak live tensor bytes during a step above params + AdamW state (torch.profiler memory events, "
    "grads freed before the step); peak MiB = that + params, buffers and AdamW state",
    True: "step MiB = torch.cuda.max_memory_allocated during a step above params + AdamW state (grads freed before the "
    "step); peak MiB = that + params, buffers and AdamW state",
}
COLUMNS = (
    "impl",
    "dtype",
    "img/s",
    "ms/step",
    "best ms",
    "GFLOP/step",
    "GFLOP/s",
    "% matmul peak",
    "step MiB",
    "peak MiB",
    "vs transformers",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_arguments(parser, batch_size=8)
    parser.add_argument("--optimizer", default="fused", choices=OPTIMIZERS, help="AdamW implementation, for both")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute every block in backward (both models)"
    )
    parser.add_argument("--config-overrides", default=None, help="extra MAEConfig fields, e.g. 'num_hidden_layers=2'")
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of each step by self time")
    return parse_checked(parser, argv)


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=gelu' -> {'a': 1, 'b': 0.5, 'c': 'gelu'} (ints, floats and booleans parsed)."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} is not of the form field=value.")
        for parse in (int, float):
            try:
                overrides[key.strip()] = parse(value)
                break
            except ValueError:
                continue
        else:
            overrides[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return overrides


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW with the MAE pretraining hyper-parameters; `kind` picks torch's fused, foreach or for-loop kernel."""
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, **flags)


def make_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixel_values: torch.Tensor,
    noise: torch.Tensor,
    device: torch.device,
    dtype: str,
) -> Callable[[], torch.Tensor]:
    """A closure running one full step; gradients are set to `None` first, so each step allocates its own."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = model(pixel_values=pixel_values, noise=noise).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def profile_step(step: Callable[[], object], device: torch.device, top: int) -> list[dict]:
    """Profile one step with `torch.profiler`; the `top` ops by self time (CPU, or CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    return [
        {"op": e.key, "self_ms": getattr(e, attr) / 1e3, "share %": 100.0 * getattr(e, attr) / total, "calls": e.count}
        for e in events[:top]
    ]


def run(args: argparse.Namespace) -> dict:
    """Build both models, time them and the matmul, and return a JSON-ready result (rows and settings)."""
    device = torch.device(args.device)
    threads = configure_threads(args.threads)
    torch.manual_seed(args.seed)
    config = MAEConfig.from_preset(args.preset, image_size=args.image_size, **parse_overrides(args.config_overrides))
    models = {"maekit": MAEForPreTraining(config).to(device).train()}
    if not args.no_transformers:
        models["transformers"] = to_transformers(models["maekit"])
    if args.gradient_checkpointing:
        for model in models.values():
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()

    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    noise = torch.rand(args.batch_size, config.num_patches, generator=generator).to(device)

    # Same weights and mask must give the same loss, else the comparison is not of the same computation.
    with torch.no_grad():
        losses = {name: model(pixel_values=pixel_values, noise=noise).loss.item() for name, model in models.items()}

    optimizers = {name: make_optimizer(model, args.optimizer) for name, model in models.items()}
    steps, matmul_flops = {}, {}
    for dtype in args.dtype:
        for name, model in models.items():
            steps[(name, dtype)] = make_train_step(model, optimizers[name], pixel_values, noise, device, dtype)
        steps[("matmul", dtype)], matmul_flops[dtype] = matmul_step(device, dtype, args.matmul_size)

    # Steps change the weights, so FLOPs and memory are read after the same number of steps for every contender.
    times = time_alternating(steps, args.repeats, args.warmup, device)
    flops = {key: count_flops(fn) for key, fn in steps.items() if key[0] != "matmul"}
    memory = {
        (name, dtype): peak_memory(steps[(name, dtype)], device, setup=optimizers[name].zero_grad)
        for name, dtype in flops
    }
    state = {name: state_bytes(model, optimizers[name]) for name, model in models.items()}
    profiles = {
        f"{name} {dtype}": profile_step(steps[(name, dtype)], device, args.profile)
        for name, dtype in flops
        if args.profile
    }

    extra = {
        (name, dtype): {
            "step MiB": memory[name, dtype] / 2**20,
            "peak MiB": (state[name] + memory[name, dtype]) / 2**20,
        }
        for name, dtype in memory
    }
    rows = comparison_rows(
        times,
        flops,
        matmul_flops,
        batch_size=args.batch_size,
        unit="step",
        matmul_name=f"matmul {args.matmul_size}²",
        extra=extra,
    )

    return {
        "benchmark": "train_step",
        "settings": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "mask_ratio": config.mask_ratio,
            "dtypes": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "optimizer": f"torch.optim.AdamW ({args.optimizer})",
            "gradient_checkpointing": args.gradient_checkpointing,
            "matmul_size": args.matmul_size,
            "attention": {name: model.config._attn_implementation for name, model in models.items()},
            "config_overrides": parse_overrides(args.config_overrides),
        },
        "machine": {**machine_info(device), "threads": threads},
        "first_loss": losses,
        "memory_measure": MEMORY_NOTE[device.type == "cuda"],
        "rows": rows,
        "profiles": profiles,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    record_command(result, "train_step.py", argv, args.output)
    settings, machine = result["settings"], result["machine"]
    print(
        f"MAE train step: {settings['preset']}, batch {settings['batch_size']}, {settings['image_size']}², "
        f"mask {settings['mask_ratio']}, {settings['optimizer']}, {machine['threads']} threads, "
        f"{'gradient checkpointing, ' if settings['gradient_checkpointing'] else ''}"
        f"{machine['processor']}, median of {settings['repeats']} after {settings['warmup']} warm-up"
    )
    for name, ops in result["profiles"].items():
        print(f"top ops of the {name} step by self time:")
        print(format_table(ops, ("op", "self_ms", "share %", "calls")))
    print(f"first-step loss (same weights and noise): {result['first_loss']}")
    print(f"memory: {result['memory_measure']}")
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
