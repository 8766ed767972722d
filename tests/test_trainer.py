"""MAETrainer: schedule, parameter groups, accumulation, exact resume, distributed equivalence, checkpoints, card."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import HfArgumentParser

from maekit import MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.data import MAEImageDataset, MAETrainTransform
from maekit.training import (
    NonFiniteLossError,
    cosine_lr_with_warmup,
    find_latest_checkpoint,
    param_groups_weight_decay,
)
from maekit.training import hub as hub_module


class TensorImages(torch.utils.data.Dataset):
    """Fixed random 'images'; from epoch `nan_from_epoch` on, every image is NaN (to provoke a non-finite loss)."""

    def __init__(self, count: int = 32, seed: int = 0, nan_from_epoch: int | None = None, dtype=torch.float32):
        self.images = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
        self.nan_from_epoch = nan_from_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if self.nan_from_epoch is not None and self.epoch >= self.nan_from_epoch:
            image = torch.full_like(image, float("nan"))
        return {"pixel_values": image}


def pil_dataset(count: int = 32) -> MAEImageDataset:
    """Real PIL images through the random-resized-crop + flip augmentation of maekit.data."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]
    return MAEImageDataset(images, MAETrainTransform(size=32), seed=0)


def make_args(tmp_path, **overrides) -> MAETrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=4,
        warmup_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        num_reconstruction_images=2,
    )
    return MAETrainingArguments(**{**values, **overrides})


def make_model(tiny_config, dtype=torch.float32, **overrides) -> MAEForPreTraining:
    torch.manual_seed(0)
    return MAEForPreTraining(tiny_config(**overrides)).to(dtype)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def step_losses(trainer_or_state) -> list[float]:
    history = (
        trainer_or_state["log_history"]
        if isinstance(trainer_or_state, dict)
        else trainer_or_state.state["log_history"]
    )
    return [entry["loss"] for entry in history if "loss" in entry]


# ----------------------------------------------------------------------------------------------------------------------
# Schedule, parameter groups, arguments


def test_schedule_matches_official_formula():
    lr, min_lr, total, warmup = 1e-3, 1e-5, 100, 10
    values = [
        cosine_lr_with_warmup(s, learning_rate=lr, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
        for s in range(total)
    ]
    for step, value in enumerate(values):
        if step < warmup:
            expected = lr * step / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert values[0] == 0 and values[warmup] == pytest.approx(lr) and max(values) == pytest.approx(lr)
    assert values[55] == pytest.approx((lr + min_lr) / 2)  # half-way through the cosine
    assert cosine_lr_with_warmup(
        total, learning_rate=lr, total_steps=total, warmup_steps=warmup, min_lr=min_lr
    ) == pytest.approx(min_lr)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_lr_with_warmup(0, learning_rate=lr, total_steps=5, warmup_steps=6)


def test_param_groups_follow_official_recipe(tiny_config):
    model = make_model(tiny_config)
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "mae.cls_token" in decay["param_names"] and "decoder.mask_token" in decay["param_names"]
    assert "mae.patch_embed.proj.weight" in decay["param_names"]
    for name in no_decay["param_names"]:
        assert name.endswith(".bias") or dict(model.named_parameters())[name].ndim == 1
    assert all(dict(model.named_parameters())[n].ndim > 1 for n in decay["param_names"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decay["param_names"] + no_decay["param_names"]) == sorted(trainable)
    assert not any("pos_embed" in n for n in trainable)  # fixed sin-cos tables are buffers


def test_learning_rate_scaling_rule(tmp_path):
    args = make_args(tmp_path, learning_rate=None, base_learning_rate=1.5e-4, per_device_train_batch_size=64)
    args.gradient_accumulation_steps = 4
    assert args.global_batch_size(16) == 4096
    assert args.resolved_learning_rate(16) == pytest.approx(1.5e-4 * 16)
    assert make_args(tmp_path, learning_rate=3e-4).resolved_learning_rate(8) == 3e-4
    assert (
        make_args(
            tmp_path, warmup_steps=None, warmup_epochs=40, max_steps=-1, num_train_epochs=800
        ).resolved_warmup_steps(10)
        == 400
    )


def test_arguments_parse_from_cli_json_and_yaml(tmp_path):
    parser = HfArgumentParser(MAETrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--learning_rate", "1e-3", "--max_grad_norm", "1.0", "--report_to", "none",
         "--gradient_accumulation_steps", "4", "--mixed_precision", "bf16", "--resume_from_checkpoint", "latest"]
    )  # fmt: skip
    assert (args.learning_rate, args.max_grad_norm, args.report_to) == (1e-3, 1.0, ["none"])
    assert (args.gradient_accumulation_steps, args.mixed_precision, args.resume_from_checkpoint) == (
        4,
        "bf16",
        "latest",
    )
    assert args.resolved_report_to() == []
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", "out"])
    assert defaults.learning_rate is None and defaults.max_grad_norm is None and defaults.weight_decay == 0.05
    assert (defaults.adam_beta1, defaults.adam_beta2) == (0.9, 0.95)

    (tmp_path / "args.json").write_text(
        json.dumps({"output_dir": "o", "warmup_steps": 7, "report_to": ["tensorboard"]})
    )
    (from_json,) = parser.parse_json_file(str(tmp_path / "args.json"))
    assert from_json.warmup_steps == 7 and from_json.resolved_report_to() == ["tensorboard"]
    (tmp_path / "args.yaml").write_text("output_dir: o\nbase_learning_rate: 0.001\nsave_total_limit: 2\n")
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    assert from_yaml.base_learning_rate == 1e-3 and from_yaml.save_total_limit == 2

    with pytest.raises(ValueError, match="mixed_precision"):
        MAETrainingArguments(mixed_precision="fp8")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        MAETrainingArguments(per_device_train_batch_size=0)
    with pytest.raises(ValueError, match="hub_strategy"):
        MAETrainingArguments(hub_strategy="sometimes")


# ----------------------------------------------------------------------------------------------------------------------
# Training loop


def test_gradient_accumulation_matches_full_batch(tiny_config, tmp_path):
    # float64: the attention key bias has an exactly-zero true gradient (softmax ignores it), so in float32 its
    # gradient is rounding noise that AdamW scales up to ~lr; float64 shows the two runs are the same computation.
    def run(name, batch_size, accumulation):
        trainer = MAETrainer(
            make_model(tiny_config, dtype=torch.float64),
            make_args(tmp_path / name, max_steps=3, per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation),
            TensorImages(dtype=torch.float64),
        )  # fmt: skip
        trainer.train()
        return trainer

    full, accum = run("full", 8, 1), run("accum", 4, 2)
    assert step_losses(full) == pytest.approx(step_losses(accum), abs=1e-12)
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "accum")) < 1e-10
    # The model did change: not a vacuous comparison.
    initial = make_model(tiny_config, dtype=torch.float64).state_dict()
    assert max_diff(weights(tmp_path / "full"), initial) > 1e-4


def test_exact_resume_with_workers(tiny_config, tmp_path):
    # 32 images, global batch 8: 4 steps per epoch; resume at step 3 crosses an epoch boundary afterwards.
    # Drop path draws from the process RNG, which the checkpoint must restore too.
    args = dict(max_steps=6, save_steps=3, dataloader_num_workers=2, eval_steps=100)
    model = make_model(tiny_config, drop_path_rate=0.2)
    MAETrainer(model, make_args(tmp_path / "full", **args), pil_dataset()).train()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.replace(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    resumed = MAETrainer(
        MAEForPreTraining(tiny_config(drop_path_rate=0.2)),
        make_args(resumed_dir, resume_from_checkpoint="latest", **args),
        pil_dataset(),
    )
    result = resumed.train()
    assert result.global_step == 6
    assert max_diff(weights(tmp_path / "full"), weights(resumed_dir)) <= 1e-6
    full_state = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    assert step_losses(resumed) == pytest.approx(step_losses(full_state), abs=1e-6)


def test_resume_refuses_a_different_global_batch(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), TensorImages()).train()
    trainer = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path, max_steps=4, per_device_train_batch_size=4, resume_from_checkpoint="latest"),
        TensorImages(),
    )
    with pytest.raises(ValueError, match="global batch of 8"):
        trainer.train()


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
    # 16 images, batch 8: 2 steps per epoch; images turn NaN in epoch 1, i.e. at step 3.
    trainer = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=6, save_steps=2), TensorImages(16, nan_from_epoch=1)
    )
    with pytest.raises(NonFiniteLossError, match="at step 3 .*checkpoint-2 is intact"):
        trainer.train()
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-3").exists()
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoint-2").values())


def test_nonfinite_loss_skip_mode_counts_and_continues(tiny_config, tmp_path):
    trainer = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path, max_steps=4, nonfinite_loss="skip"),
        TensorImages(16, nan_from_epoch=1),
    )
    result = trainer.train()
    assert result.global_step == 4 and trainer.state["num_nonfinite_steps"] == 2
    assert all(torch.isfinite(t).all() for t in weights(tmp_path).values())


def test_checkpoint_pruning_and_latest_skips_partial_folders(tiny_config, tmp_path):
    MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=1, save_total_limit=2), TensorImages()
    ).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["steps_per_epoch"] == 4 and state["global_batch_size"] == 8
    assert (state["epoch_index"], state["step_in_epoch"]) == (1, 0)
    assert (json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["step_in_epoch"]) == 3

    # A crash while saving leaves a folder without trainer_state.json (or a temporary one): never picked.
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-checkpoint-10").mkdir()
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    # A longer run than the checkpoint's is another schedule: allowed explicitly.
    resumed = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path, max_steps=5, resume_from_checkpoint="latest", ignore_resume_mismatch=True),
        TensorImages(),
    )
    assert resumed.train().global_step == 5
    assert [e["step"] for e in resumed.state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5]


def test_outputs_model_card_reconstructions_and_trackers(tiny_config, tmp_path):
    from maekit.image_processing_mae import MAEImageProcessor

    processor = MAEImageProcessor(size={"height": 32, "width": 32})
    model = make_model(tiny_config, norm_pix_loss=True)
    trainer = MAETrainer(
        model,
        make_args(tmp_path, max_steps=2, report_to="tensorboard", eval_on_start=True),
        TensorImages(16),
        eval_dataset=TensorImages(5, seed=1),
        image_processor=processor,
        dataset_name="user/tiny-images",
    )
    result = trainer.train()
    evals = [e["eval_loss"] for e in trainer.state["log_history"] if "eval_loss" in e]
    assert len(evals) == 2 and result.metrics["eval_loss"] == evals[-1]  # on start, at the end

    reloaded = MAEForPreTraining.from_pretrained(tmp_path)
    assert reloaded.config.norm_pix_loss and max_diff(reloaded.state_dict(), model.state_dict()) == 0
    assert (tmp_path / "preprocessor_config.json").is_file()
    card = (tmp_path / "README.md").read_text()
    for expected in ("library_name: maekit", "- masked-autoencoder", "datasets:\n- user/tiny-images",
                     "| global_batch_size | 8 |", "| learning_rate | 0.001 |", f"| eval_loss | {evals[-1]:.6g} |",
                     "![Reconstructions](reconstruction.png)", "per-patch normalized", "| lr_schedule | cosine |"):  # fmt: skip
        assert expected in card
    assert "lr_poly_power" not in card
    grid = Image.open(tmp_path / "reconstruction.png")
    from maekit.visualize import HEADER_HEIGHT

    assert grid.size == (4 * 96 + 5 * 2, HEADER_HEIGHT + 2 * 96 + 3 * 2)  # 2 images x 4 columns, 32 px tiles x3
    assert sorted(p.name for p in (tmp_path / "reconstructions").iterdir()) == ["step-0.png", "step-2.png"]
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def test_evaluate_uses_fixed_masks(tiny_config, tmp_path):
    trainer = MAETrainer(make_model(tiny_config), make_args(tmp_path), TensorImages(16), eval_dataset=TensorImages(5))
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second
    trainer.args.per_device_eval_batch_size = 2  # the batching must not matter: per-image losses are averaged
    assert trainer.evaluate()["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)


def test_push_to_hub_at_every_save(tiny_config, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private))
            return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload_folder", repo_id, commit_message, tuple(ignore_patterns), files))

    monkeypatch.setattr(hub_module, "HfApi", FakeApi)
    args = make_args(tmp_path, max_steps=2, save_steps=1, push_to_hub=True, hub_model_id="mae-test",
                     hub_strategy="every_save", hub_private_repo=True, hub_token="tok")  # fmt: skip
    MAETrainer(make_model(tiny_config), args, TensorImages(16)).train()
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert [c[2] for c in uploads] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
        "End of training",
    ]
    assert all(c[1] == "me/mae-test" and "checkpoint-*" in c[3] for c in uploads)
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploads[-1][4])
    assert ("create_repo", "mae-test", True) in calls and ("init", "tok") in calls


def test_bf16_autocast_and_gradient_clipping(tiny_config, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate fixes mixed precision once per process
    try:
        trainer = MAETrainer(
            make_model(tiny_config),
            make_args(tmp_path, max_steps=2, mixed_precision="bf16", max_grad_norm=1e-3),
            TensorImages(16),
            eval_dataset=TensorImages(4),
        )
        result = trainer.train()
        assert trainer.accelerator.mixed_precision == "bf16"
        norms = [e["grad_norm"] for e in trainer.state["log_history"] if "grad_norm" in e]
        assert len(norms) == 2 and all(n > 1e-3 for n in norms)  # the norm before clipping is logged
        assert math.isfinite(result.metrics["eval_loss"])
        # Autocast changes the computation only: the saved weights stay float32.
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights(tmp_path).values())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_too_small_dataset_is_an_error(tiny_config, tmp_path):
    trainer = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, per_device_train_batch_size=64), TensorImages(16)
    )
    with pytest.raises(ValueError, match="smaller than one global batch"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU) against one process at the same global batch

_DISTRIBUTED_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests_dir!r})
from test_trainer import TensorImages, make_args
from conftest import TINY
from maekit import MAEConfig, MAEForPreTraining, MAETrainer
from pathlib import Path

torch.manual_seed(0)
model = MAEForPreTraining(MAEConfig(**TINY)).double()
strategy = {{"mask_strategy": sys.argv[3]}} if len(sys.argv) > 3 else {{}}
args = make_args(Path(sys.argv[1]), max_steps=3, per_device_train_batch_size=int(sys.argv[2]), **strategy)
images, eval_images = TensorImages(dtype=torch.float64), TensorImages(5, seed=1, dtype=torch.float64)
trainer = MAETrainer(model, args, images, eval_dataset=eval_images)
trainer.train()
trainer.accelerator.end_training()  # tears the process group down before exit
"""


@pytest.mark.slow
@pytest.mark.parametrize("mask_strategy", [None, "grid"])
def test_two_processes_match_one_process(tmp_path, mask_strategy):
    # The masks of a step are drawn for the whole global batch and sliced: any strategy, any number of processes.
    strategy = [] if mask_strategy is None else [mask_strategy]
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(_DISTRIBUTED_SCRIPT.format(tests_dir=str(Path(__file__).parent))))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    two = subprocess.run(
        [*launch, str(script), str(tmp_path / "two"), "4", *strategy], env=env, capture_output=True, text=True
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "8", *strategy], env=env, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]

    state_two = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    state_one = json.loads((tmp_path / "one" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state_two["num_processes"] == 2 and state_one["num_processes"] == 1
    # float64 (see test_gradient_accumulation_matches_full_batch): equal up to reduction-order rounding. The logged
    # losses are float32 (each process's loss is rounded before the mean), so they may differ by a float32 rounding.
    assert step_losses(state_two) == pytest.approx(step_losses(state_one), rel=3e-7)
    evals = [[e["eval_loss"] for e in s["log_history"] if "eval_loss" in e] for s in (state_one, state_two)]
    assert len(evals[0]) == 1 and evals[0] == pytest.approx(evals[1], abs=1e-12)
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-10
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["mask_strategy"] == (mask_strategy or "random")


def test_gradient_checkpointing_flag_same_weights(tiny_config, tmp_path):
    def run(name, **flags):
        trainer = MAETrainer(
            make_model(tiny_config, dtype=torch.float64),
            make_args(tmp_path / name, max_steps=2, **flags),
            TensorImages(dtype=torch.float64),
        )
        trainer.train()
        return trainer

    plain, checkpointed = run("plain"), run("ckpt", gradient_checkpointing=True)
    assert (
        checkpointed.model.mae.blocks[0].gradient_checkpointing
        and checkpointed.model.decoder.blocks[0].gradient_checkpointing
    )
    assert not plain.model.mae.blocks[0].gradient_checkpointing
    assert step_losses(plain) == pytest.approx(step_losses(checkpointed), abs=1e-12)
    assert max_diff(weights(tmp_path / "plain"), weights(tmp_path / "ckpt")) < 1e-12


def test_torch_compile_flag_matches_eager(tiny_config, tmp_path):
    from accelerate.state import AcceleratorState

    def run(name, **flags):
        AcceleratorState._reset_state(reset_partial_state=True)  # the dynamo backend is fixed once per process
        trainer = MAETrainer(make_model(tiny_config), make_args(tmp_path / name, max_steps=2, **flags), TensorImages())
        trainer.train()
        return trainer

    try:
        eager, compiled = run("eager"), run("compiled", torch_compile=True)
        assert compiled.wrapped_model.__class__.__name__ == "OptimizedModule"  # really compiled
        assert step_losses(compiled) == pytest.approx(step_losses(eager), rel=1e-4, abs=1e-5)
        assert max_diff(weights(tmp_path / "eager"), weights(tmp_path / "compiled")) < 1e-4
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_new_run_never_prunes_or_shadows_checkpoints_it_did_not_write(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=4), TensorImages()).train()
    assert (tmp_path / "checkpoint-4").is_dir()
    fresh = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=2, save_steps=1, save_total_limit=1), TensorImages()
    )
    with pytest.raises(ValueError, match="checkpoint-4.*overwrite_output_dir"):
        fresh.train()
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()  # untouched
    # Resuming from an earlier checkpoint while a later one exists is refused the same way.
    MAETrainer(make_model(tiny_config), make_args(tmp_path / "b", max_steps=4, save_steps=2), TensorImages()).train()
    early = MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path / "b", max_steps=4, resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2")),
        TensorImages(),
    )
    with pytest.raises(ValueError, match="checkpoint-4"):
        early.train()
    # The explicit switch deletes them and starts over.
    MAETrainer(
        make_model(tiny_config),
        make_args(tmp_path, max_steps=2, save_steps=1, save_total_limit=1, overwrite_output_dir=True),
        TensorImages(),
    ).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("name", ["eval_steps", "save_steps", "save_total_limit"])
def test_zero_step_settings_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=name):
        make_args(tmp_path, **{name: 0})


def test_the_data_fingerprint_is_computed_once_per_run(tiny_config, tmp_path, monkeypatch):
    # It reads every file name of an image folder (seconds for ImageNet): not again at every checkpoint.
    from maekit.training import trainer as trainer_module

    calls = []
    fingerprint = trainer_module._dataset_fingerprint
    monkeypatch.setattr(trainer_module, "_dataset_fingerprint", lambda data: calls.append(data) or fingerprint(data))
    MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=1, save_total_limit=None), pil_dataset()
    ).train()
    assert len(calls) == 1
    saved = {json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())["dataset_fingerprint"]
             for step in range(1, 5)}  # fmt: skip
    assert saved == {fingerprint(pil_dataset())}


def test_the_model_card_states_the_schedule_the_run_used(tiny_config, tmp_path):
    args = make_args(tmp_path, max_steps=2, lr_schedule="poly", lr_poly_power=2.0)
    MAETrainer(make_model(tiny_config), args, TensorImages(16)).train()
    card = (tmp_path / "README.md").read_text()
    assert "| lr_schedule | poly |" in card and "| lr_poly_power | 2 |" in card and "cosine" not in card
