"""`load_image_dataset(local_path)` reads every local layout `datasets.load_dataset(path)` reads, with the right count."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from maekit.data import MAEImageDataset, MAEIterableImageDataset, MAETrainTransform, load_image_dataset
from maekit.shards import ShardedImageDataset

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})


def _png(i):
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), i * 20 % 256, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _dataset(count, start=0):
    images = [{"bytes": _png(start + i), "path": None} for i in range(count)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features=FEATURES)


def _check(train, count, labels=True):
    """`train` has `count` examples that decode into training samples (with labels)."""
    if isinstance(train, (datasets.Dataset,)):
        assert len(train) == count
        sample = MAEImageDataset(train, MAETrainTransform(size=8))[0]
    else:
        samples = list(MAEIterableImageDataset(train, MAETrainTransform(size=8)))
        assert len(samples) == count
        sample = samples[0]
    assert sample["pixel_values"].shape == (3, 8, 8)
    assert ("labels" in sample) == labels


def test_hub_layout_parquet_folder(tmp_path):
    # The layout of a dataset repository: data/train-0000x-of-00004.parquet (was read as zero images).
    (tmp_path / "data").mkdir()
    for k in range(4):
        _dataset(3, start=3 * k).to_parquet(str(tmp_path / "data" / f"train-{k:05d}-of-00004.parquet"))
    _dataset(2).to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    train, evaluation = load_image_dataset(str(tmp_path))
    _check(train, 12)
    assert len(evaluation) == 2 and train.features["label"].names == ["a", "b", "c"]
    stream, _ = load_image_dataset(str(tmp_path), streaming=True)
    _check(stream, 12)


@pytest.mark.parametrize("kind", ["parquet", "arrow", "json", "csv"])
def test_folder_of_data_files(tmp_path, kind):
    folder = tmp_path / "set"
    folder.mkdir()
    if kind == "parquet":
        _dataset(5).to_parquet(str(folder / "part-0.parquet"))
        _dataset(4).to_parquet(str(folder / "part-1.parquet"))
    elif kind == "arrow":
        for k, count in enumerate((5, 4)):
            writer = datasets.arrow_writer.ArrowWriter(path=str(folder / f"part-{k}.arrow"), features=FEATURES)
            writer.write_batch(_dataset(count).to_dict())
            writer.finalize()
    else:  # image files referenced by path from the rows
        rows = []
        for i in range(9):
            path = tmp_path / f"{i}.png"
            path.write_bytes(_png(i))
            rows.append({"image": str(path), "label": i % 3})
        if kind == "json":
            (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            (folder / "rows.csv").write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows))
    train, evaluation = load_image_dataset(str(folder), image_column="image")
    assert evaluation is None
    if kind in ("json", "csv"):  # paths in a text column: cast it to images, as with datasets itself
        train = train.cast_column("image", datasets.Image())
    _check(train, 9)


def test_single_files_globs_and_explicit_builders(tmp_path):
    _dataset(5).to_parquet(str(tmp_path / "a.parquet"))
    _dataset(4).to_parquet(str(tmp_path / "b.parquet"))
    _check(load_image_dataset(str(tmp_path / "a.parquet"))[0], 5)
    _check(load_image_dataset(str(tmp_path / "*.parquet"))[0], 9)
    # Explicit builders, as --dataset_name parquet --data_dir ... (unchanged).
    _check(load_image_dataset("parquet", data_dir=str(tmp_path))[0], 9)
    _check(load_image_dataset("parquet", data_files=str(tmp_path / "b.parquet"))[0], 4)


def test_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({"train": _dataset(6), "test": _dataset(2)}).save_to_disk(str(tmp_path / "saved"))
    train, evaluation = load_image_dataset(str(tmp_path / "saved"))
    _check(train, 6)
    assert len(evaluation) == 2
    _dataset(3).save_to_disk(str(tmp_path / "single"))
    _check(load_image_dataset(str(tmp_path / "single"))[0], 3)


def test_image_folder_with_classes(tmp_path):
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.png").write_bytes(_png(i))
    train, _ = load_image_dataset(str(tmp_path))
    _check(train, 6)
    assert train.features["label"].names == ["cats", "dogs"]


def test_folder_of_tar_shards_with_splits(tmp_path):
    def shard(path, start, count):
        with tarfile.open(path, "w") as tar:
            for i in range(start, start + count):
                for extension, data in (("png", _png(i)), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    shard(tmp_path / "train-0000.tar", 0, 4)
    shard(tmp_path / "train-0001.tar", 4, 3)
    shard(tmp_path / "validation-0000.tar", 7, 2)
    train, evaluation = load_image_dataset(str(tmp_path))
    assert isinstance(train, ShardedImageDataset) and train.num_shards == 2
    _check(train, 7)
    _check(evaluation, 2)
    _check(load_image_dataset(str(tmp_path / "train-{0000..0001}.tar"))[0], 7)


def test_empty_datasets_are_reported_as_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"No data in .*empty"):
        load_image_dataset(str(tmp_path / "empty"))
    # A folder of text files: a text dataset, no image column; the error names the folder.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"notes.*No image column found among \['text'\]"):
        load_image_dataset(str(tmp_path / "notes"))
    # Data files with zero rows, map-style and streamed.
    (tmp_path / "zero" / "data").mkdir(parents=True)
    _dataset(0).to_parquet(str(tmp_path / "zero" / "data" / "train-00000-of-00001.parquet"))
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"'train' split of .*zero.* is empty"):
            load_image_dataset(str(tmp_path / "zero"), streaming=streaming)
    # Shards without a single member.
    with tarfile.open(tmp_path / "none-0.tar", "w"):
        pass
    with pytest.raises(ValueError, match="hold no sample"):
        load_image_dataset(str(tmp_path / "none-{0..0}.tar"))
    with pytest.raises(ValueError, match="do not exist"):
        load_image_dataset(str(tmp_path / "missing-{0..3}.tar"))
