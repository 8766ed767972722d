"""The `maekit` command line: `visualize`, `extract-features`, `convert`, `export`, `info`, `write-shards`.

Run `maekit --help` or `maekit <command> --help` (also `python -m maekit ...`). This module only parses arguments and
wires them to library functions (`maekit.inputs`, `maekit.features`, `maekit.export`, `maekit.info`,
`maekit.visualize`, `maekit.convert`, `maekit.shard_writer`). A user error (a missing file, a model without the
needed part, a bad argument value) ends as `maekit <command>: error: ...` with exit status 2, never a traceback;
`maekit convert` exits 1 when its SOURCE cannot be read or converted or its OUTPUT cannot be written, and
`maekit export` exits 1 when the exported file differs from PyTorch by more than `--atol`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence

import torch

from .configuration_mae import MASK_STRATEGIES
from .visualize import UNNORMALIZE

__all__ = ["build_parser", "main", "reference_markdown"]

# Mask strategies offered by `maekit visualize`.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DESCRIPTION = "Masked Autoencoders (He et al., 2021): reconstructions, features, export, model facts and data shards."


def _size(value: str) -> tuple[int, int]:
    """`224` or `224x160` (height x width)."""
    try:
        parts = [int(part) for part in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x160, got {value!r}")
    return parts[0], parts[1]


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value!r}")
    return number


def _int_at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value!r}")
        return number

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


_MODEL_HELP = "a maekit or transformers vit_mae model folder (save_pretrained), or a Hub repo id"


def _add_visualize(commands) -> None:
    parser = commands.add_parser(
        "visualize",
        help="reconstruction figure of your images",
        description=(
            "Mask your images, run the MAE decoder, and write one PNG: a row per image with the columns original | "
            "masked | reconstruction | reconstruction with the visible patches pasted back. Images are resized and "
            "cropped by the model's image processor."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP + " holding the pretraining decoder")
    parser.add_argument(
        "images", metavar="IMAGE", nargs="+", help="image files, folders of images, or .txt file lists"
    )
    parser.add_argument("--mask-ratio", type=_fraction, help="fraction of patches removed (default: the model's)")
    parser.add_argument(
        "--mask-strategy",
        choices=MASK_STRATEGIES,
        help="which patches are removed: random (official), block (BEiT) or grid (default: the model's)",
    )
    parser.add_argument(
        "--unnormalize",
        default="honest",
        choices=UNNORMALIZE,
        help=(
            "for norm_pix_loss models, the statistics that map predicted patches back to pixels: honest (from the "
            "visible patches around each removed one) or oracle (the true ones, which the model never saw) "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the masking noise (default: %(default)s)")
    parser.add_argument("--output", default="reconstruction.png", help="PNG to write (default: %(default)s)")
    parser.add_argument(
        "--max-images",
        type=_positive,
        default=16,
        help="rows at most; the first images are kept (default: %(default)s)",
    )
    parser.set_defaults(handler=_visualize, parser=parser)


def _add_extract_features(commands) -> None:
    from .features import POOLINGS

    parser = commands.add_parser(
        "extract-features",
        help="encode a folder / file list / dataset into one feature file",
        description=(
            "Encode every image of DATA with the frozen encoder (no masking) and write one .safetensors or .parquet "
            "file with the features, the file names and the labels when DATA has them. Inputs keep their order; "
            "files that cannot be decoded are left out and listed by name. Work is saved in chunks in "
            "OUTPUT.parts/: rerun the same command to finish an interrupted run."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument(
        "data",
        metavar="DATA",
        help=(
            "an image folder (DATA/<class>/<image> gives labels), a .txt file list, a datasets folder "
            "(save_to_disk or parquet files) or a Hub dataset id"
        ),
    )
    parser.add_argument("--output", required=True, help="a .safetensors or .parquet file")
    parser.add_argument(
        "--pooling",
        default="cls",
        choices=POOLINGS,
        help="cls token, mean of the patch tokens, or every token (default: %(default)s)",
    )
    parser.add_argument("--batch-size", type=_positive, default=64, help="images per forward (default: %(default)s)")
    parser.add_argument(
        "--num-workers",
        type=_non_negative,
        default=min(4, os.cpu_count() or 1),
        help="processes decoding images (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive, default=1024, help="inputs per saved chunk (default: %(default)s)"
    )
    parser.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    parser.add_argument("--image-column", help="dataset image column (default: found automatically)")
    parser.add_argument("--label-column", help="dataset label column (default: found automatically)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="float32", choices=_DTYPES, help="autocast dtype; features are saved in float32"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_extract_features, parser=parser)


def _add_convert(commands) -> None:
    # Parsed by maekit.convert itself (see `main`); registered here for `maekit --help`.
    commands.add_parser(
        "convert",
        help="convert checkpoints: official .pth, timm, transformers, maekit (same as maekit-convert)",
        add_help=False,
    )


def _add_export(commands) -> None:
    from .export import EXPORT_FORMATS

    parser = commands.add_parser(
        "export",
        help="export the encoder (or classifier) to ONNX or torch.export, checked against PyTorch",
        description=(
            "Export the encoder (input pixel_values, output last_hidden_state) or, with --classifier, the classifier "
            "(output logits), with a dynamic batch and image size (multiples of the patch size, at least two patches "
            "per side), then run the file "
            "and the PyTorch model on real images and print the largest absolute difference. ONNX needs "
            'pip install "maekit[export]".'
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx (.onnx) or torch-export (.pt2)")
    parser.add_argument("--output", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument(
        "--classifier", action="store_true", help="export the classification head too (a fine-tuned model)"
    )
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1")
    parser.add_argument("--static-size", action="store_true", help="fix the image size to the model's")
    parser.add_argument("--opset", type=_positive, help="ONNX opset version (default: the exporter's)")
    parser.add_argument(
        "--check-images",
        nargs="+",
        metavar="IMAGE",
        help="images (files, folders, .txt lists) to check the export on (default: scikit-image's photos)",
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest accepted absolute difference (default: %(default)s)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    parser.set_defaults(handler=_export, parser=parser)


def _add_info(commands) -> None:
    from .configuration_mae import PRESETS

    parser = commands.add_parser(
        "info",
        help="architecture, patch grid, parameters and FLOPs per image",
        description=(
            "Describe a model without loading its weights: architecture, patch grid, parameter counts, and FLOPs "
            "per image (2 per multiply-add, matmul-like operations) for pretraining and inference."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help=f"a preset ({', '.join(PRESETS)}), or " + _MODEL_HELP)
    parser.add_argument("--image-size", type=_size, help="resolution, e.g. 224 or 224x160 (default: the model's)")
    parser.add_argument(
        "--mask-ratio", type=_fraction, help="mask ratio of the pretraining FLOPs (default: the model's)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(handler=_info, parser=parser)


def _add_write_shards(commands) -> None:
    parser = commands.add_parser(
        "write-shards",
        help="write an image data set as WebDataset-style tar shards",
        description=(
            "Write every sample of SOURCE, in order, as tar shards OUTPUT_DIR/PREFIX-000000.tar, ...: each image keeps "
            "its own bytes (no re-encoding), a label becomes a .cls member, and the same SOURCE gives byte-identical "
            "shards. Read them back with maekit.data.load_image_dataset(PATTERN) or maekit.shards."
        ),
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help=(
            "a folder of images (one sub-folder per class gives labels), a datasets folder (save_to_disk or parquet "
            "files), data files or a glob, a Hub dataset id, or other tar shards (a pattern)"
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for the shards (created)")
    parser.add_argument(
        "--max-shard-size",
        default="256MB",
        help="close a shard before it grows past this, e.g. 256MB, 1GiB or bytes (default: %(default)s)",
    )
    parser.add_argument("--max-samples-per-shard", type=_positive, help="also close a shard after this many samples")
    parser.add_argument("--prefix", default="shard", help="file name prefix of the shards (default: %(default)s)")
    parser.add_argument("--split", default="train", help="split of SOURCE to write (default: %(default)s)")
    parser.add_argument("--config-name", help="configuration of a Hub dataset")
    parser.add_argument("--image-column", help="image column (default: found automatically)")
    parser.add_argument("--label-column", help="label column (default: found automatically; none when absent)")
    parser.set_defaults(handler=_write_shards, parser=parser)


def build_parser() -> argparse.ArgumentParser:
    """The `maekit` argument parser with one sub-parser per command."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="maekit", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"maekit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_visualize, _add_extract_features, _add_convert, _add_export, _add_info, _add_write_shards):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `maekit` and `python -m maekit`; returns the exit status (user errors exit 2 via argparse, a
    failed conversion or export check returns 1, an interruption 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from .convert import main as convert_main

        with _quiet_loading():
            return convert_main(argv[1:], prog="maekit convert")
    args = build_parser().parse_args(argv)
    with _quiet_loading():
        try:
            return args.handler(args)
        except BrokenPipeError:  # `maekit info ... | head`: the reader left, nothing is wrong
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (ValueError, TypeError, OSError, ImportError) as err:
            args.parser.error(str(err))
        except KeyboardInterrupt:
            print(f"\nmaekit {args.command}: interrupted.", file=sys.stderr)
            return 130
    return 1  # not reached: parser.error exits


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" bars from transformers: the commands print what they did themselves."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------------
# Commands


def _visualize(args: argparse.Namespace) -> int:
    from .inputs import find_images, load_image_processor, load_model
    from .modeling_mae import MAEForPreTraining
    from .visualize import visualize_reconstructions

    images = find_images(args.images)
    skipped = max(0, len(images) - args.max_images)
    images = images[: args.max_images]
    model = load_model(args.model, MAEForPreTraining)
    processor = load_image_processor(args.model, model.config)
    pixel_values = processor(_open_images(images, model.config.num_channels), return_tensors="pt")["pixel_values"]
    mask_ratio = model.config.mask_ratio if args.mask_ratio is None else args.mask_ratio
    strategy = args.mask_strategy or model.config.mask_strategy
    grid = visualize_reconstructions(
        model,
        pixel_values,
        mask_ratio=mask_ratio,
        mask_strategy=strategy,
        seed=args.seed,
        unnormalize=args.unnormalize,
        image_mean=processor.image_mean,
        image_std=processor.image_std,
    )
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    grid.save(output)
    print(
        f"Wrote {args.output} ({grid.width}x{grid.height}): {len(images)} image(s), columns original | masked | "
        f"reconstruction | reconstruction + visible; mask ratio {mask_ratio:g} ({strategy}), seed {args.seed}."
    )
    if skipped:
        print(f"{skipped} more image(s) not shown (--max-images {args.max_images}).")
    if model.config.norm_pix_loss:
        how = {
            "honest": "the mean and std of the visible patches around them (what the model could know)",
            "oracle": "the mean and std of the original patches (an oracle: the model never saw them)",
        }[args.unnormalize]
        print(f"norm_pix_loss model: removed patches are un-normalized with {how}.")
    return 0


def _open_images(paths: Sequence[str], num_channels: int) -> list:
    """Decode every image now, so that a bad file is reported by name."""
    from .data import _DECODE_ERRORS, decode_error_message, decode_image
    from .image_processing_mae import convert_image_mode

    images = []
    for path in paths:
        try:
            image = decode_image(path)
            image.load()
        except _DECODE_ERRORS as err:  # what maekit.data counts as a bad file (a decompression bomb included)
            raise ValueError(f"cannot read image {path}: {decode_error_message(err)}") from err
        images.append(convert_image_mode(image, num_channels))
    return images


def _extract_features(args: argparse.Namespace) -> int:
    from .features import describe, extract_features_to_file, open_image_source
    from .inputs import load_image_processor, load_model
    from .modeling_mae import MAEModel

    model = load_model(args.model, MAEModel)
    processor = load_image_processor(args.model, model.config)
    source = open_image_source(args.data, args.split, args.image_column, args.label_column)
    parts = f"{args.output}.parts"
    try:
        result = extract_features_to_file(
            model,
            source,
            args.output,
            processor,
            pooling=args.pooling,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            chunk_size=args.chunk_size,
            device=args.device,
            dtype=_DTYPES[args.dtype],
            model_name=args.model,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        if not os.path.isdir(parts):
            raise
        print(
            f"\nmaekit extract-features: interrupted. Finished chunks are kept in {parts}/: run the same command "
            "again to continue.",
            file=sys.stderr,
        )
        return 130
    print(describe(result, args.pooling))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import check_export, export_model, sample_images
    from .inputs import find_images, load_image_processor, load_model
    from .modeling_mae import MAEForImageClassification, MAEModel

    model = load_model(args.model, MAEForImageClassification if args.classifier else MAEModel)
    config = model.config
    (p, q), channels = config.patch_hw, config.num_channels
    # The check images are read first: a bad one is reported before the export, not after it.
    if args.no_check:
        images, source = [], ""
    elif args.check_images:
        paths = find_images(args.check_images)
        images, source = _open_images(paths, channels), f"{len(paths)} image(s)"
    else:
        images, source = sample_images(), "scikit-image photos (astronaut, coffee, chelsea, rocket)"
    output = export_model(
        model,
        args.output,
        args.format,
        dynamic_batch=not args.static_batch,
        dynamic_size=not args.static_size,
        opset_version=args.opset,
    )
    batch = "1" if args.static_batch else "batch"
    if args.static_size:
        size, tokens = ", ".join(map(str, config.image_hw)), str(1 + config.num_patches)
    else:
        size, tokens = "height, width", f"1 + (height/{p})*(width/{q})"
    result = (
        f"logits ({batch}, {config.num_labels})"
        if args.classifier
        else (f"last_hidden_state ({batch}, {tokens}, {config.hidden_size})")
    )
    print(f"Wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB, {args.format}, {type(model).__name__})")
    multiples = f"{p}" if p == q else f"{p} and {q}"
    rule = "" if args.static_size else f"; height and width: multiples of {multiples}, at least two patches per side"
    print(f"  input  pixel_values ({batch}, {channels}, {size}){rule}")
    print(f"  output {result}")
    if args.no_check:
        return 0
    processor = load_image_processor(args.model, config)
    batches = _check_batches(processor, images, config, args.static_batch, args.static_size)
    checks = check_export(output, model, batches, args.format)
    print(f"Checked against PyTorch (float32) on {source}:")
    for check in checks:
        verdict = "ok" if check.max_abs_diff <= args.atol else f"ABOVE --atol {args.atol:g}"
        print(
            f"  batch {check.batch_size}, {check.height}x{check.width}: max abs diff {check.max_abs_diff:.2e} {verdict}"
        )
    if any(check.max_abs_diff > args.atol for check in checks):
        print(
            f"maekit export: error: the exported model differs from PyTorch by more than {args.atol:g}.",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_batches(processor, images, config, static_batch: bool, static_size: bool) -> list[torch.Tensor]:
    """Batches that exercise what the export promises: batch 1 and all images; a second, non-square size."""
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    batches = [pixel_values[:1]] if static_batch else [pixel_values[:1], pixel_values]
    if not static_size:
        (height, width), (p, q) = config.image_hw, config.patch_hw
        other = {"height": (height * 3 // 2) // p * p, "width": (width * 5 // 4) // q * q}
        resized = processor(images, size=other, do_center_crop=False, return_tensors="pt")["pixel_values"]
        batches.append(resized[:1] if static_batch else resized)
    return batches


def _info(args: argparse.Namespace) -> int:
    from .info import model_info

    info = model_info(args.model, image_size=args.image_size, mask_ratio=args.mask_ratio)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.format())
    return 0


def _write_shards(args: argparse.Namespace) -> int:
    from .shard_writer import shard_pattern, write_shards

    source = args.source
    if source.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(source)):
        if not any(char in source for char in "*?[{"):  # not a glob or a brace pattern of shards either
            raise ValueError(f"SOURCE {source}: no such file or folder.")
    paths = write_shards(
        source,
        args.output_dir,
        max_shard_size=args.max_shard_size,
        max_samples_per_shard=args.max_samples_per_shard,
        prefix=args.prefix,
        image_column=args.image_column,
        label_column=args.label_column,
        split=args.split,
        config_name=args.config_name,
    )
    total = sum(os.path.getsize(path) for path in paths)
    print(f"Wrote {len(paths)} shard(s), {total / 1e6:.1f} MB: {shard_pattern(paths)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Reference documentation (docs/cli.md is completed from this at site build time)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def reference_markdown(width: int = 100) -> str:
    """`maekit --help` and every `maekit <command> --help`, as Markdown (the CLI reference of the docs site)."""
    from .convert import build_parser as convert_parser

    def section(title: str, parser: argparse.ArgumentParser) -> str:
        with _columns(width):
            text = parser.format_help()
        return f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n"

    parser = build_parser()
    sections = [section("maekit", parser)]
    for name, sub in _subparsers(parser).items():
        if name == "convert":  # parsed by maekit.convert (also installed as maekit-convert)
            sub = convert_parser(prog="maekit convert")
        sections.append(section(f"maekit {name}", sub))
    return "\n".join(sections)


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """Fix argparse's wrapping width (it follows the terminal) so the reference does not depend on where it is built."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
