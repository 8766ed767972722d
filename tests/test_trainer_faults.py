"""When things go wrong in training: non-finite steps, checkpoints that must load, resuming with other data, a full
disk, Hub failures, and what the user is told (issue: nothing a user trained is ever lost or silently wrong)."""

import errno
import json
import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForPreTraining

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEImageProcessor, MAETrainer
from maekit.convert import main as convert_main
from maekit.data import MAEImageDataset, MAETrainTransform
from maekit.training import (
    CheckpointWriteError,
    ClassificationTrainer,
    HubAccessError,
    NonFiniteLossError,
    Trainer,
    find_latest_checkpoint,
)
from maekit.training import hub as hub_module
from maekit.training.checkpointing import is_disk_full

from .test_finetune import LabeledTensors
from .test_finetune import make_args as classification_args
from .test_finetune import make_model as make_classifier
from .test_trainer import TensorImages, make_args, make_model, max_diff, weights


class InfiniteGradientsFrom:
    """A gradient hook on one weight that makes its gradient infinite at the chosen 0-based optimizer steps, while
    the loss stays finite (the case that used to write NaN into every weight)."""

    def __init__(self, model, steps):
        self.steps, self.trainer = set(steps), None
        model.mae.patch_embed.proj.weight.register_hook(self)

    def __call__(self, grad):
        if self.trainer is not None and self.trainer.state.global_step in self.steps:
            return grad * math.inf
        return grad


def run_with_infinite_gradients(tiny_config, tmp_path, steps, **overrides):
    model = make_model(tiny_config)
    hook = InfiniteGradientsFrom(model, steps)
    trainer = MAETrainer(model, make_args(tmp_path, **overrides), TensorImages(16))
    hook.trainer = trainer
    return trainer


# ----------------------------------------------------------------------------------------------------------------------
# 1. Non-finite gradients and weights


def test_an_infinite_gradient_norm_with_a_finite_loss_stops_before_the_step(tiny_config, tmp_path):
    trainer = run_with_infinite_gradients(tiny_config, tmp_path, steps=range(2, 100), max_steps=6, save_steps=2)
    with pytest.raises(
        NonFiniteLossError, match=r"gradient norm inf \(loss [0-9.]+\) at step 3 .*checkpoint-2 is intact"
    ):
        trainer.train()
    assert find_latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    # The bad step was not applied: the model is still the one of checkpoint-2.
    current = {k: v for k, v in trainer.model.state_dict().items()}
    assert max_diff(weights(tmp_path / "checkpoint-2"), current) == 0


def test_skip_mode_drops_infinite_gradient_steps_and_has_a_limit(tiny_config, tmp_path):
    # Steps 3 and 4 (0-based 2, 3) have infinite gradients: skipped, not applied, counted.
    trainer = run_with_infinite_gradients(
        tiny_config, tmp_path / "skip", steps={2, 3}, max_steps=6, save_steps=2, nonfinite_loss="skip",
        save_total_limit=None,
    )  # fmt: skip
    result = trainer.train()
    assert result.global_step == 6 and trainer.state.num_nonfinite_steps == 2
    assert max_diff(weights(tmp_path / "skip" / "checkpoint-2"), weights(tmp_path / "skip" / "checkpoint-4")) == 0
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "skip").values())

    # Every step from the third on is bad: "skip" stops after nonfinite_patience in a row, with an error.
    endless = run_with_infinite_gradients(
        tiny_config, tmp_path / "endless", steps=range(2, 100), max_steps=40, save_steps=2, nonfinite_loss="skip",
        nonfinite_patience=5,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"Too many non-finite steps: 5 of 7 \(5 in a row"):
        endless.train()
    assert not (tmp_path / "endless" / "model.safetensors").exists()  # no "final" model was written

    # A bad step every other step: not in a row, but more than nonfinite_max_fraction of the steps.
    frequent = run_with_infinite_gradients(
        tiny_config, tmp_path / "frequent", steps=range(0, 100, 2), max_steps=40, nonfinite_loss="skip",
        nonfinite_patience=5, nonfinite_max_fraction=0.25,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"Too many non-finite steps: 5 of 9 \(1 in a row"):
        frequent.train()


def test_rollback_reloads_the_newest_checkpoint_and_skips_the_bad_batch(tiny_config, tmp_path):
    common = dict(max_steps=6, save_steps=2, save_total_limit=None)
    rolled = run_with_infinite_gradients(tiny_config, tmp_path / "rollback", {2}, nonfinite_loss="rollback", **common)
    result = rolled.train()
    assert result.global_step == 6 and rolled.state.num_rollbacks == 1 and rolled.state.num_nonfinite_steps == 1
    assert [e["step"] for e in rolled.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]  # 3: no applied step
    # Nothing else draws random numbers here, so going back to checkpoint-2 and skipping step 3 equals skipping it.
    skipped = run_with_infinite_gradients(tiny_config, tmp_path / "skip", {2}, nonfinite_loss="skip", **common)
    skipped.train()
    assert max_diff(weights(tmp_path / "rollback"), weights(tmp_path / "skip")) == 0


class CorruptWeightsFrom(torch.utils.data.Dataset):
    """Images that, from epoch 1 on, make a forward pre-hook write inf into a weight (weights gone bad for a reason
    the step checks cannot see)."""

    def __init__(self, model, count=16):
        self.images = TensorImages(count)
        self.epoch = 0
        model.register_forward_pre_hook(self.corrupt)
        self.model = model

    def corrupt(self, module, inputs):
        if self.epoch >= 1:
            with torch.no_grad():
                self.model.decoder.pred.weight[0, 0] = math.inf

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_non_finite_weights_are_never_saved_and_never_end_a_run_successfully(tiny_config, tmp_path):
    model = make_model(tiny_config)
    trainer = MAETrainer(
        model, make_args(tmp_path, max_steps=4, save_steps=2, nonfinite_loss="skip"), CorruptWeightsFrom(model)
    )
    with pytest.raises(NonFiniteLossError, match=r"weights are not finite at checkpoint 4 .*checkpoint-2 is intact"):
        trainer.train()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".tmp-checkpoint-*")) and not (tmp_path / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "checkpoint-2").values())


# ----------------------------------------------------------------------------------------------------------------------
# 2. Every checkpoint is a model folder


def test_every_checkpoint_is_a_loadable_model_folder(tiny_config, tmp_path):
    processor = MAEImageProcessor(size={"height": 32, "width": 32})
    model = make_model(tiny_config)
    MAETrainer(
        model, make_args(tmp_path, max_steps=2, save_steps=1), TensorImages(16), image_processor=processor
    ).train()
    checkpoint = tmp_path / "checkpoint-1"
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    loaded = MAEForPreTraining.from_pretrained(checkpoint)
    assert loaded.config.hidden_size == 32 and MAEConfig.from_pretrained(checkpoint).hidden_size == 32
    assert max_diff(loaded.state_dict(), weights(checkpoint)) == 0
    assert type(AutoModelForPreTraining.from_pretrained(checkpoint)) is MAEForPreTraining
    assert AutoConfig.from_pretrained(checkpoint).model_type == "maekit_mae"
    assert isinstance(AutoImageProcessor.from_pretrained(checkpoint), MAEImageProcessor)
    # ... and maekit-convert reads it like any maekit folder.
    assert convert_main([str(checkpoint), str(tmp_path / "as-transformers"), "--to", "transformers"]) == 0
    assert (tmp_path / "as-transformers" / "config.json").is_file()


def test_linear_probe_checkpoints_load_as_classifiers_and_resume_exactly(tmp_path):
    def args(folder, **overrides):
        return classification_args(
            folder, linear_probe=True, learning_rate=0.5, weight_decay=0.0, mixup=0.0, cutmix=0.0,
            label_smoothing=0.0, max_steps=4, save_steps=2, save_total_limit=None, **overrides,
        )  # fmt: skip

    torch.manual_seed(0)
    ClassificationTrainer(make_classifier(pooling="cls"), args(tmp_path / "full"), LabeledTensors()).train()
    # The checkpoint is a plain classifier (the probe head folded), like the final model.
    classifier = MAEForImageClassification.from_pretrained(tmp_path / "full" / "checkpoint-2")
    assert isinstance(classifier.head, torch.nn.Linear)
    # Resuming trains the unfolded probe head further, exactly as the uninterrupted run did.
    torch.manual_seed(1)
    resumed = ClassificationTrainer(
        make_classifier(pooling="cls"),
        args(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")),
        LabeledTensors(),
    )
    resumed.train()
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "resumed")) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# 3. Resuming with other data or another schedule


def test_resuming_with_other_data_is_refused_naming_the_difference(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), TensorImages(16)).train()
    more_data = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=2, resume_from_checkpoint="latest"), TensorImages(32)
    )
    with pytest.raises(ValueError, match=r"num_train_samples: 16 in the checkpoint, 32 now; steps_per_epoch: 2 .* 4"):
        more_data.train()
    # The explicit override resumes anyway.
    anyway = make_args(tmp_path, max_steps=3, resume_from_checkpoint="latest", ignore_resume_mismatch=True)
    assert MAETrainer(make_model(tiny_config), anyway, TensorImages(32)).train().global_step == 3


def _image_dataset(seed: int) -> MAEImageDataset:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(16)]
    table = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    return MAEImageDataset(table, MAETrainTransform(size=32))


def test_resuming_with_same_size_other_images_is_refused(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), _image_dataset(0)).train()
    other = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=2, resume_from_checkpoint="latest"), _image_dataset(1)
    )
    with pytest.raises(ValueError, match="dataset_fingerprint"):
        other.train()
    same = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=2, resume_from_checkpoint="latest"), _image_dataset(0)
    )
    assert same.train().global_step == 2


# ----------------------------------------------------------------------------------------------------------------------
# 10. A full disk


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"),
    ],
)
def test_a_full_disk_while_checkpointing_removes_the_partial_folder_and_says_so(
    tiny_config, tmp_path, monkeypatch, error
):
    trainer = MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=2), TensorImages(16))
    save_model = Trainer.save_model

    def fill_the_disk(self, folder, checkpoint=False):
        if Path(folder).name == ".tmp-checkpoint-4":
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise error
        save_model(self, folder, checkpoint)

    monkeypatch.setattr(Trainer, "save_model", fill_the_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"No space left on device while writing checkpoint 4 .*checkpoint-2 is intact"
    ):
        trainer.train()
    assert not (tmp_path / ".tmp-checkpoint-4").exists() and not (tmp_path / "checkpoint-4").exists()
    assert MAEForPreTraining.from_pretrained(tmp_path / "checkpoint-2")  # the last complete one still loads


def test_disk_full_recognises_the_writers_messages():
    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10 vs 4"))
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


# ----------------------------------------------------------------------------------------------------------------------
# 5. The Hub


class FlakyApi:
    """A fake Hub client: `create_repo` fails when `refuse` is set; the uploads listed in `fail_uploads` fail."""

    refuse, fail_uploads, uploads = False, set(), []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        if FlakyApi.refuse:
            raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create")
        return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
        FlakyApi.uploads.append(commit_message)
        if len(FlakyApi.uploads) in FlakyApi.fail_uploads:
            raise ConnectionError("Connection reset by peer\n(and 70 more lines of traceback)")


@pytest.fixture
def flaky_hub(monkeypatch):
    FlakyApi.refuse, FlakyApi.fail_uploads, FlakyApi.uploads = False, set(), []
    monkeypatch.setattr(hub_module, "HfApi", FlakyApi)
    return FlakyApi


def test_hub_access_is_checked_before_training(tiny_config, tmp_path, flaky_hub):
    flaky_hub.refuse = True
    trainer = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=2, push_to_hub=True, hub_model_id="x"), TensorImages(16)
    )
    with pytest.raises(HubAccessError, match=r"cannot create or access the Hub repository 'x' \(OSError: 401"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))  # refused before the first step


def test_hub_failures_during_training_only_warn_and_the_end_says_how_to_push(tiny_config, tmp_path, flaky_hub, caplog):
    flaky_hub.fail_uploads = {1, 3}  # the first every-save push and the final push fail
    args = make_args(
        tmp_path, max_steps=2, save_steps=1, push_to_hub=True, hub_model_id="m", hub_strategy="every_save"
    )
    with caplog.at_level(logging.WARNING):
        result = MAETrainer(make_model(tiny_config), args, TensorImages(16)).train()
    assert result.global_step == 2
    assert flaky_hub.uploads == ["Training in progress, step 1", "Training in progress, step 2", "End of training"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"The model is saved in {tmp_path}" in errors[0] and "hf upload me/m" in errors[0]
    assert "70 more lines" not in caplog.text  # one line per failure, no traceback
    assert MAEForPreTraining.from_pretrained(tmp_path)


def test_model_cards_never_publish_local_paths(tiny_config, tmp_path):
    data_dir = tmp_path / "my-images"
    data_dir.mkdir()
    MAETrainer(
        make_model(tiny_config), make_args(tmp_path / "out", max_steps=1), TensorImages(8), dataset_name=str(data_dir)
    ).train()
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(data_dir) not in card and "datasets:" not in card


# ----------------------------------------------------------------------------------------------------------------------
# 13, 16. Defaults and what the user is told


def test_checkpoint_defaults_and_the_plan_is_announced(tiny_config, tmp_path, caplog):
    # 16 images, batch 8: 2 steps per epoch. Default: at epoch ends at least 500 steps apart, and at the end;
    # the newest 2 are kept.
    args = make_args(tmp_path, max_steps=4)
    assert args.save_steps is None and args.save_total_limit == 2 and args.resolved_save_steps(2) == 500
    with caplog.at_level(logging.INFO, logger="maekit"):
        MAETrainer(make_model(tiny_config), args, TensorImages(16)).train()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]
    assert (
        f"Checkpoints: {tmp_path}/checkpoint-<step> every 500 steps and at step 4, keeping the newest 2" in caplog.text
    )


def test_progress_bar_keeps_losses_epoch_and_evaluation_and_resume_is_announced(tiny_config, tmp_path, caplog):
    trainer = MAETrainer(
        make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=2), TensorImages(16), TensorImages(4)
    )
    trainer.train()
    assert {"loss", "lr", "img_s", "epoch", "eval_loss"} <= set(trainer._postfix)
    with caplog.at_level(logging.INFO, logger="maekit"):
        resumed = MAETrainer(
            make_model(tiny_config), make_args(tmp_path / "b", max_steps=4, save_steps=2), TensorImages(16)
        )
        resumed.train()
        again = MAETrainer(
            make_model(tiny_config), make_args(tmp_path / "b", max_steps=4, resume_from_checkpoint="latest"),
            TensorImages(16),
        )  # fmt: skip
        again.train()
    assert f"Resumed from {tmp_path / 'b' / 'checkpoint-4'} at step 4 (epoch 2.00)" in caplog.text

    finetune = ClassificationTrainer(
        make_classifier(), classification_args(tmp_path / "ft", eval_steps=2, mixup=0.0, cutmix=0.0), LabeledTensors(),
        eval_dataset=LabeledTensors(6),
    )  # fmt: skip
    finetune.train()
    assert {"loss", "lr", "img_s", "epoch", "eval_acc1", "eval_loss"} <= set(finetune._postfix)


def test_transformers_progress_bars_do_not_interleave_with_the_training_bar(tiny_config, tmp_path, capfd):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2, disable_tqdm=False), TensorImages(16)).train()
    err = capfd.readouterr().err
    assert "pretraining" in err and "Writing model shards" not in err
    from transformers.utils import logging as transformers_logging

    assert transformers_logging.is_progress_bar_enabled()  # switched back on after saving


def test_trainer_state_json_records_the_run(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), TensorImages(16)).train()
    record = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert record["weights_finite"] is True
    assert (record["num_train_samples"], record["steps_per_epoch"], record["total_steps"]) == (16, 2, 2)


def test_resuming_with_another_schedule_type_is_refused(tiny_config, tmp_path):
    MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=2), TensorImages(16)).train()
    poly = make_args(tmp_path, max_steps=2, resume_from_checkpoint="latest", lr_schedule="poly")
    with pytest.raises(ValueError, match="lr_schedule: 'cosine' in the checkpoint, 'poly' now"):
        MAETrainer(make_model(tiny_config), poly, TensorImages(16)).train()


def test_fp16_loss_scaler_survives_a_skipped_step(tiny_config, tmp_path):
    # With a GradScaler a dropped step left it "unscaled": the next step failed in unscale_(). The scaler must see the
    # non-finite step (it skips it and lowers its scale).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # mixed precision is fixed once per process
    try:
        images = TensorImages(16)
        images.images[3, 0, 0, 0] = math.nan  # one poisoned image: a NaN loss at its step
        args = make_args(tmp_path, max_steps=8, nonfinite_loss="skip", mixed_precision="fp16")
        trainer = MAETrainer(make_model(tiny_config), args, images)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)  # accelerate makes none on CPU
        trainer.accelerator.native_amp = True
        assert trainer.train().global_step == 8 and trainer.state.num_nonfinite_steps >= 1
        assert trainer.accelerator.scaler.get_scale() < 2.0**4  # the overflow lowered the scale
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_serialization_error_while_checkpointing_is_reported_and_cleaned_up(tiny_config, tmp_path, monkeypatch):
    # safetensors reports a full disk with its own exception type, not OSError.
    from safetensors import SafetensorError

    from maekit.training import checkpointing

    trainer = MAETrainer(make_model(tiny_config), make_args(tmp_path, max_steps=4, save_steps=2), TensorImages(16))
    write = checkpointing._write_model_folder

    def full_disk(unwrapped, state_dict, folder, *args):
        if folder.name == ".tmp-checkpoint-4":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        write(unwrapped, state_dict, folder, *args)

    monkeypatch.setattr(checkpointing, "_write_model_folder", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device while writing checkpoint 4"):
        trainer.train()
    assert not (tmp_path / ".tmp-checkpoint-4").exists() and (tmp_path / "checkpoint-2").is_dir()


def test_resume_refuses_another_seed_or_objective_and_accepts_a_moved_image_folder(tiny_config, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(folder / f"{i:02d}.png")

    def dataset(path):
        from maekit.data import load_image_dataset

        return MAEImageDataset(load_image_dataset(str(path))[0], MAETrainTransform(size=32))

    MAETrainer(make_model(tiny_config), make_args(tmp_path / "run", max_steps=2), dataset(folder)).train()
    resume = dict(max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="seed: 0 in the checkpoint, 1 now"):
        MAETrainer(make_model(tiny_config), make_args(tmp_path / "run", seed=1, **resume), dataset(folder)).train()
    with pytest.raises(ValueError, match="mask_ratio: 0.75 in the checkpoint, 0.5 now"):
        model = make_model(tiny_config, mask_ratio=0.5)
        MAETrainer(model, make_args(tmp_path / "run", **resume), dataset(folder)).train()
    # The same images copied elsewhere (a node's local disk) and touched: the same data, resumed.
    import shutil

    copy = shutil.copytree(folder, tmp_path / "local-copy")
    (copy / "03.png").touch()
    assert MAETrainer(make_model(tiny_config), make_args(tmp_path / "run", **resume), dataset(copy)).train()


def test_a_rollback_at_the_last_step_still_evaluates_logs_and_saves(tiny_config, tmp_path):
    model = make_model(tiny_config)
    hook = InfiniteGradientsFrom(model, {3})  # the last of 4 steps
    args = make_args(tmp_path, max_steps=4, save_steps=2, nonfinite_loss="rollback", save_total_limit=None)
    trainer = MAETrainer(model, args, TensorImages(16), eval_dataset=TensorImages(4, seed=1))
    hook.trainer = trainer
    result = trainer.train()
    assert result.global_step == 4 and trainer.state.num_rollbacks == 1
    assert (tmp_path / "checkpoint-4").is_dir() and math.isfinite(result.metrics["eval_loss"])
    assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e][-1] == 4
