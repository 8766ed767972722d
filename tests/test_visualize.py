"""Reconstruction grids: de-normalization, per-patch un-normalization (norm_pix_loss), layout."""

import pytest
import torch

from maekit import MAEForPreTraining, patchify
from maekit.visualize import reconstruction_grid, reconstruction_images, visualize_reconstructions

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def images_in_unit_range():
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # what the grid must show
    normalized = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return pixels, normalized


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_perfect_prediction_reconstructs_the_original(tiny_config, norm_pix_loss):
    config = tiny_config(norm_pix_loss=norm_pix_loss)
    pixels, normalized = images_in_unit_range()
    target = patchify(normalized, config.patch_hw)
    if norm_pix_loss:  # the model's target: per-patch normalized, unbiased variance, eps 1e-6
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, config.num_patches)
    mask[:, ::2] = 1
    out = reconstruction_images(normalized, target, mask, config, image_mean=MEAN, image_std=STD)
    torch.testing.assert_close(out["original"], pixels, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["reconstruction"], pixels, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["reconstruction_visible"], pixels, atol=1e-4, rtol=0)
    # Removed patches (every other one in raster order: columns 0 and 2 of each 4-patch row) are gray.
    assert torch.all(out["masked"][:, :, :8, :8] == 0.5) and torch.equal(
        out["masked"][:, :, :8, 8:16], out["original"][:, :, :8, 8:16]
    )


def test_visible_patches_are_pasted_back(tiny_config):
    config = tiny_config()
    pixels, normalized = images_in_unit_range()
    mask = torch.zeros(2, config.num_patches)
    mask[:, 0] = 1
    out = reconstruction_images(normalized, torch.zeros(2, 16, 192), mask, config, image_mean=MEAN, image_std=STD)
    mean_image = torch.tensor(MEAN).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    torch.testing.assert_close(out["reconstruction_visible"][:, :, :8, :8], mean_image)  # predicted 0 = the mean
    torch.testing.assert_close(out["reconstruction_visible"][:, :, 8:, :], pixels[:, :, 8:, :], atol=1e-5, rtol=0)


def test_grid_layout_and_model_helper(tiny_config):
    model = MAEForPreTraining(tiny_config())
    model.train()
    grid = visualize_reconstructions(model, torch.randn(3, 3, 32, 32))
    assert grid.mode == "RGB" and grid.size == (4 * 96 + 5 * 2, 3 * 96 + 4 * 2)
    assert model.training  # mode restored
    pixels, normalized = images_in_unit_range()
    small = reconstruction_grid(normalized, torch.zeros(2, 16, 192), torch.ones(2, 16), tiny_config(), min_tile_size=32,
                                padding=0, image_mean=MEAN, image_std=STD)  # fmt: skip
    assert small.size == (4 * 32, 2 * 32)
    assert abs(small.getpixel((5, 40))[0] - round(pixels[1, 0, 8, 5].item() * 255)) <= 1  # row 2, original column


def test_channel_statistics_must_match(tiny_config):
    _, normalized = images_in_unit_range()
    with pytest.raises(ValueError, match="image_mean has 2 values"):
        reconstruction_images(
            normalized, torch.zeros(2, 16, 192), torch.ones(2, 16), tiny_config(), image_mean=(0.5, 0.5)
        )
