"""MAE pretraining step on one GPU: ViT-L/16, bf16 autocast, SDPA, `torch.compile`; maekit vs transformers.

What it does, in under five minutes on an H200:
  1. times a square bf16 matmul: the card's measured matmul rate, the denominator of MFU;
  2. sizes the batch to fill the card: the largest power of two whose eager step (of transformers, the hungrier of
     the two, so that both run the same batch) stays under `--memory-fraction` of the GPU memory;
  3. compiles one train step (forward + backward + fused AdamW) of each model, same weights, images and masking
     noise; checks that both give the same first loss;
  4. times both steps alternately and prints a short table last (img/s, MFU, peak memory).

It needs torch and transformers (and maekit on the path), not `datasets`:

    PYTHONPATH=. python benchmarks/gpu_train_step.py --output gpu_train_step.json
    python benchmarks/gpu_train_step.py --device cpu --preset vit-tiny-patch16 --image-size 32 --batch-size 2 \\
        --no-compile --repeats 1 --warmup 1 --matmul-size 128      # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from common import (
    autocast,
    count_flops,
    flop_counter,
    format_table,
    machine_info,
    matmul_step,
    median,
    paired_ratio,
    parse_checked,
    peak_memory,
    record_command,
    state_bytes,
    time_alternating,
)
from train_step import make_optimizer, make_train_step, parse_overrides

from maekit import PRESETS, MAEConfig, MAEForPreTraining
from maekit.convert import to_transformers

COLUMNS = ("impl", "batch", "img/s", "ms/step", "TFLOP/step", "TFLOP/s", "MFU %", "peak GiB", "vs transformers")
_SDPA_KERNELS = (("for_cpu", "flash-cpu"), ("flash", "flash"), ("efficient", "efficient"), ("cudnn", "cudnn"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-large-patch16", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: fill the card (GPU) / 8 (CPU)")
    parser.add_argument("--max-batch-size", type=int, default=1024, help="upper end of the batch search")
    parser.add_argument("--memory-fraction", type=float, default=0.8, help="GPU memory the batch search may fill")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (compilation included)")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square bf16 matmul timed as peak")
    parser.add_argument("--no-compile", action="store_true", help="run both models eagerly")
    parser.add_argument("--no-transformers", action="store_true", help="time maekit only")
    parser.add_argument("--config-overrides", default=None, help="extra MAEConfig fields, e.g. 'num_hidden_layers=2'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parse_checked(parser, argv, ("batch_size", "image_size", "max_batch_size", "repeats", "matmul_size"))
    if not 0 < args.memory_fraction <= 1:
        parser.error(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    return args


def inputs(batch: int, config: MAEConfig, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and masking noise, drawn on the CPU so that every device sees the same values."""
    generator = torch.Generator().manual_seed(seed)
    size = config.image_hw
    pixel_values = torch.randn(batch, config.num_channels, *size, generator=generator).to(device)
    return pixel_values, torch.rand(batch, config.num_patches, generator=generator).to(device)


def fill_the_card(
    model: torch.nn.Module, others: Sequence[torch.nn.Module], config: MAEConfig, args: argparse.Namespace
) -> int:
    """Largest power-of-two batch (≤ `--max-batch-size`) whose eager bf16 step of `model` stays under the memory
    fraction, counting the `others`' weights, gradients and AdamW state (4 fp32 copies) that stay resident."""
    device = next(model.parameters()).device
    total = torch.cuda.get_device_properties(device).total_memory
    resident = sum(4 * p.numel() * p.element_size() for other in others for p in other.parameters())
    weights = {key: value.clone() for key, value in model.state_dict().items()}  # the probe steps change them
    optimizer = make_optimizer(model, "fused")
    best, batch = 0, 8
    while batch <= args.max_batch_size:
        pixel_values, noise = inputs(batch, config, device, args.seed)
        step = make_train_step(model, optimizer, pixel_values, noise, device, "bf16")
        try:
            step()  # AdamW state exists from here on: the measured step below includes all of it
            used = resident + state_bytes(model, optimizer) + peak_memory(step, device, setup=optimizer.zero_grad)
        except torch.OutOfMemoryError:
            break
        finally:
            del pixel_values, noise, step
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        if used > args.memory_fraction * total:
            break
        best = batch
        batch *= 2
    if best == 0:
        raise RuntimeError(f"Not even a batch of 8 fits in {args.memory_fraction:.0%} of the GPU memory.")
    model.load_state_dict(weights)
    return best


def attention_kernel(model: torch.nn.Module, pixel_values, noise, device: torch.device) -> str:
    """Which attention kernel SDPA dispatched to in one forward: flash, efficient, cudnn, flash-cpu, or math."""
    with flop_counter() as counter, torch.no_grad(), autocast(device, "bf16"):
        model(pixel_values=pixel_values, noise=noise)
    ops = {str(op) for per_module in counter.get_flop_counts().values() for op in per_module}
    found = set()
    for op in ops:
        if "scaled_dot_product" in op or "attention" in op:
            found.add(next((kind for key, kind in _SDPA_KERNELS if key in op), op))
    # The math fallback is not an op of its own: it decomposes into plain bmm/softmax.
    return ",".join(sorted(found)) or "math"


def run(args: argparse.Namespace) -> dict:
    """Measure the matmul rate, size the batch, compile and time both steps; return a JSON-ready result."""
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    overrides = parse_overrides(args.config_overrides)
    config = MAEConfig.from_preset(args.preset, image_size=args.image_size, **overrides)
    models = {"maekit": MAEForPreTraining(config).to(device).train()}
    if not args.no_transformers:
        models["transformers"] = to_transformers(models["maekit"])

    matmul, matmul_flops = matmul_step(device, "bf16", args.matmul_size, inner=10 if device.type == "cuda" else 1)
    matmul_times = time_alternating({"matmul": matmul}, max(args.repeats, 10), 3, device)["matmul"]
    peak_flops = matmul_flops / median(matmul_times)

    if args.batch_size is not None:
        batch = args.batch_size
    elif device.type == "cuda":
        hungriest = models.get("transformers", models["maekit"])  # transformers needs more memory at a given batch
        batch = fill_the_card(hungriest, [m for m in models.values() if m is not hungriest], config, args)
    else:
        batch = 8
    pixel_values, noise = inputs(batch, config, device, args.seed)

    with torch.no_grad(), autocast(device, "bf16"):
        first_loss = {
            name: model(pixel_values=pixel_values, noise=noise).loss.item() for name, model in models.items()
        }

    optimizers = {name: make_optimizer(model, "fused") for name, model in models.items()}
    eager = {
        name: make_train_step(model, optimizers[name], pixel_values, noise, device, "bf16")
        for name, model in models.items()
    }
    flops = {name: count_flops(step) for name, step in eager.items()}
    kernels = {name: attention_kernel(model, pixel_values, noise, device) for name, model in models.items()}
    steps = dict(eager)
    if not args.no_compile:
        compiled = {name: torch.compile(model) for name, model in models.items()}
        steps = {
            name: make_train_step(compiled[name], optimizers[name], pixel_values, noise, device, "bf16")
            for name in models
        }
    warmup_started = time.perf_counter()
    times = time_alternating(steps, args.repeats, args.warmup, device)
    memory = {
        name: state_bytes(models[name], optimizers[name])
        + peak_memory(steps[name], device, setup=optimizers[name].zero_grad)
        for name in steps
    }

    rows = []
    for name, step_times in times.items():
        seconds = median(step_times)
        rows.append(
            {
                "impl": name,
                "batch": batch,
                "img/s": batch / seconds,
                "ms/step": seconds * 1e3,
                "TFLOP/step": flops[name] / 1e12,
                "TFLOP/s": flops[name] / seconds / 1e12,
                "MFU %": 100.0 * flops[name] / seconds / peak_flops,
                "peak GiB": memory[name] / 2**30,
                "times_s": step_times,
            }
        )
    rows.append(
        {
            "impl": f"matmul {args.matmul_size}² bf16",
            "ms/step": median(matmul_times) * 1e3,
            "TFLOP/step": matmul_flops / 1e12,
            "TFLOP/s": peak_flops / 1e12,
            "MFU %": 100.0,
        }
    )
    if "transformers" in times:
        rows[0]["vs transformers"] = f"{paired_ratio(times['transformers'], times['maekit']):.2f}x"

    return {
        "benchmark": "gpu_train_step",
        "settings": {
            "preset": args.preset,
            "image_size": args.image_size,
            "batch_size": batch,
            "batch_chosen": "given"
            if args.batch_size is not None
            else "filled the card"
            if device.type == "cuda"
            else "cpu default",
            "dtype": "bf16 autocast",
            "compiled": not args.no_compile,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "optimizer": "torch.optim.AdamW (fused)",
            "config_overrides": overrides,
            "attention_kernel": kernels,
        },
        "machine": machine_info(device),
        "first_loss_bf16": first_loss,
        "seconds": {"warmup_and_timing": time.perf_counter() - warmup_started, "total": time.perf_counter() - started},
        "memory_measure": "peak GiB = params + buffers + AdamW state + the step's peak above them",
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    record_command(result, "gpu_train_step.py", argv, args.output)
    settings, machine = result["settings"], result["machine"]
    print(f"first-step loss (same weights and noise, bf16): {result['first_loss_bf16']}")
    print(f"SDPA kernel: {settings['attention_kernel']}; total {result['seconds']['total']:.0f} s")
    print(
        f"MAE train step on {machine.get('gpu', machine['device'])}: {settings['preset']}, {settings['image_size']}², "
        f"batch {settings['batch_size']} ({settings['batch_chosen']}), bf16 autocast, "
        f"{'compiled' if settings['compiled'] else 'eager'}, fused AdamW, median of {settings['repeats']}; "
        "MFU against the measured bf16 matmul rate"
    )
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
