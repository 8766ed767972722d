"""Records per second from tar shards: maekit's reader vs `datasets`' webdataset builder vs the `webdataset` package.

The shards hold ImageNet-sized JPEGs made from scikit-image's photos (`data_pipeline.make_jpegs`), written by
`maekit.shard_writer.write_shards`. Every reader runs in this process on one thread, in shard order (no shuffle buffer), and
is timed reading the raw records (bytes + label) alone and reading + decoding them with the MAE train transform
(`decode_image` + `MAETrainTransform(224)`), contenders alternating within each round; the table shows medians.
"resume" is the time from a saved position in the middle of a shard, past three quarters of the data, to the next
record:

- maekit: `ShardReader(..., state=reader.state_dict())` seeks to the next sample (and to each buffered one);
- datasets: `IterableDataset.load_state_dict(state_dict())` re-opens the shard and skips the records before it;
- webdataset: no saved position; the records before it are read again and dropped.

    python benchmarks/shard_reader.py --output shard_reader.json

`datasets` is a maekit dependency; `webdataset` is measured when installed (`pip install webdataset`).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from common import configure_threads, format_table, machine_info, median, record_command, time_alternating
from data_pipeline import make_jpegs

from maekit.data import MAETrainTransform, decode_image, sample_rng
from maekit.shard_writer import write_shards
from maekit.shards import ShardReader

COLUMNS = ("reader", "read rec/s", "read+decode rec/s", "total / read time", "resume ms")


def _maekit(urls: list[str]) -> Callable[[], Iterable[dict]]:
    return lambda: ShardReader(urls, shuffle_buffer=0, shuffle_shards=False)


def _datasets(urls: list[str]) -> Callable[[], Iterable[dict]] | None:
    import datasets

    def records():
        stream = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
        return stream.cast_column("jpg", datasets.Image(decode=False))

    return records


def _webdataset(urls: list[str]) -> Callable[[], Iterable[dict]] | None:
    try:
        import webdataset
    except ImportError:
        return None
    return lambda: webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)


def _image_bytes(record: dict) -> bytes:
    value = record.get("image", record.get("jpg"))
    return value["bytes"] if isinstance(value, dict) else value


def _consume(make: Callable[[], Iterable[dict]], decode: Callable[[bytes, int], torch.Tensor] | None) -> Callable:
    def run() -> None:
        for index, record in enumerate(make()):
            data = _image_bytes(record)
            if decode is not None:
                decode(data, index)

    return run


def _resume_seconds(name: str, make: Callable[[], Iterable[dict]], urls: list[str], at: int) -> float | None:
    """Seconds from a position saved after `at` records to the next record."""
    if name == "maekit":
        reader = make()
        for _ in range(at):
            next(reader)
        state = reader.state_dict()
        start = time.perf_counter()
        next(ShardReader(urls, shuffle_buffer=0, shuffle_shards=False, state=state))
        return time.perf_counter() - start
    if name == "datasets":
        stream = make()
        iterator = iter(stream)
        for _ in range(at):
            next(iterator)
        state = stream.state_dict()
        start = time.perf_counter()
        fresh = make()
        fresh.load_state_dict(state)
        next(iter(fresh))
        return time.perf_counter() - start
    start = time.perf_counter()
    next(itertools.islice(iter(make()), at, None))
    return time.perf_counter() - start


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4, help="number of shards")
    parser.add_argument("--per-shard", type=int, default=64, help="JPEGs per shard")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the table shows medians")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--output", default=None, help="write the result as JSON to this path")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    threads = configure_threads(1)
    transform = MAETrainTransform(224)

    def decode(data: bytes, index: int) -> torch.Tensor:
        return transform(decode_image(data), sample_rng(0, 0, index))

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, (500, 375), args.shards * args.per_shard)
        urls = write_shards(paths, f"{folder}/shards", max_samples_per_shard=args.per_shard)
        count = len(paths)
        makers = {"maekit": _maekit(urls), "datasets": _datasets(urls), "webdataset": _webdataset(urls)}
        makers = {name: make for name, make in makers.items() if make is not None}
        assert all(sum(1 for _ in make()) == count for make in makers.values())
        read = time_alternating(
            {name: _consume(make, None) for name, make in makers.items()},
            args.rounds,
            args.warmup,
            torch.device("cpu"),
        )
        full = time_alternating(
            {name: _consume(make, decode) for name, make in makers.items()},
            max(1, args.rounds // 2),
            0,
            torch.device("cpu"),
        )
        for name, make in makers.items():
            at = min(3 * count // 4 + args.per_shard // 2, count - 1)  # the middle of a shard
            resume = median([_resume_seconds(name, make, urls, at) for _ in range(3)])
            read_rate, full_rate = count / median(read[name]), count / median(full[name])
            rows.append(
                {
                    "reader": name,
                    "read rec/s": read_rate,
                    "read+decode rec/s": full_rate,
                    "total / read time": f"{read_rate / full_rate:.0f}x",
                    "resume ms": 1e3 * resume,
                }
            )
    return {
        "benchmark": "shard_reader",
        "settings": {"shards": args.shards, "per_shard": args.per_shard, "rounds": args.rounds, "jpeg": "500x375 q90"},
        "machine": {**machine_info(torch.device("cpu")), "threads": threads},
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    record_command(result, "shard_reader.py", argv, args.output)
    print(
        f"Tar shard readers, one thread, {args.shards} shards x {args.per_shard} JPEGs (500x375), medians of "
        f"{args.rounds} alternating rounds; 'total / read time' = read rate / read+decode rate"
    )
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
