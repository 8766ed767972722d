"""MAETrainer on tar shards: the split between readers, exact mid-shard resume from the readers' saved positions, bad
samples counted in the checkpoint, refused positions, pretrain.py on a shard pattern, 2 processes x 2 workers."""

import importlib.util
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from maekit import MAEForPreTraining, MAETrainer
from maekit.data import MAEIterableImageDataset, MAETrainTransform, load_image_dataset
from maekit.shard_writer import shard_pattern, write_shards
from maekit.shards import ShardedImageDataset
from maekit.shards import _TarCursor as TarCursor
from tests.test_shards import _jpeg as small_jpeg
from tests.test_shards import _write_tar
from tests.test_trainer import max_diff, step_losses, weights
from tests.test_trainer_streaming import _launch_once_more_on_teardown_abort, make_args, make_model

ROOT = Path(__file__).resolve().parents[1]
NUM_SHARDS, PER_SHARD = 8, 5  # 40 samples; the label of a sample is its index, so batches say which were read


def _jpeg(i: int, size=(40, 32)) -> bytes:
    return small_jpeg(i, size)


def write_numbered_shards(folder: Path, num_shards: int = NUM_SHARDS, per_shard: int = PER_SHARD) -> str:
    """`num_shards` shards of `per_shard` JPEGs labelled with their index; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(num_shards):
        indices = range(k * per_shard, (k + 1) * per_shard)
        _write_tar(
            folder / f"train-{k:02d}.tar", [(f"{i:04d}", {"jpg": _jpeg(i), "cls": str(i).encode()}) for i in indices]
        )
    return str(folder / f"train-{{00..{num_shards - 1:02d}}}.tar")


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    return write_numbered_shards(tmp_path_factory.mktemp("shards"))


def shard_stream(pattern: str, shuffle_buffer: int = 4, seed: int = 0, **kwargs) -> MAEIterableImageDataset:
    shards = ShardedImageDataset(pattern, seed=seed, shuffle_buffer=shuffle_buffer, **kwargs)
    return MAEIterableImageDataset(shards, MAETrainTransform(size=32), seed=0)


class RecordingTrainer(MAETrainer):
    """Remembers the labels (= sample indices) of every micro-batch it trains on, with its pass over the stream."""

    def __init__(self, *args, crash_at_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, list[int]]] = []  # (step, pass, labels)
        self.crash_at_step = crash_at_step

    def compute_loss(self, model, batch, context=None):
        if context is not None:
            if context.step == self.crash_at_step:
                raise KeyboardInterrupt(f"killed at step {context.step}")
            self.seen.append((context.step, self.stream_position.epoch, batch["labels"].tolist()))
        return super().compute_loss(model, batch, context)


def labels_of_pass(seen, epoch: int) -> list[int]:
    return [label for _, pass_, labels in seen if pass_ == epoch for label in labels]


def test_shard_stream_reads_every_sample_once_per_pass_and_checkpoints_reader_positions(
    tiny_config, pattern, tmp_path
):
    # 8 shards for 2 readers (workers): 20 samples each, 5 batches of 4 a pass, 10 steps a pass; 12 steps cross it.
    args = make_args(
        tmp_path,
        max_steps=12,
        save_steps=5,
        save_total_limit=None,
        dataloader_num_workers=2,
        num_reconstruction_images=0,
    )
    trainer = RecordingTrainer(make_model(tiny_config), args, shard_stream(pattern))
    assert trainer.train().global_step == 12
    assert Counter(labels_of_pass(trainer.seen, 0)) == Counter(range(NUM_SHARDS * PER_SHARD))  # each once
    assert len(labels_of_pass(trainer.seen, 1)) == 8
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    (position,) = state["stream_positions"]
    assert position["epoch"] == 0 and position["batches"] == [3, 2] and position["records"] == [12, 8]
    first = position["reader_states"][0]
    # Reader 0 of 2: 12 samples returned, 4 in its shuffle buffer, so 16 read: one sample into its fourth shard.
    assert (first["rank"], first["world_size"], first["emitted"]) == (0, 2, 12)
    assert first["shard"] == 3 and first["offset"] > 0 and len(first["buffer"]) == 4


def test_kill_and_resume_mid_shard_equals_uninterrupted(tiny_config, pattern, tmp_path):
    # 1 process, 2 workers; killed at step 8, resumed from checkpoint-6, taken mid-shard (reader 0 is 12 samples and
    # a buffer of 4 into its shards of 5), across the end of the first pass (10 steps). Drop path draws from the
    # process RNG, which the checkpoint restores too.
    args = dict(max_steps=13, save_steps=6, dataloader_num_workers=2, num_reconstruction_images=0)
    full = RecordingTrainer(
        make_model(tiny_config, drop_path_rate=0.1), make_args(tmp_path / "full", **args), shard_stream(pattern)
    )
    full.train()

    killed = RecordingTrainer(
        make_model(tiny_config, drop_path_rate=0.1),
        make_args(tmp_path / "run", **args),
        shard_stream(pattern),
        crash_at_step=8,
    )
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-6"]
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    resumed = RecordingTrainer(
        MAEForPreTraining(tiny_config(drop_path_rate=0.1)),
        make_args(tmp_path / "run", resume_from_checkpoint="latest", **args),
        shard_stream(pattern),
    )
    assert resumed.train().global_step == 13
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "run")) <= 1e-6
    assert step_losses(resumed) == pytest.approx(step_losses(full), abs=1e-6)
    assert resumed.seen == [entry for entry in full.seen if entry[0] >= 6]  # the same samples, step by step
    assert resumed.stream_position == full.stream_position


def test_resume_seeks_to_the_saved_position_instead_of_rereading(tiny_config, pattern, tmp_path, monkeypatch):
    # One reader, in shard order without a buffer: the resumed run reads nothing before the saved byte offset.
    args = dict(max_steps=4, save_steps=3, num_reconstruction_images=0)
    stream = shard_stream(pattern, shuffle_buffer=0, shuffle_shards=False)
    MAETrainer(make_model(tiny_config), make_args(tmp_path, **args), stream).train()
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stream_positions"][0]["reader_states"][0]
    assert (saved["shard"], saved["emitted"]) == (2, 12) and saved["offset"] > 0  # 2 samples into the third shard
    third, fourth = ShardedImageDataset(pattern).urls[2:4]
    reads = []
    original = TarCursor._read
    monkeypatch.setattr(TarCursor, "_read", lambda self, offset, size: reads.append((self.url, offset)) or original(self, offset, size))  # fmt: skip
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = MAETrainer(
        make_model(tiny_config), make_args(tmp_path / "resumed", resume_from_checkpoint="latest", **args), stream
    )
    resumed.train()
    assert {url for url, _ in reads} == {third, fourth}  # one batch of 4: the 3 samples left in the third shard + 1
    assert min(offset for url, offset in reads if url == third) == saved["offset"]


def test_bad_samples_inside_shards_are_counted_in_the_checkpoint(tiny_config, tmp_path):
    bad = {
        "k02": {"jpg": b"this is not a JPEG", "cls": b"2"},  # undecodable (skipped by the image dataset)
        "k04": {"cls": b"4"},  # no image member (skipped by the shard reader)
        "k15": {"jpg": _jpeg(15), "cls": b"fifteen"},  # label is not an integer, after the last good sample
    }
    first = [(f"k{i:02d}", bad.get(f"k{i:02d}", {"jpg": _jpeg(i), "cls": str(i).encode()})) for i in range(8)]
    second = [(f"k{i:02d}", bad.get(f"k{i:02d}", {"jpg": _jpeg(i), "cls": str(i).encode()})) for i in range(10, 16)]
    _write_tar(tmp_path / "a-0.tar", first)
    _write_tar(tmp_path / "a-1.tar", second)
    data = bytearray((tmp_path / "a-1.tar").read_bytes())
    header = data.index(b"k11.jpg")
    data[header : header + 100] = b"\x07" * 100  # a corrupt tar header: k11 is lost, the reader resynchronises
    (tmp_path / "a-1.tar").write_bytes(bytes(data))
    # In order, one reader, batches of 2: [0 1] [3 5] (k02, k04 skipped) [6 7] [10 12] (k11) [13 14], then k15.
    args = make_args(tmp_path / "out", per_device_train_batch_size=2, max_steps=6, save_steps=2, save_total_limit=None)
    trainer = RecordingTrainer(
        make_model(tiny_config), args, shard_stream(str(tmp_path / "a-{0..1}.tar"), 0, shuffle_shards=False)
    )
    trainer.train()
    assert [labels for _, _, labels in trainer.seen] == [[0, 1], [3, 5], [6, 7], [10, 12], [13, 14], [0, 1]]

    def skipped(step):
        return json.loads((tmp_path / "out" / f"checkpoint-{step}" / "trainer_state.json").read_text())[
            "num_skipped_images"
        ]

    # k15 is reported by the pass's last item (no batch), taken before step 6's batch.
    assert [skipped(2), skipped(4), skipped(6)] == [2, 3, 4]
    shutil.copytree(tmp_path / "out" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path / "resumed", per_device_train_batch_size=2, max_steps=6, save_steps=2,
                  resume_from_checkpoint="latest"),
        shard_stream(str(tmp_path / "a-{0..1}.tar"), 0, shuffle_shards=False),
    )  # fmt: skip
    resumed.train()
    assert resumed.state.num_skipped_images == 4  # counted once


def test_a_position_from_another_split_or_source_is_refused(tiny_config, pattern, image_folder_stream, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), shard_stream(pattern, seed=0)).train()

    def resume(stream, **overrides):
        args = make_args(tmp_path, max_steps=4, resume_from_checkpoint="latest", **overrides)
        return MAETrainer(make_model(tiny_config), args, stream).train()

    with pytest.raises(ValueError, match=r"reader 0 of process 0: .*seed: saved 0, now 1"):
        resume(shard_stream(pattern, seed=1))
    with pytest.raises(ValueError, match=r"shuffle_buffer: saved 4, now 8"):
        resume(shard_stream(pattern, shuffle_buffer=8))
    with pytest.raises(ValueError, match=r"1 reader\(s\) each, this run has 1 process\(es\) with 2"):
        resume(shard_stream(pattern), dataloader_num_workers=2)
    with pytest.raises(ValueError, match="was saved reading tar shards; this run reads a datasets stream"):
        resume(image_folder_stream)


@pytest.fixture
def image_folder_stream(tmp_path) -> MAEIterableImageDataset:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    stream, _ = load_image_dataset(str(folder), streaming=True)
    return MAEIterableImageDataset(stream, MAETrainTransform(size=32))


def test_the_trainer_checks_shard_streams(tiny_config, pattern, tmp_path):
    model = make_model(tiny_config)
    with pytest.raises(ValueError, match=r"max_steps must be > 0 .*\(tar shards are always streamed\).*--max_steps"):
        MAETrainer(model, make_args(tmp_path, max_steps=-1, num_train_epochs=1), shard_stream(pattern))
    with pytest.raises(ValueError, match=r"warmup_steps must be set .*\(tar shards are always streamed\)"):
        MAETrainer(model, make_args(tmp_path, warmup_steps=None), shard_stream(pattern))
    with pytest.raises(ValueError, match=r"already split \(rank=1, world_size=2\)"):
        MAETrainer(model, make_args(tmp_path), shard_stream(pattern, rank=1, world_size=2))


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_shards_example", ROOT / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_pretrain_script_on_a_shard_pattern(tmp_path):
    images = datasets.Dataset.from_dict(
        {"image": [{"bytes": _jpeg(i, (48, 40)), "path": None} for i in range(28)]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    paths = write_shards(images.select(range(24)), tmp_path / "train", max_samples_per_shard=6, prefix="train")
    pattern = shard_pattern(paths)
    assert "{" in pattern and len(paths) == 4
    pretrain = _pretrain_module()
    common = ["--dataset_name", pattern, "--per_device_train_batch_size", "4", "--image_size", "32", "--patch_size",
              "8", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "2", "--logging_steps", "1"]  # fmt: skip
    with pytest.raises(ValueError, match=r"max_steps must be > 0 .*tar shards are always streamed.*--max_steps"):
        pretrain.main([*common, "--output_dir", str(tmp_path / "none")])
    output_dir = tmp_path / "out"
    run = [*common, "--max_steps", "5", "--save_steps", "3", "--warmup_steps", "1", "--shuffle_buffer_size", "5",
           "--output_dir", str(output_dir)]  # fmt: skip
    pretrain.main(run)
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    (position,) = state["stream_positions"]
    assert position["batches"] == [2, 1] and position["records"] == [8, 4]
    assert [s["shuffle_buffer"] for s in position["reader_states"]] == [5, 5]
    assert MAEForPreTraining.from_pretrained(output_dir).config.image_size == 32
    # Interrupted after checkpoint-3: the script resumes from it and ends where the uninterrupted run ended.
    end = json.loads((output_dir / "checkpoint-5" / "trainer_state.json").read_text())
    shutil.rmtree(output_dir / "checkpoint-5")
    pretrain.main([*run, "--resume_from_checkpoint", "latest"])
    again = json.loads((output_dir / "checkpoint-5" / "trainer_state.json").read_text())
    assert again["stream_positions"] == end["stream_positions"]
    assert step_losses(again) == pytest.approx(step_losses(end), abs=1e-6)
    # The evaluation shards of a folder (train-* / validation-*) are read into memory for the evaluation loss.
    write_shards(images.select(range(24, 28)), tmp_path / "train", max_samples_per_shard=6, prefix="validation")
    pretrain.main([*common, "--dataset_name", str(tmp_path / "train"), "--max_steps", "1", "--warmup_steps", "0",
                   "--output_dir", str(tmp_path / "with_eval")])  # fmt: skip
    history = json.loads((tmp_path / "with_eval" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in entry for entry in history)


_DISTRIBUTED_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.conftest import TINY
from tests.test_trainer_shards import RecordingTrainer, shard_stream
from tests.test_trainer_streaming import make_args
from maekit import MAEConfig, MAEForPreTraining

pattern, output_dir, resume = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "resume"
torch.manual_seed(0)
args = make_args(output_dir, per_device_train_batch_size=3, max_steps=10, save_steps=5, save_total_limit=None,
                 dataloader_num_workers=2, num_reconstruction_images=0,
                 resume_from_checkpoint="latest" if resume else None)
trainer = RecordingTrainer(MAEForPreTraining(MAEConfig(**TINY, drop_path_rate=0.1)), args, shard_stream(pattern))
trainer.train()
rank = trainer.accelerator.process_index
(output_dir / f"seen-{{rank}}.json").write_text(json.dumps(trainer.seen))
trainer.accelerator.end_training()  # tears the process group down before exit
"""


@pytest.mark.slow
def test_two_processes_two_workers_read_every_sample_once_and_resume_exactly(tmp_path):
    # 8 shards of 6 for 2 processes x 2 workers: 12 samples per reader, 4 batches of 3, 8 steps a pass.
    pattern = write_numbered_shards(tmp_path / "shards", per_shard=6)
    script = tmp_path / "train_script.py"
    script.write_text(_DISTRIBUTED_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              str(script), pattern]  # fmt: skip
    full = _launch_once_more_on_teardown_abort([*launch, str(tmp_path / "full"), "fresh"], tmp_path / "full", env)
    assert full.returncode == 0, full.stderr[-3000:]
    seen = [json.loads((tmp_path / "full" / f"seen-{rank}.json").read_text()) for rank in range(2)]
    first_pass = [label for part in seen for _, epoch, labels in part if epoch == 0 for label in labels]
    assert Counter(first_pass) == Counter(range(48))  # every sample exactly once across the 4 readers
    state = json.loads((tmp_path / "full" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    positions = state["stream_positions"]
    assert [p["batches"] for p in positions] == [[3, 2], [3, 2]]
    assert [s["rank"] for p in positions for s in p["reader_states"]] == [0, 1, 2, 3]
    assert all(s["world_size"] == 4 for p in positions for s in p["reader_states"])

    def trainer_state(run: str, step: int) -> dict:
        return json.loads((tmp_path / run / f"checkpoint-{step}" / "trainer_state.json").read_text())

    copy = lambda: shutil.copytree(tmp_path / "full" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")  # noqa: E731
    resumed = _launch_once_more_on_teardown_abort([*launch, str(tmp_path / "resumed"), "resume"], tmp_path / "resumed", env, copy)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "resumed")) <= 1e-6
    assert step_losses(trainer_state("resumed", 10)) == pytest.approx(step_losses(trainer_state("full", 10)), abs=1e-6)
    for rank in range(2):
        after = json.loads((tmp_path / "resumed" / f"seen-{rank}.json").read_text())
        assert after == [entry for entry in seen[rank] if entry[0] >= 5]


def test_scripts_read_shards_as_streams_or_say_why_not(pattern):
    from maekit.training.scripts import ClassificationDataArguments, PretrainDataArguments, is_stream, load_datasets

    train, evaluation = load_datasets(PretrainDataArguments(dataset_name=pattern, shuffle_buffer_size=7), seed=3)
    assert is_stream(train) and isinstance(train, ShardedImageDataset) and evaluation is None
    assert (train.shuffle_buffer, train.seed) == (7, 3)
    with pytest.raises(ValueError, match="--max_train_samples does not apply to tar shards"):
        load_datasets(PretrainDataArguments(dataset_name=pattern, max_train_samples=4), seed=0)
    with pytest.raises(ValueError, match="is tar shards, which are read as a stream; this script needs a map-style"):
        load_datasets(ClassificationDataArguments(dataset_name=pattern), seed=0, labels=True)
