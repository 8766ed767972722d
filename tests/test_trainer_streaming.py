"""MAETrainer on a streaming data set: argument checks, the split between readers, exact resume, pretrain.py."""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from maekit import MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.data import (
    BadImageError,
    MAEImageDataset,
    MAEIterableImageDataset,
    MAETrainTransform,
    collate_fn,
    load_image_dataset,
)
from maekit.training.data_order import StreamPosition, StreamReaders, stream_batches
from tests.test_trainer import make_args as trainer_args
from tests.test_trainer import max_diff, step_losses, weights

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 40


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """40 small noise images, half PNG and half JPEG, of a few sizes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        height, width = (40, 48) if i % 3 else (36, 36)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return folder


def stream(folder: Path, buffer_size: int = 8) -> MAEIterableImageDataset:
    train, _ = load_image_dataset(str(folder), streaming=True)
    return MAEIterableImageDataset(train.shuffle(seed=0, buffer_size=buffer_size), MAETrainTransform(size=32), seed=0)


def make_args(output_dir, **overrides) -> MAETrainingArguments:
    return trainer_args(output_dir, **{"per_device_train_batch_size": 4, **overrides})


def make_model(tiny_config, **overrides) -> MAEForPreTraining:
    torch.manual_seed(0)
    return MAEForPreTraining(tiny_config(**overrides))


def test_streaming_run_passes_over_the_stream_and_checkpoints_its_position(tiny_config, image_folder, tmp_path):
    # 40 images in batches of 4: 10 steps per pass; 12 steps start a second pass.
    eval_images = MAEImageDataset(
        [Image.new("RGB", (32, 32), (i * 40, 90, 200)) for i in range(4)], MAETrainTransform(32)
    )
    model = make_model(tiny_config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, max_steps=12, save_steps=5, save_total_limit=None)  # keep every checkpoint
    trainer = MAETrainer(model, args, stream(image_folder), eval_images)
    result = trainer.train()

    assert result.global_step == 12 and np.isfinite(result.training_loss)
    assert max_diff(weights(tmp_path), initial) > 1e-4
    assert (tmp_path / "reconstruction.png").is_file()
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["stream_positions"] == [{"epoch": 0, "batches": [5], "records": [20]}]
    state = json.loads((tmp_path / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["stream_positions"] == [{"epoch": 1, "batches": [2], "records": [8]}]
    assert [e["epoch"] for e in state["log_history"] if "loss" in e] == [0] * 10 + [1] * 2  # passes completed
    card = (tmp_path / "README.md").read_text()
    assert "| total_steps | 12 |" in card and "| epochs |" not in card


def test_streaming_needs_max_steps_warmup_steps_and_a_datasets_stream(tiny_config, image_folder, tmp_path):
    model = make_model(tiny_config)
    with pytest.raises(ValueError, match="max_steps must be > 0 with a streaming train_dataset"):
        MAETrainer(model, make_args(tmp_path, max_steps=-1, num_train_epochs=1), stream(image_folder))
    with pytest.raises(ValueError, match="warmup_steps must be set"):
        MAETrainer(model, make_args(tmp_path, warmup_steps=None), stream(image_folder))
    in_memory = MAEIterableImageDataset([Image.new("RGB", (32, 32))] * 8, MAETrainTransform(size=32))
    with pytest.raises(TypeError, match="over a datasets.IterableDataset"):
        MAETrainer(model, make_args(tmp_path), in_memory)

    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"pixel_values": torch.zeros(3, 32, 32)}

    with pytest.raises(TypeError, match="or a maekit.data.MAEIterableImageDataset"):
        MAETrainer(model, make_args(tmp_path), Plain())


def _numbered_images(count: int, num_shards: int) -> datasets.IterableDataset:
    """A stream of `count` solid-colour PNGs (image i has red value 3 * i) in `num_shards` shards."""

    def generate(shards):
        for shard in shards:
            for i in range(shard, count, num_shards):
                buffer = io.BytesIO()
                Image.new("RGB", (16, 16), (3 * i, 0, 0)).save(buffer, format="PNG")
                yield {"image": {"bytes": buffer.getvalue(), "path": None}}

    features = datasets.Features({"image": datasets.Image(decode=False)})
    return datasets.IterableDataset.from_generator(
        generate, features=features, gen_kwargs={"shards": list(range(num_shards))}
    )


@pytest.mark.parametrize("num_shards", [1, 8])  # 1: split by examples; 8: by shards (4 readers)
def test_readers_split_the_stream_without_overlap(num_shards):
    # 2 processes x 2 workers: every image of the pass is read by exactly one reader.
    count = 40
    transform = MAETrainTransform(size=8, mean=(0, 0, 0), std=(1 / 255,) * 3)  # pixel values stay 0..255
    dataset = MAEIterableImageDataset(_numbered_images(count, num_shards), transform, seed=0)
    seen = []
    for process in range(2):
        position = StreamPosition.start(2)
        batches = stream_batches(
            dataset, position, batch_size=2, process_index=process, num_processes=2, collate_fn=collate_fn,
            num_workers=2, pin_memory=False, on_position=lambda _: None,
        )  # fmt: skip
        for _ in range(10):  # one pass: 20 images per process
            batch, _ = next(batches)
            seen += (batch["pixel_values"][:, 0, 0, 0] / 3).round().long().tolist()
        assert sum(position.batches) == 10 and sum(position.records) == 20
    assert sorted(seen) == list(range(count))


def test_readers_drop_bad_images_and_count_them():
    records = [{"image": {"bytes": b"", "path": "empty.png"}}, {"image": {"bytes": b"not an image", "path": "x.png"}}]
    good = _numbered_images(6, 1)
    features = datasets.Features({"image": datasets.Image(decode=False)})
    mixed = datasets.IterableDataset.from_generator(lambda: iter([*records, *good]), features=features)
    for skip_bad_images in (True, False):
        dataset = MAEIterableImageDataset(mixed, MAETrainTransform(size=8), skip_bad_images=skip_bad_images)
        readers = StreamReaders(
            dataset, epoch=0, batch_size=2, process_index=0, num_processes=1, collate_fn=collate_fn,
            resume=StreamPosition.start(1),
        )  # fmt: skip
        if skip_bad_images:
            items = list(readers)
            assert [item.num_skipped for item in items] == [2, 0, 0]
            assert [(item.reader, item.records) for item in items] == [(0, 4), (0, 6), (0, 8)]
        else:
            with pytest.raises(BadImageError, match="empty.png"):
                list(readers)


def test_readers_count_bad_images_in_the_dropped_last_batch():
    # 5 good images in batches of 2, bad ones before and after the 5th: the incomplete last batch is dropped, but
    # its skipped images are still reported (maekit 0.1 lost them with the dropped samples).
    good = list(_numbered_images(5, 1))
    bad = [{"image": {"bytes": b"", "path": f"bad-{i}.png"}} for i in range(3)]
    features = datasets.Features({"image": datasets.Image(decode=False)})
    mixed = datasets.IterableDataset.from_generator(
        lambda: iter([*good[:4], bad[0], good[4], *bad[1:]]), features=features
    )
    dataset = MAEIterableImageDataset(mixed, MAETrainTransform(size=8))
    readers = StreamReaders(
        dataset, epoch=0, batch_size=2, process_index=0, num_processes=1, collate_fn=collate_fn,
        resume=StreamPosition.start(1),
    )  # fmt: skip
    items = list(readers)
    assert [item.batch is not None for item in items] == [True, True, False]
    assert sum(item.num_skipped for item in items) == 3


@pytest.mark.parametrize(("workers", "save_at"), [(0, 6), (2, 7)])
def test_streaming_resume_is_exact(tiny_config, image_folder, tmp_path, workers, save_at):
    # 12 steps of 4 images cross the end of the first pass (10 steps). With 2 workers the stream is split in two
    # readers of 5 batches a pass, and step 7 stops with the DataLoader's next batch due from the second worker.
    # Drop path draws from the process RNG, which the checkpoint must restore too.
    args = dict(max_steps=12, save_steps=save_at, dataloader_num_workers=workers, num_reconstruction_images=0)
    full = MAETrainer(
        make_model(tiny_config, drop_path_rate=0.1), make_args(tmp_path / "full", **args), stream(image_folder)
    )
    full.train()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.replace(tmp_path / "full" / f"checkpoint-{save_at}", resumed_dir / f"checkpoint-{save_at}")
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    resumed = MAETrainer(
        MAEForPreTraining(tiny_config(drop_path_rate=0.1)),
        make_args(resumed_dir, resume_from_checkpoint="latest", **args),
        stream(image_folder),
    )
    assert resumed.train().global_step == 12
    assert max_diff(weights(tmp_path / "full"), weights(resumed_dir)) <= 1e-6
    assert step_losses(resumed) == pytest.approx(step_losses(full), abs=1e-6)
    assert resumed.stream_position == full.stream_position


def test_streaming_resume_refuses_another_split(tiny_config, image_folder, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), stream(image_folder)).train()
    trainer = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path, max_steps=4, dataloader_num_workers=2, resume_from_checkpoint="latest"),
        stream(image_folder),
    )
    with pytest.raises(ValueError, match=r"1 reader\(s\) each, this run has 1 process\(es\) with 2"):
        trainer.train()


def test_pretrain_script_streams(image_folder, tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_streaming_example", ROOT / "examples" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pretrain  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(pretrain)
    output_dir = tmp_path / "out"
    pretrain.main(
        ["--dataset_name", str(image_folder), "--streaming", "true", "--shuffle_buffer_size", "16",
         "--train_val_split", "8", "--max_eval_samples", "4", "--max_steps", "3", "--warmup_steps", "1",
         "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--image_size", "32",
         "--patch_size", "8", "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true"]
    )  # fmt: skip
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert state["stream_positions"] == [{"epoch": 0, "batches": [3], "records": [12]}]
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert (output_dir / "reconstruction.png").is_file()
    assert MAEForPreTraining.from_pretrained(output_dir).config.image_size == 32
    with pytest.raises(ValueError, match="--streaming needs --dataset_name"):
        pretrain.main(["--streaming", "true", "--output_dir", str(tmp_path / "demo")])


_DISTRIBUTED_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.conftest import TINY
from tests.test_trainer_streaming import make_args, stream
from maekit import MAEConfig, MAEForPreTraining, MAETrainer

folder, output_dir, resume = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "resume"
torch.manual_seed(0)
args = make_args(output_dir, max_steps=8, save_steps=3, save_total_limit=None, num_reconstruction_images=0,
                 resume_from_checkpoint="latest" if resume else None)
trainer = MAETrainer(MAEForPreTraining(MAEConfig(**TINY, drop_path_rate=0.1)), args, stream(folder))
trainer.train()
trainer.accelerator.end_training()  # tears the process group down before exit
"""


_GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _launch_once_more_on_teardown_abort(command, output_dir: Path, env, prepare=lambda: None):
    """Run a 2-process launch into a fresh `output_dir`.

    On this loaded 2-core machine, gloo's teardown at process exit has aborted a rank (SIGABRT, "terminate called
    without an active exception") after training had finished, in about one full-suite run in five. Only that case is
    run once more from scratch; every other failure fails at once, and every assertion below applies to the run kept.
    """
    for _ in range(2):
        shutil.rmtree(output_dir, ignore_errors=True)
        prepare()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode == 0 or _GLOO_TEARDOWN_ABORT not in result.stderr:
            return result
    return result


@pytest.mark.slow
def test_two_process_streaming_splits_the_stream_and_resumes_exactly(image_folder, tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(_DISTRIBUTED_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              str(script), str(image_folder)]  # fmt: skip
    full = _launch_once_more_on_teardown_abort([*launch, str(tmp_path / "full"), "fresh"], tmp_path / "full", env)
    assert full.returncode == 0, full.stderr[-3000:]
    state = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    # One shard, two readers: each process reads every other record, 3 batches of 4 images by step 3.
    assert state["num_processes"] == 2
    assert state["stream_positions"] == [{"epoch": 0, "batches": [3], "records": [12]}] * 2

    def prepare_resume():
        shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")

    resumed = _launch_once_more_on_teardown_abort(
        [*launch, str(tmp_path / "resumed"), "resume"], tmp_path / "resumed", env, prepare_resume
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "resumed")) <= 1e-6
    full_state = json.loads((tmp_path / "full" / "checkpoint-8" / "trainer_state.json").read_text())
    resumed_state = json.loads((tmp_path / "resumed" / "checkpoint-8" / "trainer_state.json").read_text())
    assert step_losses(resumed_state) == pytest.approx(step_losses(full_state), abs=1e-6)
