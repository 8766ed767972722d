"""Helpers shared by the benchmark scripts: threads, timing, FLOP counting, matmul peak, peak memory, tables.

Every benchmark compares maekit with transformers in one process, alternating the contenders inside each repeat so
that load from other processes hits both alike, and reports the median over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = [
    "DTYPES",
    "add_comparison_arguments",
    "autocast",
    "comparison_rows",
    "configure_threads",
    "count_flops",
    "flop_counter",
    "format_table",
    "machine_info",
    "matmul_step",
    "median",
    "paired_ratio",
    "parse_checked",
    "peak_memory",
    "record_command",
    "state_bytes",
    "synchronize",
    "time_alternating",
    "write_json",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_comparison_arguments(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """The arguments the CPU comparison scripts share: model size, input, dtypes, repeats, threads, output."""
    from maekit import PRESETS

    parser.add_argument("--preset", default="vit-base-patch16", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES), help="bf16 = torch.autocast")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats per contender first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul timed as peak")
    parser.add_argument("--no-transformers", action="store_true", help="time maekit only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")


def parse_checked(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    positive: Sequence[str] = ("batch_size", "image_size", "repeats", "matmul_size"),
) -> argparse.Namespace:
    """Parse `argv`, exiting with a usage error when one of the `positive` integer arguments is below 1."""
    args = parser.parse_args(argv)
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """`fn()` and the wall-clock and CPU seconds of this process it took (`{"wall_s": ..., "cpu_s": ...}`)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def record_command(result: dict, script: str, argv: Sequence[str] | None, output: str | None) -> None:
    """Store the command line in `result["settings"]` and write `result` to `output` as JSON."""
    argv = sys.argv[1:] if argv is None else list(argv)
    result["settings"]["command"] = " ".join(["python", f"benchmarks/{script}", *argv])
    write_json(output, result)


def comparison_rows(
    times: dict[tuple[str, str], list[float]],
    flops: dict[tuple[str, str], int],
    matmul_flops: dict[str, int],
    *,
    batch_size: int,
    unit: str,
    matmul_name: str,
    extra: dict[tuple[str, str], dict],
) -> list[dict]:
    """Table rows from `time_alternating` times keyed (contender, dtype), with the ("matmul", dtype) rows as peak.

    Per contender: img/s and ms per `unit` (medians), the best repeat, FLOPs, FLOP rate, `% matmul peak` and
    `vs transformers` (both ratios taken within each repeat, median over repeats), plus `extra[key]` columns.
    """
    rows = []
    for (name, dtype), seconds in times.items():
        if name == "matmul":
            gflop = matmul_flops[dtype] / 1e9
            row = {"impl": matmul_name, "dtype": dtype, f"ms/{unit}": median(seconds) * 1e3, f"GFLOP/{unit}": gflop}
            row.update({"GFLOP/s": gflop / median(seconds), "% matmul peak": 100.0})
        else:
            gflop = flops[(name, dtype)] / 1e9
            row = {
                "impl": name,
                "dtype": dtype,
                "img/s": batch_size / median(seconds),
                f"ms/{unit}": median(seconds) * 1e3,
                "best ms": min(seconds) * 1e3,
                f"GFLOP/{unit}": gflop,
                "GFLOP/s": gflop / median(seconds),
                # Against the matmul timed in the same repeat (same load), median over repeats.
                "% matmul peak": 100.0
                * gflop
                * 1e9
                / matmul_flops[dtype]
                * paired_ratio(times["matmul", dtype], seconds),
                **extra[(name, dtype)],
            }
            if name == "maekit" and ("transformers", dtype) in times:
                row["vs transformers"] = f"{paired_ratio(times['transformers', dtype], seconds):.2f}x"
        row["times_s"] = seconds
        rows.append(row)
    return rows


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (`None` keeps the default) and return the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` to bfloat16 for `dtype="bf16"`, a no-op context for `"fp32"`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock reading covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Time each callable `repeats` times after `warmup` untimed calls, alternating contenders inside each repeat.

    The order of the contenders is reversed on every other repeat, so neither always runs right after the other.

    Returns:
        Seconds per call for every repeat, keyed like `contenders`.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """Median of `values` (robust to the odd step slowed by another process)."""
    return statistics.median(values)


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over repeats of `numerators[r] / denominators[r]`.

    Contenders timed in the same repeat saw the same machine load, so the ratio within a repeat is steadier than the
    ratio of two medians when other processes come and go.
    """
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def matmul_step(device: torch.device, dtype: str, size: int, inner: int = 1) -> tuple[Callable[[], None], int]:
    """`inner` square `size`×`size` matmuls in `dtype` (bf16 tensors for "bf16"), and their FLOP count.

    Timed next to the train step, it gives the machine's matmul rate in the same run, under the same load. On a GPU,
    a few matmuls per call (`inner`) keep launch and synchronisation overhead out of the rate.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=DTYPES[dtype])
    out = torch.empty(size, size, device=device, dtype=DTYPES[dtype])

    def matmul() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    return matmul, 2 * size**3 * inner


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA picks on CPU.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul-like ops (linear, bmm, conv, attention) that `fn` runs, forward and backward.

    Counted with `torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs); element-wise ops, norms,
    softmax and the optimizer are not counted, as is usual for MFU.
    """
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU flash-attention kernels."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)


def peak_memory(fn: Callable[[], object], device: torch.device, setup: Callable[[], object] | None = None) -> int:
    """Peak of the tensor bytes that torch holds while `fn` runs, above what it held when `fn` started.

    On CUDA: `torch.cuda.max_memory_allocated` (live tensor bytes of the caching allocator). On CPU, where torch keeps
    no such counter, the allocation and free events of `torch.profiler(profile_memory=True)` are replayed in time
    order and the maximum of their running sum is taken: live tensor bytes as well, without the allocator's slack.
    `setup` runs first, outside the measurement (e.g. to free last step's gradients: the profiler cannot size frees of
    blocks allocated before it started).
    """
    if setup is not None:
        setup()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters, buffers and optimizer state: what a training process holds between steps."""
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def machine_info(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_name(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A plain-text table (GitHub markdown syntax) of `rows`, showing `columns` in order."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    """Write `payload` as indented JSON to `path` (nothing when `path` is `None`)."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
