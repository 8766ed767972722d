"""Tar shards: split across readers (every sample once per epoch), shuffle, exact resume, bad samples, the writer."""

import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from maekit.cli import main as maekit_main
from maekit.data import MAEIterableImageDataset, MAETrainTransform, load_image_dataset
from maekit.shard_writer import shard_pattern, write_shards
from maekit.shards import ShardedImageDataset, ShardReader, expand_shard_urls
from maekit.shards import _TarCursor as TarCursor

SIZES = (7, 3, 5, 6, 4)  # samples per shard: uneven on purpose


def _jpeg(i, size=(20, 16)):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _write_tar(path, samples):
    """`samples`: [(key, {extension: bytes})] written in order with plain tarfile (as other tools write shards)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Five shards of 25 labelled samples; returns (brace pattern, all keys)."""
    root = tmp_path_factory.mktemp("shards")
    keys, index = [], 0
    for k, size in enumerate(SIZES):
        samples = []
        for _ in range(size):
            samples.append((f"s{index:04d}", {"jpg": _jpeg(index), "cls": str(index % 4).encode()}))
            keys.append(f"s{index:04d}")
            index += 1
        _write_tar(root / f"train-{k:04d}.tar", samples)
    return str(root / "train-{0000..0004}.tar"), keys


def _keys(records):
    return [record["__key__"] for record in records]


def test_brace_patterns_and_globs(shards, tmp_path):
    pattern, _ = shards
    urls = expand_shard_urls(pattern)
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-{k:04d}.tar" for k in range(5)]
    assert expand_shard_urls(pattern.replace("{0000..0004}", "*")) == urls
    assert expand_shard_urls([urls[1], urls[0]]) == [urls[1], urls[0]]
    from maekit.shards import _expand_braces

    assert _expand_braces("a{08..10}-{x,y{1..2}}") == [
        f"a{n}-{s}" for n in ("08", "09", "10") for s in ("x", "y1", "y2")
    ]
    with pytest.raises(ValueError, match="do not exist"):
        expand_shard_urls(str(tmp_path / "none-{0..2}.tar"))


@pytest.mark.parametrize("shuffle_buffer", [0, 4, 100])
def test_every_sample_exactly_once_per_epoch_across_2_processes_x_2_workers(shards, shuffle_buffer):
    pattern, keys = shards
    dataset = ShardedImageDataset(pattern, seed=3, shuffle_buffer=shuffle_buffer)
    orders = {}
    for epoch in (0, 1):
        per_reader = []
        for process in range(2):
            for worker in range(2):  # reader rank = process * workers + worker, as in ShardedImageDataset.__iter__
                reader = dataset.reader(epoch=epoch, rank=process * 2 + worker, world_size=4)
                per_reader.append(_keys(reader))
        seen = [key for part in per_reader for key in part]
        assert Counter(seen) == Counter(keys)  # every sample once, none twice
        assert all(per_reader)  # 5 shards for 4 readers: each reads at least one
        orders[epoch] = per_reader
        # Deterministic from (seed, epoch).
        assert _keys(dataset.reader(epoch=epoch, rank=1, world_size=4)) == per_reader[1]
    assert orders[0] != orders[1]  # shard order and buffer draws change with the epoch


def test_fewer_shards_than_readers_split_by_sample(shards):
    pattern, keys = shards
    dataset = ShardedImageDataset(pattern, shuffle_buffer=3)
    parts = [_keys(dataset.reader(epoch=0, rank=rank, world_size=8)) for rank in range(8)]
    assert Counter(key for part in parts for key in part) == Counter(keys)
    assert all(len(part) in (3, 4) for part in parts)  # 25 samples dealt one by one to 8 readers


def test_real_dataloader_workers_read_each_sample_once(shards):
    pattern, keys = shards
    seen = []
    for process in range(2):
        dataset = ShardedImageDataset(pattern, shuffle_buffer=5, rank=process, world_size=2)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda r: r)
        seen += _keys(loader)
    assert Counter(seen) == Counter(keys)
    # Decoded through the streaming image dataset and maekit's loader: every sample, with its label.
    from maekit.data import build_dataloader

    stream = MAEIterableImageDataset(ShardedImageDataset(pattern, shuffle_buffer=5), MAETrainTransform(size=8))
    batches = list(build_dataloader(stream, batch_size=4, num_workers=2, drop_last=False))
    assert sum(len(b["labels"]) for b in batches) == len(keys) and sum(int(b["num_skipped"]) for b in batches) == 0


def test_shuffle_buffer_mixes_shards(shards):
    pattern, keys = shards
    in_order = _keys(ShardReader(expand_shard_urls(pattern), shuffle_buffer=0, shuffle_shards=False))
    assert in_order == keys
    shuffled = _keys(ShardReader(expand_shard_urls(pattern), shuffle_buffer=10, shuffle_shards=False, seed=1))
    assert sorted(shuffled) == keys and shuffled != keys


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_resume_from_a_saved_position_equals_uninterrupted(shards, world_size):
    pattern, _ = shards
    dataset = ShardedImageDataset(pattern, seed=7, shuffle_buffer=6)
    rank = world_size - 1
    uninterrupted = list(dataset.reader(epoch=2, rank=rank, world_size=world_size))
    for stop in range(len(uninterrupted) + 1):  # every cut: mid-shard, at shard ends, while draining, at the end
        reader = dataset.reader(epoch=2, rank=rank, world_size=world_size)
        head = [next(reader) for _ in range(stop)]
        state = json.loads(json.dumps(reader.state_dict()))  # what a checkpoint holds
        reader.close()
        resumed = dataset.reader(epoch=2, rank=rank, world_size=world_size, state=state)
        tail = list(resumed)
        assert _keys(head + tail) == _keys(uninterrupted)
        assert [r["image"]["bytes"] for r in head + tail] == [r["image"]["bytes"] for r in uninterrupted]
        assert [r["label"] for r in head + tail] == [r["label"] for r in uninterrupted]
    with pytest.raises(ValueError, match="epoch: saved 2, now 3"):
        dataset.reader(epoch=3, rank=rank, world_size=world_size, state=state)
    other_seed = ShardedImageDataset(pattern, seed=8, shuffle_buffer=6)
    with pytest.raises(ValueError, match="seed: saved 7, now 8"):
        other_seed.reader(epoch=2, rank=rank, world_size=world_size, state=state)


def test_resume_seeks_instead_of_rereading(shards, monkeypatch):
    pattern, _ = shards
    dataset = ShardedImageDataset(pattern, shuffle_buffer=2, shuffle_shards=False)
    reader = dataset.reader(epoch=0)
    for _ in range(12):  # well into the third shard
        next(reader)
    state = reader.state_dict()
    reader.close()
    read = []
    original = TarCursor._read
    monkeypatch.setattr(
        TarCursor, "_read", lambda self, offset, size: read.append(size) or original(self, offset, size)
    )
    dataset.reader(epoch=0, state=state)
    # The two buffered samples are fetched again by seeking to them (a header and a payload per member), nothing more.
    # Per sample: two members (header + payload each) and the header after it, which ends the sample.
    assert len(read) <= 2 * (2 * 2 + 1) and sum(read) < 3 * max(len(_jpeg(i)) for i in range(25)) + 4096


def test_a_position_survives_moving_the_shards(shards, tmp_path):
    import shutil

    pattern, _ = shards
    reader = ShardedImageDataset(pattern, shuffle_buffer=4).reader(epoch=1)
    head = [next(reader) for _ in range(9)]
    moved = tmp_path / "elsewhere"
    shutil.copytree(pattern.rsplit("/", 1)[0], moved)
    tail = list(
        ShardedImageDataset(str(moved / "train-{0000..0004}.tar"), shuffle_buffer=4).reader(
            epoch=1, state=reader.state_dict()
        )
    )
    assert _keys(head + tail) == _keys(ShardedImageDataset(pattern, shuffle_buffer=4).reader(epoch=1))


def test_bad_samples_inside_shards_are_skipped_and_counted(tmp_path):
    good = {i: {"jpg": _jpeg(i), "cls": b"1"} for i in range(12)}
    samples = [(f"k{i:02d}", members) for i, members in good.items()]
    samples[2] = ("k02", {"jpg": b"this is not a JPEG", "cls": b"1"})  # undecodable image (caught by the decoder)
    samples[4] = ("k04", {"cls": b"1"})  # no image member
    samples[6] = ("k06", {"jpg": _jpeg(6), "cls": b"one"})  # label is not an integer
    samples[8] = ("k08", {"jpg": _jpeg(8)})  # no label, when the others have one
    _write_tar(tmp_path / "a-0.tar", samples[:10])
    _write_tar(tmp_path / "a-1.tar", samples[10:])
    # A corrupt tar header in the middle of a third shard: k21's image header is overwritten.
    _write_tar(tmp_path / "a-2.tar", [(f"k{i}", {"jpg": _jpeg(i), "cls": b"2"}) for i in range(20, 24)])
    data = bytearray((tmp_path / "a-2.tar").read_bytes())
    header = data.index(b"k21.jpg")
    data[header : header + 100] = b"\x07" * 100  # name and mode garbled: the checksum no longer matches
    (tmp_path / "a-2.tar").write_bytes(bytes(data))
    # A fourth shard cut short inside its second sample.
    _write_tar(tmp_path / "a-3.tar", [(f"k{i}", {"jpg": _jpeg(i), "cls": b"3"}) for i in range(30, 33)])
    cut = (tmp_path / "a-3.tar").read_bytes()
    (tmp_path / "a-3.tar").write_bytes(cut[: cut.index(b"k31.jpg") + 800])

    dataset = ShardedImageDataset(str(tmp_path / "a-{0..3}.tar"), shuffle_buffer=4)
    reader = dataset.reader(epoch=0)
    keys = sorted(_keys(reader))
    # Read: 12 - 3 bad (k04, k06, k08) + 3 of 4 (k21 lost) + 1 of 3 (k31 cut, k32 never reached).
    assert keys == sorted([f"k{i:02d}" for i in range(12) if i not in (4, 6, 8)] + ["k20", "k22", "k23", "k30"])
    assert reader.num_skipped == 5  # k04, k06, k08, k21, k31

    stream = MAEIterableImageDataset(dataset, MAETrainTransform(size=8))
    samples_out = list(stream)
    assert len(samples_out) == 12 and sum(s["num_skipped"] for s in samples_out) == 6  # + the undecodable k02
    assert all(s["pixel_values"].shape == (3, 8, 8) and "labels" in s for s in samples_out)


def test_writer_round_trip_and_determinism(tmp_path):
    count = 23
    images = [{"bytes": _jpeg(i, (24 + i, 20)), "path": None} for i in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abc"))})
    source = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features=features)
    limit = 4 * 1024
    paths = write_shards(source, tmp_path / "one", max_shard_size=limit)
    assert len(paths) > 3 and all(p.endswith(f"shard-{k:06d}.tar") for k, p in enumerate(paths))
    import os

    assert all(os.path.getsize(p) <= -(-limit // 10240) * 10240 for p in paths)  # tar pads to 10 KiB records
    again = write_shards(source, tmp_path / "two", max_shard_size=limit)
    assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]  # byte-identical

    back = list(ShardReader(paths, shuffle_buffer=0, shuffle_shards=False))
    assert [r["image"]["bytes"] for r in back] == [image["bytes"] for image in images]  # no re-encoding
    assert [r["label"] for r in back] == source["label"]
    assert [r["__key__"] for r in back] == [f"{i:09d}" for i in range(count)]
    # Same again through the public entry point, from the brace pattern.
    train, _ = load_image_dataset(shard_pattern(paths), shuffle_buffer=0)
    assert train.num_shards == len(paths)
    with pytest.raises(ValueError, match="already holds shards"):
        write_shards(source, tmp_path / "one")


def test_writer_from_folder_parquet_and_shards_with_the_cli(tmp_path, capsys):
    folder = tmp_path / "images"
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            (folder / label / f"{i}.jpg").write_bytes(_jpeg(10 * len(label) + i))
    assert (
        maekit_main(["write-shards", str(folder), str(tmp_path / "from_folder"), "--max-samples-per-shard", "4"]) == 0
    )
    assert "2 shard(s)" in capsys.readouterr().out
    from_folder = list(ShardReader(expand_shard_urls(str(tmp_path / "from_folder/*.tar")), shuffle_buffer=0))
    assert [r["label"] for r in from_folder] == [0, 0, 0, 1, 1, 1]
    assert [r["image"]["bytes"] for r in from_folder] == [
        (folder / label / f"{i}.jpg").read_bytes() for label in ("cats", "dogs") for i in range(3)
    ]

    decoded = datasets.Dataset.from_dict({"image": [Image.new("RGB", (5, 4), (i, 0, 0)) for i in range(3)]})
    decoded.to_parquet(str(tmp_path / "x.parquet"))
    paths = write_shards(str(tmp_path / "x.parquet"), tmp_path / "from_parquet")
    records = list(ShardReader(paths, shuffle_buffer=0))
    assert [np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))[0, 0, 0] for r in records] == [0, 1, 2]
    assert "label" not in records[0]

    resharded = write_shards(str(tmp_path / "from_folder/shard-{000000..000001}.tar"), tmp_path / "again")
    assert [r["image"]["bytes"] for r in ShardReader(resharded, shuffle_buffer=0)] == [
        r["image"]["bytes"] for r in from_folder
    ]
    with pytest.raises(SystemExit) as exit_info:
        maekit_main(["write-shards", str(tmp_path / "nothing_here"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "maekit write-shards: error:" in capsys.readouterr().err


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A loopback file server that honours `Range: bytes=a-b` (as object stores and the Hub do)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        if spec is None:
            return super().send_head()
        path = self.translate_path(self.path)
        data = open(path, "rb").read()
        start, _, end = spec.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


def test_remote_urls_go_through_the_same_reader(shards):
    pytest.importorskip("aiohttp")  # fsspec's http file system
    pattern, keys = shards
    folder = pattern.rsplit("/", 1)[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/train-{{0000..0004}}.tar"
        remote = ShardedImageDataset(url, seed=1, shuffle_buffer=4, block_size=4096)
        local = ShardedImageDataset(pattern, seed=1, shuffle_buffer=4)
        reader = remote.reader(epoch=0, rank=0, world_size=2)
        head = [next(reader) for _ in range(5)]
        tail = list(remote.reader(epoch=0, rank=0, world_size=2, state=reader.state_dict()))
        assert _keys(head + tail) == _keys(local.reader(epoch=0, rank=0, world_size=2))
        file_urls = ShardedImageDataset("file://" + pattern, seed=1, shuffle_buffer=4)
        assert _keys(file_urls.reader(epoch=0)) == _keys(local.reader(epoch=0))
    finally:
        server.shutdown()
        server.server_close()


def test_shard_reader_benchmark_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import shard_reader

    out = tmp_path / "shard_reader.json"
    result = shard_reader.main(
        ["--shards", "2", "--per-shard", "3", "--rounds", "1", "--warmup", "0", "--output", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"maekit", "datasets"} <= {row["reader"] for row in result["rows"]}
    assert all(row["read rec/s"] > row["read+decode rec/s"] > 0 and row["resume ms"] > 0 for row in result["rows"])
    assert "Tar shard readers" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["at a member boundary", "inside a header"])
def test_a_shard_cut_between_samples_is_reported_as_truncated(tmp_path, caplog, where):
    # A shard cut at a header (or inside one) used to read as complete: the lost samples went uncounted.
    _write_tar(tmp_path / "t-0.tar", [(f"k{i}", {"jpg": _jpeg(i), "cls": b"0"}) for i in range(4)])
    data = (tmp_path / "t-0.tar").read_bytes()
    cut = data.index(b"k2.jpg") + (0 if where == "at a member boundary" else 200)
    (tmp_path / "t-0.tar").write_bytes(data[:cut])
    reader = ShardedImageDataset(str(tmp_path / "t-0.tar"), shuffle_buffer=0).reader(epoch=0)
    with caplog.at_level("WARNING"):
        assert _keys(reader) == ["k0", "k1"]
    assert reader.num_skipped == 1 and "truncated" in caplog.text
    # An intact shard (its end-of-archive blocks present) reads without a skip.
    _write_tar(tmp_path / "u-0.tar", [(f"k{i}", {"jpg": _jpeg(i), "cls": b"0"}) for i in range(4)])
    intact = ShardedImageDataset(str(tmp_path / "u-0.tar"), shuffle_buffer=0).reader(epoch=0)
    assert _keys(intact) == ["k0", "k1", "k2", "k3"] and intact.num_skipped == 0
