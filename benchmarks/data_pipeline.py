"""Images per second per worker process: maekit's MAE train transform vs the torchvision reference pipeline.

Both pipelines read the same JPEG files from disk and produce normalized (3, 224, 224) float tensors:

- torchvision (as the official MAE code and transformers' run_mae.py): ImageFolder's loader (`Image.open` +
  `convert("RGB")`), `RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=BICUBIC)`, `RandomHorizontalFlip()`,
  `ToTensor()`, `Normalize(ImageNet mean, std)`.
- maekit, one row per decode route: `decode_image` + `MAETrainTransform(jpeg_decoder=..., draft_oversampling=...)`
  (same crop boxes; `pillow` = PIL's libjpeg-turbo with `Image.draft`, `simplejpeg` = libjpeg-turbo decoding straight
  into an array, when installed; oversampling 1.5 = the default, 1.0 = the fastest reduced-scale decode).

The JPEGs (quality 90) are made from scikit-image's bundled photos: ~500x375 (ImageNet-like) and 1600x1200
(photo-sized: 2x2 tiles of upscaled photos, so the detail density stays that of a photo). Pipelines alternate within
each round of the same run, one thread each (as a DataLoader worker); the table reports medians over rounds, and
"vs torchvision" is the median over rounds of the per-round ratio (steadier than a ratio of medians on a shared machine).

    python benchmarks/data_pipeline.py --output data_pipeline.json
    python benchmarks/data_pipeline.py --rounds 3 --images 4      # quicker

torchvision is optional (`pip install maekit[benchmark]`); without it only the maekit rows are measured.
simplejpeg is optional too (`pip install maekit[fast]`); without it only the pillow routes are measured.
`--libturbojpeg PATH` (a libturbojpeg >= 3.0) adds the experimental "crop-window" rows: the same transform with the
JPEG decoded only inside its crop (`crop_window_decode.py`; maekit does not ship that route).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import PIL
import torch
from common import configure_threads, format_table, machine_info, median, paired_ratio, time_alternating, write_json
from PIL import Image

from maekit.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MAETrainTransform, decode_image, sample_rng
from maekit.jpeg_decode import available_jpeg_decoder

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIZES = {"imagenet 500x375": (500, 375), "photo 1600x1200": (1600, 1200)}
COLUMNS = ("JPEG size", "KiB/file", "impl", "img/s", "ms/img", "img/cpu-s", "vs torchvision")
TARGETS = {"imagenet 500x375": 2.0, "photo 1600x1200": 3.5}
# (decoder, draft_oversampling) of each maekit route; the first is MAETrainTransform's default on a plain install.
ROUTES = (("pillow", 1.5), ("pillow", 1.0), ("simplejpeg", 1.5), ("simplejpeg", 1.0))


def _fit(photo: Image.Image, width: int, height: int) -> Image.Image:
    """Center crop to the aspect ratio of (width, height), then resize (bicubic) to it."""
    scale = min(photo.width / width, photo.height / height)
    w, h = width * scale, height * scale
    box = ((photo.width - w) / 2, (photo.height - h) / 2, (photo.width + w) / 2, (photo.height + h) / 2)
    return photo.resize((width, height), Image.Resampling.BICUBIC, box=box)


def make_jpegs(folder: str, size: tuple[int, int], count: int) -> list[str]:
    """`count` JPEGs (quality 90) of `size` from scikit-image's photos; large ones are 2x2 tiles of photos."""
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]
    (width, height), paths = size, []
    for i in range(count):
        if width > 1000:
            image = Image.new("RGB", size)
            for k, (left, top) in enumerate(((0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2))):
                image.paste(_fit(photos[(i + k) % len(photos)], width // 2, height // 2), (left, top))
        else:
            image = _fit(photos[i % len(photos)], width, height)
        if (i // len(photos)) % 2:  # vary the content beyond the number of photos
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"{width}x{height}_{i:03d}.jpg")
        image.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def maekit_pipeline(decoder: str = "auto", oversampling: float = 1.5) -> Callable[[str, int], torch.Tensor]:
    transform = MAETrainTransform(224, scale=(0.2, 1.0), jpeg_decoder=decoder, draft_oversampling=oversampling)

    def run(path: str, index: int) -> torch.Tensor:
        return transform(decode_image(path), sample_rng(0, 0, index))

    return run


def torchvision_pipeline() -> Callable[[str, int], torch.Tensor] | None:
    """The official MAE / run_mae.py pipeline, or `None` when torchvision is not installed."""
    try:
        from torchvision import transforms
    except ImportError:
        return None
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ]
    )

    def run(path: str, index: int) -> torch.Tensor:
        with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader, as ImageFolder
            image = Image.open(f).convert("RGB")
        return transform(image)

    return run


def _over_files(
    pipeline: Callable[[str, int], torch.Tensor], paths: list[str], count: int, cpu_seconds: list[float]
) -> Callable[[], None]:
    """One timed round: `count` images, cycling over `paths`; appends the round's CPU time to `cpu_seconds`."""

    def go() -> None:
        start = time.process_time()
        for i in range(count):
            pipeline(paths[i % len(paths)], i)
        cpu_seconds.append(time.process_time() - start)

    return go


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the table shows medians")
    parser.add_argument("--images", type=int, default=14, help="JPEG files per size")
    parser.add_argument("--passes", type=int, default=2, help="passes over the files per round and pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--no-torchvision", action="store_true", help="measure the maekit rows only")
    parser.add_argument("--output", default=None, help="write the result as JSON to this path")
    parser.add_argument(
        "--libturbojpeg", default=None, help="a libturbojpeg >= 3.0: also measure decoding only the crop window"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    threads = configure_threads(1)  # a DataLoader worker runs one thread
    fast = available_jpeg_decoder("auto") == "simplejpeg"
    pipelines = {
        f"maekit {decoder} {oversampling}": maekit_pipeline(decoder, oversampling)
        for decoder, oversampling in ROUTES
        if fast or decoder == "pillow"
    }
    if args.libturbojpeg is not None:
        from crop_window_decode import crop_window_pipeline

        for oversampling in (1.5, 1.0):
            pipelines[f"crop-window {oversampling} (experimental)"] = crop_window_pipeline(
                args.libturbojpeg, oversampling
            )
    reference = None if args.no_torchvision else torchvision_pipeline()
    if reference is not None:
        pipelines["torchvision"] = reference
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, size in SIZES.items():
            paths = make_jpegs(folder, size, args.images)
            count = args.passes * len(paths)

            cpu = {name: [] for name in pipelines}
            contenders = {name: _over_files(pipeline, paths, count, cpu[name]) for name, pipeline in pipelines.items()}
            seconds = time_alternating(contenders, args.rounds, args.warmup, torch.device("cpu"))
            kib = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
            for name in pipelines:
                per_image = median(seconds[name]) / count
                row = {
                    "JPEG size": label,
                    "KiB/file": kib,
                    "impl": name,
                    "img/s": 1 / per_image,
                    "ms/img": 1e3 * per_image,
                    # Per CPU-second of this process: what one core gives when other jobs share the machine.
                    "img/cpu-s": count / median(cpu[name][args.warmup :]),
                }
                if reference is not None:
                    row["vs torchvision"] = f"{paired_ratio(seconds['torchvision'], seconds[name]):.2f}x"
                rows.append(row)
    try:
        import torchvision

        torchvision_version = torchvision.__version__ if reference is not None else None
    except ImportError:
        torchvision_version = None
    return {
        "benchmark": "data_pipeline",
        "settings": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "images_per_size": args.images,
            "passes": args.passes,
            "output_size": 224,
            "targets_vs_torchvision": TARGETS,
        },
        "machine": {
            **machine_info(torch.device("cpu")),
            "threads": threads,
            "pillow": PIL.__version__,
            "torchvision": torchvision_version,
            "simplejpeg": _version("simplejpeg"),
            "libturbojpeg": args.libturbojpeg,
        },
        "rows": rows,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print its table last and return the result (also written to `--output` as JSON)."""
    args = parse_args(argv)
    result = run(args)
    argv = sys.argv[1:] if argv is None else list(argv)
    result["settings"]["command"] = " ".join(["python", "benchmarks/data_pipeline.py", *argv])
    write_json(args.output, result)
    machine = result["machine"]
    print(
        f"MAE train transform, one process and thread (a DataLoader worker), {machine['processor']}, "
        f"median of {args.rounds} alternating rounds of {args.passes} x {args.images} files"
    )
    if machine["torchvision"] is None:
        print("torchvision is not installed (or --no-torchvision): maekit rows only (pip install maekit[benchmark]).")
    print(format_table(result["rows"], COLUMNS))
    return result


if __name__ == "__main__":
    main()
