"""Encode a folder, a file list or a dataset into one feature file (`maekit extract-features`).

Every input is read in order and nothing is substituted: a file that cannot be decoded is left out of the features and
listed by name with the reason. The work is written in chunks next to the output (`OUTPUT.parts/`), so an
interrupted run restarted with the same command skips the chunks it already finished; the chunk folder is removed
once the output is written.

Output formats (chosen by the suffix of the output path):

- `.safetensors`: tensors `features` (float32, `(N, hidden)` for `cls`/`mean`, `(N, 1 + num_patches, hidden)` for
  `tokens`), `indices` (int64: position of each row among the inputs) and `labels` (int64, when the inputs have
  labels); JSON metadata `file_names`, `bad_files`, `label_names`, `pooling`, `model`, `data`, `num_inputs`.
- `.parquet`: one row per encoded input with columns `index`, `file_name`, `label` (when present) and `features`
  (a fixed-size list); the same metadata as JSON under the schema key `maekit`. Parquet is written chunk by chunk,
  so it suits large inputs.

`load_feature_file` reads either back as a `FeatureFile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import MAEImageDataset, build_dataloader, collate_fn
from .evaluation import _pool
from .image_processing_mae import MAEImageProcessor
from .inputs import IMAGE_SUFFIXES, iter_image_files, read_file_list

__all__ = [
    "OUTPUT_SUFFIXES",
    "POOLINGS",
    "ExtractionResult",
    "FeatureFile",
    "ImageSource",
    "extract_features_to_file",
    "load_feature_file",
    "open_image_source",
]

POOLINGS = ("cls", "mean", "tokens")
OUTPUT_SUFFIXES = (".safetensors", ".parquet")
# safetensors refuses headers above 100 MB; file names live in its JSON header.
_MAX_SAFETENSORS_HEADER = 80_000_000
_RUN_FILE = "run.json"
# How a restart names what differs from the run that wrote the chunks (the keys of run.json).
_RUN_FIELDS = {
    "data": "DATA",
    "inputs": "inputs (their names, file sizes and modification times, or the dataset's fingerprint)",
    "num_inputs": "number of inputs",
    "chunk_size": "chunk size",
    "image_processor": "image processor",
}


@dataclass
class ImageSource:
    """The inputs of an extraction, in order.

    Args:
        records: what `MAEImageDataset` reads: a list of image paths, or a `datasets.Dataset`.
        names (`list[str]`): one name per input (a path, or `split[index]` for in-memory dataset images).
        labels (`list[int]`, *optional*): one class index per input, when the inputs have labels.
        label_names (`list[str]`, *optional*): class names, indexed by label.
        image_column (`str`, *optional*): the image column of a dataset.
        description (`str`): where the inputs come from, for messages and the output's metadata.
    """

    records: Any
    names: list[str]
    labels: list[int] | None = None
    label_names: list[str] | None = None
    image_column: str | None = None
    description: str = ""

    def __len__(self) -> int:
        return len(self.names)


def open_image_source(
    data: str | os.PathLike,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
) -> ImageSource:
    """Resolve DATA: an image folder, a `.txt` file list, an image file, a dataset folder or a Hub dataset id.

    - A folder holding image files: every image under it (links to folders are followed, loops are not), sorted by
      path, named relative to the folder. When every image sits exactly one level down (`DATA/<class>/<file>`), the
      sub-folder names are the labels (sorted).
    - A `.txt` file: one image path per line (see `maekit.inputs.read_file_list`); no labels.
    - A folder written by `save_to_disk` (a `Dataset` or a `DatasetDict`, read in place, see
      `maekit.data.load_saved_splits`), a folder of parquet/arrow files, or a Hub dataset id: loaded with `datasets`
      (split `split`); the image and label columns are found as in `maekit.data` (the `Image` / `ClassLabel` features)
      unless named.

    Example:

    ```python
    import tempfile
    from pathlib import Path

    from PIL import Image
    from maekit.features import open_image_source

    with tempfile.TemporaryDirectory() as folder:
        for name in ("cat/1.png", "cat/2.png", "dog/1.png"):
            (Path(folder) / name).parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(Path(folder) / name)
        source = open_image_source(folder)
        assert source.names == ["cat/1.png", "cat/2.png", "dog/1.png"]
        assert source.labels == [0, 0, 1] and source.label_names == ["cat", "dog"]
    ```
    """
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".txt":
            images = read_file_list(path)
            return ImageSource(images, list(images), description=f"file list {data}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource([str(path)], [str(data)], description=str(data))
        raise ValueError(
            f"DATA {data} is a file but neither a .txt file list nor an image ({', '.join(IMAGE_SUFFIXES)})."
        )
    images = sorted(iter_image_files(path)) if path.is_dir() else []  # as find_images lists a folder, walked once
    if images:
        names = [Path(image).relative_to(path).as_posix() for image in images]
        labels = label_names = None
        if all(name.count("/") == 1 for name in names):
            label_names = sorted({name.split("/")[0] for name in names})
            index = {label: i for i, label in enumerate(label_names)}
            labels = [index[name.split("/")[0]] for name in names]
        return ImageSource(images, names, labels, label_names, description=f"image folder {data}")
    if not path.exists() and (str(data).startswith((".", "/", "~")) or path.suffix.lower() in IMAGE_SUFFIXES):
        raise ValueError(f"DATA {data}: no such file or folder.")
    return _dataset_source(str(data), split, image_column, label_column)


def _dataset_source(data: str, split: str, image_column: str | None, label_column: str | None) -> ImageSource:
    import datasets
    import pyarrow.compute as pc

    from .data import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, find_column, load_saved_splits

    path = Path(data)
    try:
        saved = load_saved_splits(data, split) if path.is_dir() else None
        if saved is None:
            dataset = datasets.load_dataset(data, split=split)
        elif split in saved:
            dataset = saved[split]
        else:
            raise ValueError(f"DATA {data} has no split {split!r}; splits: {list(saved)}.")
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        if path.is_dir():
            raise ValueError(f"DATA {data}: loading this dataset folder failed: {err}") from err
        raise ValueError(
            f"DATA {data!r} is not a file or folder here, and loading it as a Hub dataset failed: {err}"
        ) from err
    image_column = find_column(dataset.features, IMAGE_COLUMN_NAMES, image_column, "image")
    label_column = find_column(dataset.features, LABEL_COLUMN_NAMES, label_column, "label")
    table = dataset.with_format("arrow")
    column = table[image_column]
    if isinstance(dataset.features[image_column], datasets.Image):
        paths = pc.struct_field(column, "path").to_pylist()
        names = [name or f"{split}[{i}]" for i, name in enumerate(paths)]
    else:  # a column of file paths
        names = [str(name) for name in column.to_pylist()]
    labels = label_names = None
    if label_column is not None:
        labels = [int(label) for label in table[label_column].to_pylist()]
        feature = dataset.features[label_column]
        label_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return ImageSource(dataset, names, labels, label_names, image_column, description=f"dataset {data} ({split})")


@dataclass
class FeatureFile:
    """A feature file written by `extract_features_to_file`, read back by `load_feature_file`.

    Args:
        features (`torch.Tensor`): float32 `(N, hidden)` (`cls`, `mean`) or `(N, 1 + num_patches, hidden)` (`tokens`).
        indices (`torch.Tensor`): int64 `(N,)`, the position of each row among the inputs.
        file_names (`list[str]`): the name of each row's input.
        labels (`torch.Tensor`, *optional*): int64 `(N,)` class indices, when the inputs had labels.
        label_names (`list[str]`, *optional*): class names indexed by label.
        bad_files (`list[dict]`): `{"index", "file", "error"}` for every input that could not be decoded; `error` is
            the message of `MAEImageDataset(mark_bad_images=True)`, which names the file.
        metadata (`dict`): `pooling`, `model`, `data`, `num_inputs`.
    """

    features: torch.Tensor
    indices: torch.Tensor
    file_names: list[str]
    labels: torch.Tensor | None = None
    label_names: list[str] | None = None
    bad_files: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass
class ExtractionResult:
    """What `extract_features_to_file` did.

    Args:
        output (`Path`): the file written.
        num_inputs (`int`): inputs read (encoded + bad).
        num_encoded (`int`): rows in the output.
        feature_shape (`tuple[int, ...]`): shape of one row's features.
        bad_files (`list[dict]`): `{"index", "file", "error"}` of every input left out (as in `FeatureFile`).
        resumed_inputs (`int`): inputs whose chunks an earlier, interrupted run had already written.
    """

    output: Path
    num_inputs: int
    num_encoded: int
    feature_shape: tuple[int, ...]
    bad_files: list[dict]
    resumed_inputs: int = 0


class _ProcessorTransform:
    """`MAEImageDataset` transform from an image processor: `(image, generator) -> (C, H, W)` tensor."""

    def __init__(self, processor: MAEImageProcessor):
        self.processor = processor

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


def _model_fingerprint(model: nn.Module) -> str:
    """A digest of the configuration and the weights: a restart must not mix chunks of two different models."""
    digest = hashlib.sha256(json.dumps(getattr(model.config, "to_dict", dict)(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():  # the bytes themselves: the same on any device
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _inputs_fingerprint(source: ImageSource) -> str:
    """A digest of the inputs without reading them: their names, the size and modification time of every file read
    from disk, and a dataset's own fingerprint (`datasets` derives it from the content, so two datasets of in-memory
    images named `train[0]`, `train[1]`, ... are told apart)."""
    digest = hashlib.sha256("\n".join(source.names).encode())
    fingerprint = getattr(source.records, "_fingerprint", None)
    if fingerprint is not None:
        digest.update(f"\ndataset {fingerprint}".encode())
    for path in _files_read_from_disk(source):
        try:
            stat = os.stat(path)
        except OSError:
            digest.update(b"\n-")  # a missing file: listed as a bad file when it is read
        else:
            digest.update(f"\n{stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _files_read_from_disk(source: ImageSource) -> list:
    """The paths that decoding will open: every path of a file list, and a dataset's images stored as paths."""
    records = source.records
    if isinstance(records, (list, tuple)):
        return [record for record in records if isinstance(record, (str, os.PathLike))]
    import datasets

    if not isinstance(records, datasets.Dataset) or source.image_column is None:
        return []
    column = records.with_format("arrow")[source.image_column]
    if not isinstance(records.features[source.image_column], datasets.Image):
        return [value for value in column.to_pylist() if value is not None]  # a column of file paths
    import pyarrow.compute as pc

    # An Image record is read from its path when it holds no bytes (as `maekit.data.decode_image` does).
    without_bytes = pc.fill_null(pc.equal(pc.binary_length(pc.struct_field(column, "bytes")), 0), True)
    paths = pc.struct_field(column, "path").to_pylist()
    return [path for path, from_disk in zip(paths, without_bytes.to_pylist()) if from_disk and path]


@torch.no_grad()
def extract_features_to_file(
    model: nn.Module,
    source: ImageSource,
    output: str | os.PathLike,
    image_processor: MAEImageProcessor,
    *,
    pooling: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    model_name: str = "",
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> ExtractionResult:
    """Encode every input of `source` with the frozen encoder (no masking) and write one feature file.

    Args:
        model (`nn.Module`): an `MAEModel`, or a model holding one as `.mae` (its encoder is used).
        source (`ImageSource`): the inputs (`open_image_source`).
        output (`str` or `Path`): a `.safetensors` or `.parquet` path; refused if it exists unless `overwrite`.
        image_processor (`MAEImageProcessor`): the model's preprocessing (`maekit.inputs.load_image_processor`).
        pooling (`str`): `"cls"` (cls token after the final norm), `"mean"` (mean of the patch tokens) or `"tokens"`
            (every token, `(1 + num_patches, hidden)` per input).
        batch_size (`int`): images per forward pass.
        num_workers (`int`): DataLoader worker processes decoding images.
        chunk_size (`int`): inputs per chunk written to `OUTPUT.parts/` (the work lost when a run is interrupted). A
            restart reuses the chunks only for the same model, `source.description`, inputs (their names, the size
            and modification time of each file read from disk, a dataset's fingerprint), pooling, chunk size, dtype
            and image processor; anything else is refused with a `ValueError` naming what differs.
        device (`str` or `torch.device`, *optional*): default `cuda` when available, else `cpu`.
        dtype (`torch.dtype`): `torch.float32`, or `torch.bfloat16` / `torch.float16` for autocast (the features are
            stored in float32 either way).
        model_name (`str`): recorded in the output's metadata.
        overwrite (`bool`): replace an existing output.
        progress (`bool`): show a progress bar (on stderr).
        on_chunk (`Callable[[int], None]`, *optional*): called with the chunk number after each chunk is written.

    Returns:
        `ExtractionResult`.

    Example:

    ```python
    import tempfile
    from pathlib import Path

    from PIL import Image
    from maekit import MAEConfig, MAEImageProcessor, MAEModel
    from maekit.features import extract_features_to_file, load_feature_file, open_image_source

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    processor = MAEImageProcessor(size={"height": 32, "width": 32})
    with tempfile.TemporaryDirectory() as folder:
        for i in range(3):
            Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(f"{folder}/{i}.png")
        Path(folder, "3.png").write_bytes(b"not an image")
        source = open_image_source(folder)
        result = extract_features_to_file(MAEModel(config), source, f"{folder}/features.safetensors", processor,
                                          progress=False)
        assert result.num_encoded == 3 and [bad["file"] for bad in result.bad_files] == ["3.png"]
        loaded = load_feature_file(f"{folder}/features.safetensors")
        assert loaded.features.shape == (3, 32) and loaded.file_names == ["0.png", "1.png", "2.png"]
    ```
    """
    output = Path(output)
    _check_arguments(output, pooling, batch_size, num_workers, chunk_size, dtype, overwrite)
    if len(source) == 0:
        raise ValueError(f"{source.description or 'DATA'} holds no inputs.")
    if output.suffix == ".safetensors":
        header = len(json.dumps(source.names)) + len(json.dumps(source.label_names or []))
        if header > _MAX_SAFETENSORS_HEADER:
            raise ValueError(
                f"{len(source):,} file names do not fit in a safetensors header (100 MB at most); write a .parquet "
                "output instead."
            )
    encoder = getattr(model, "mae", model)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    was_training = encoder.training
    encoder.eval().to(device)
    parts = output.with_name(output.name + ".parts")
    # What a restart must share with the run that wrote the chunks, or their rows would be another extraction's.
    run = {
        "model": _model_fingerprint(encoder),
        "data": source.description,
        "inputs": _inputs_fingerprint(source),
        "num_inputs": len(source),
        "pooling": pooling,
        "chunk_size": chunk_size,
        "dtype": str(dtype),
        "image_processor": image_processor.to_json_string(),
    }
    _prepare_parts(parts, run)
    num_chunks = -(-len(source) // chunk_size)
    done = {chunk for chunk in range(num_chunks) if _chunk_path(parts, chunk).is_file()}
    resumed = sum(min(chunk_size, len(source) - chunk * chunk_size) for chunk in done)
    plan = _plan_batches(len(source), num_chunks, done, chunk_size, batch_size)
    # A file that cannot be decoded keeps its place as a marked item (zeros, and the error naming it): never replaced.
    images = MAEImageDataset(
        source.records, _ProcessorTransform(image_processor), image_column=source.image_column, mark_bad_images=True
    )
    loader = build_dataloader(
        images,
        None,
        batch_sampler=[indices for _, indices, _ in plan],
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    from tqdm.auto import tqdm

    num_bad = sum(len(_chunk_errors(parts, chunk)) for chunk in done)
    bar = tqdm(total=len(source), initial=resumed, unit="img", desc="extract-features", disable=not progress)
    try:
        _encode_chunks(encoder, loader, plan, parts, pooling, device, dtype, bar, num_bad, on_chunk)
    finally:
        bar.close()
        encoder.train(was_training)
    metadata = {
        "pooling": pooling,
        "model": model_name,
        "data": source.description,
        "num_inputs": len(source),
    }
    num_encoded, feature_shape, bad_files = _merge(parts, num_chunks, source, output, metadata)
    shutil.rmtree(parts)
    return ExtractionResult(output, len(source), num_encoded, feature_shape, bad_files, resumed)


def _plan_batches(num_inputs: int, num_chunks: int, done: set[int], chunk_size: int, batch_size: int) -> list:
    """`(chunk, indices, last batch of its chunk)` for every batch still to encode, in input order; batches never
    straddle two chunks."""
    plan = []
    for chunk in sorted(set(range(num_chunks)) - done):
        end = min((chunk + 1) * chunk_size, num_inputs)
        starts = range(chunk * chunk_size, end, batch_size)
        plan += [(chunk, list(range(start, min(start + batch_size, end))), start == starts[-1]) for start in starts]
    return plan


def _encode_chunks(encoder, loader, plan, parts: Path, pooling, device, dtype, bar, num_bad: int, on_chunk) -> None:
    """Encode the planned batches (bad files left out, their errors kept) and write each chunk when it is complete."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    feature_shape = _empty_shape(encoder, pooling)
    pending: dict[str, list] = {"features": [], "indices": [], "errors": []}
    for (chunk, indices, last_of_chunk), batch in zip(plan, loader):
        markers = batch["bad_images"]  # None, or the error naming the file, per item
        good = [row for row, marker in enumerate(markers) if marker is None]
        if good:
            pixel_values = batch["pixel_values"] if len(good) == len(indices) else batch["pixel_values"][good]
            with autocast:
                hidden = encoder(pixel_values.to(device, non_blocking=True)).last_hidden_state
            features = _pool(hidden, pooling).float().cpu()  # (B, D) or (B, 1 + L, D)
            feature_shape = tuple(features.shape[1:])
            pending["features"].append(features)
            pending["indices"] += [indices[row] for row in good]
        errors = [(indices[row], marker) for row, marker in enumerate(markers) if marker is not None]
        pending["errors"] += errors
        num_bad += len(errors)
        bar.update(len(indices))
        bar.set_postfix(bad=num_bad, refresh=False)
        if last_of_chunk:
            _write_chunk(parts, chunk, pending, feature_shape)
            pending = {"features": [], "indices": [], "errors": []}
            if on_chunk is not None:
                on_chunk(chunk)


def _check_arguments(output, pooling, batch_size, num_workers, chunk_size, dtype, overwrite) -> None:
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output} must end in {' or '.join(OUTPUT_SUFFIXES)}.")
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} exists; remove it or pass overwrite=True (--overwrite).")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("chunk_size", chunk_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}.")


def _empty_shape(encoder: nn.Module, pooling: str) -> tuple[int, ...]:
    config = encoder.config
    return (config.hidden_size,) if pooling != "tokens" else (1 + config.num_patches, config.hidden_size)


def _prepare_parts(parts: Path, run: dict) -> None:
    """Create the chunk folder, or check that the one left by an interrupted run belongs to the same extraction."""
    run_file = parts / _RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        changed = [_RUN_FIELDS.get(key, key) for key in run if previous.get(key) != run[key]]
        if changed:
            raise ValueError(
                f"{parts} holds the chunks of another extraction; what differs: {'; '.join(changed)}. Delete that "
                "folder to start over, or run the same command as before to finish it."
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_file, json.dumps(run, indent=1).encode())


def _chunk_path(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:06d}.safetensors"


def _chunk_errors(parts: Path, chunk: int) -> list:
    """The (index, error) pairs of a written chunk, read from its header only."""
    from safetensors import safe_open

    with safe_open(_chunk_path(parts, chunk), framework="pt") as f:
        return json.loads(f.metadata()["errors"])


def _write_chunk(parts: Path, chunk: int, pending: dict, feature_shape: tuple[int, ...]) -> None:
    from safetensors.torch import save

    features = torch.cat(pending["features"]) if pending["features"] else torch.zeros(0, *feature_shape)
    tensors = {"features": features.contiguous(), "indices": torch.tensor(pending["indices"], dtype=torch.int64)}
    _atomic_write(_chunk_path(parts, chunk), save(tensors, metadata={"errors": json.dumps(pending["errors"])}))


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _read_chunks(parts: Path, num_chunks: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    for chunk in range(num_chunks):
        with safe_open(_chunk_path(parts, chunk), framework="pt") as f:
            yield f.get_tensor("features"), f.get_tensor("indices")


def _merge(parts: Path, num_chunks: int, source: ImageSource, output: Path, metadata: dict):
    """Join the chunks into `output`; returns (rows, feature shape, bad files)."""
    bad_files = [
        {"index": index, "file": source.names[index], "error": error}
        for chunk in range(num_chunks)
        for index, error in _chunk_errors(parts, chunk)
    ]
    metadata = {**metadata, "bad_files": bad_files, "label_names": source.label_names}
    tmp = output.with_name(output.name + ".tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    merge = _merge_parquet if output.suffix == ".parquet" else _merge_safetensors
    rows, shape = merge(parts, num_chunks, source, tmp, metadata)
    os.replace(tmp, output)
    return rows, shape, bad_files


def _merge_safetensors(parts, num_chunks, source, tmp, metadata):
    from safetensors.torch import save_file

    features, indices = zip(*_read_chunks(parts, num_chunks))
    tensors = {"features": torch.cat(features), "indices": torch.cat(indices)}
    rows = tensors["indices"].tolist()
    if source.labels is not None:
        tensors["labels"] = torch.tensor([source.labels[i] for i in rows], dtype=torch.int64)
    header = {key: json.dumps(value) for key, value in metadata.items()}
    header["file_names"] = json.dumps([source.names[i] for i in rows])
    save_file(tensors, tmp, metadata=header)
    return len(rows), tuple(tensors["features"].shape[1:])


def _merge_parquet(parts, num_chunks, source, tmp, metadata):
    """One row group per chunk: memory stays at one chunk whatever the number of inputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, rows, shape = None, 0, None
    try:
        for features, chunk_indices in _read_chunks(parts, num_chunks):
            indices = chunk_indices.tolist()
            shape = tuple(features.shape[1:])
            values = pa.array(features.reshape(-1).numpy())
            for size in reversed(shape):  # (N, D) -> list<D>; (N, T, D) -> list<T> of list<D>
                values = pa.FixedSizeListArray.from_arrays(values, size)
            columns = {
                "index": pa.array(indices, pa.int64()),
                "file_name": pa.array([source.names[i] for i in indices], pa.string()),
            }
            if source.labels is not None:
                columns["label"] = pa.array([source.labels[i] for i in indices], pa.int64())
            columns["features"] = values
            table = pa.table(columns).replace_schema_metadata({"maekit": json.dumps(metadata)})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += len(indices)
    finally:
        if writer is not None:
            writer.close()
    return rows, shape


def load_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read a `.safetensors` or `.parquet` file written by `extract_features_to_file` (or `maekit extract-features`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            if "file_names" not in header:
                raise ValueError(f"{path} is not a maekit feature file (no file_names in its metadata).")
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
            features, indices = f.get_tensor("features"), f.get_tensor("indices")
        metadata = {key: json.loads(header[key]) for key in ("pooling", "model", "data", "num_inputs")}
        return FeatureFile(
            features,
            indices,
            json.loads(header["file_names"]),
            labels,
            json.loads(header["label_names"]),
            json.loads(header["bad_files"]),
            metadata,
        )
    if path.suffix == ".parquet":
        import numpy as np
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"maekit")
        if raw is None:
            raise ValueError(f"{path} is not a maekit feature file (no 'maekit' schema metadata).")
        info = json.loads(raw)
        values = table.column("features").combine_chunks()
        shape = [len(table)]
        while hasattr(values, "flatten") and hasattr(values.type, "list_size"):
            shape.append(values.type.list_size)
            values = values.flatten()
        features = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
        labels = torch.tensor(table.column("label").to_pylist()) if "label" in table.column_names else None
        return FeatureFile(
            features,
            torch.tensor(table.column("index").to_pylist(), dtype=torch.int64),
            table.column("file_name").to_pylist(),
            labels,
            info.pop("label_names"),
            info.pop("bad_files"),
            info,
        )
    raise ValueError(f"{path}: feature files end in {' or '.join(OUTPUT_SUFFIXES)}.")


def describe(result: ExtractionResult, pooling: str, max_listed: int = 20) -> str:
    """A summary of an extraction for the command line: counts, shape, and the bad files by name."""
    lines = [
        f"Wrote {result.output}: {result.num_encoded} of {result.num_inputs} inputs, features "
        f"{(result.num_encoded, *result.feature_shape)} float32 ({pooling})"
        + (f"; {result.resumed_inputs} inputs resumed from an interrupted run" if result.resumed_inputs else "")
    ]
    if result.bad_files:
        lines.append(f"{len(result.bad_files)} bad file(s) left out (listed in the output's bad_files):")
        lines += [f"  {bad['error']}" for bad in result.bad_files[:max_listed]]  # each message names its file
        if len(result.bad_files) > max_listed:
            lines.append(f"  ... and {len(result.bad_files) - max_listed} more")
    else:
        lines.append("0 bad files.")
    return "\n".join(lines)
