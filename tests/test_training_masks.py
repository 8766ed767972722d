"""The masks `MAETrainer` draws: today's random noise for the same seed, `MAETrainingArguments.mask_strategy` (its
precedence over the model config, saved with every checkpoint), and exact resume with a non-random strategy. The
process-count guarantee with `grid` masks is `tests/test_trainer.py::test_two_processes_match_one_process`."""

import json
import os

import pytest
import torch
from transformers import HfArgumentParser

from maekit import MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.data import sample_rng
from maekit.masking import grid_mask, mask_to_noise

from .test_trainer import TensorImages, make_args, make_model, max_diff, pil_dataset, step_losses, weights

# The stream of `sample_rng(seed, step, stream)` the trainer has drawn training masks from since masks became
# reproducible: pinned, so that the same seed keeps giving the same masks.
TRAIN_MASK_STREAM = 2**32 + 1


def record_training_noise(model: torch.nn.Module) -> list[torch.Tensor]:
    """The `noise=` of every training forward of `model`, in call order."""
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(kwargs["noise"].detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_random_masks_are_todays_for_the_same_seed(tiny_config, tmp_path):
    # Step s of a run with seed 5 masks its global batch G with torch.rand(G, L) from sample_rng(5, s, stream): the
    # noise (hence masks) of the official code and of maekit before strategies existed. Accumulation 2: the two
    # micro-batches get consecutive slices of the step's noise.
    model = make_model(tiny_config)
    seen = record_training_noise(model)
    args = make_args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2, seed=5,
                     num_reconstruction_images=0)  # fmt: skip
    MAETrainer(model, args, TensorImages()).train()
    assert len(seen) == 6 and model.config.mask_strategy == "random"
    length = model.config.num_patches
    for step in range(3):
        expected = torch.rand(8, length, generator=sample_rng(5, step, TRAIN_MASK_STREAM))
        torch.testing.assert_close(torch.cat(seen[2 * step : 2 * step + 2]), expected, rtol=0, atol=0)


def test_training_mask_strategy_wins_over_the_config_and_is_saved(tiny_config, tmp_path):
    model = make_model(tiny_config, mask_strategy="block")
    seen = record_training_noise(model)
    args = make_args(tmp_path, max_steps=2, save_steps=1, mask_strategy="grid", num_reconstruction_images=0)
    MAETrainer(model, args, TensorImages()).train()
    # The masks were grid masks: the noise of step 0 is exactly the grid draw of the step's generator.
    expected = mask_to_noise(grid_mask(8, model.config.grid_size, 0.75, sample_rng(0, 0, TRAIN_MASK_STREAM)))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    for folder in (tmp_path, tmp_path / "checkpoint-2"):
        assert json.loads((folder / "config.json").read_text())["mask_strategy"] == "grid"
        assert MAEForPreTraining.from_pretrained(folder).config.mask_strategy == "grid"


def test_without_a_training_mask_strategy_the_configs_is_used(tiny_config, tmp_path):
    model = make_model(tiny_config, mask_strategy="grid")
    seen = record_training_noise(model)
    MAETrainer(model, make_args(tmp_path, max_steps=1, num_reconstruction_images=0), TensorImages()).train()
    expected = mask_to_noise(grid_mask(8, model.config.grid_size, 0.75, sample_rng(0, 0, TRAIN_MASK_STREAM)))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["mask_strategy"] == "grid"


def test_exact_resume_with_block_masks(tiny_config, tmp_path):
    # N steps + resume + N steps == 2N steps, with block masks drawn from (seed, step) and data-loader workers.
    args = dict(max_steps=6, save_steps=3, dataloader_num_workers=2, eval_steps=100, mask_strategy="block")
    MAETrainer(make_model(tiny_config), make_args(tmp_path / "full", **args), pil_dataset()).train()

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.replace(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    resumed = MAETrainer(
        MAEForPreTraining(tiny_config()),
        make_args(resumed_dir, resume_from_checkpoint="latest", **args),
        pil_dataset(),
    )
    assert resumed.train().global_step == 6
    assert max_diff(weights(tmp_path / "full"), weights(resumed_dir)) <= 1e-6
    full_state = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    assert step_losses(resumed) == pytest.approx(step_losses(full_state), abs=1e-6)
    assert MAEForPreTraining.from_pretrained(resumed_dir).config.mask_strategy == "block"


def test_bad_training_mask_strategy_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"mask_strategy must be None \(the model config's\) or one of"):
        MAETrainingArguments(output_dir=str(tmp_path), mask_strategy="spiral")
    (args,) = HfArgumentParser(MAETrainingArguments).parse_args_into_dataclasses(["--mask_strategy", "block"])
    assert args.mask_strategy == "block"
