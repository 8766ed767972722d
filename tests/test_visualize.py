"""Reconstruction grids: de-normalization, honest and oracle per-patch un-normalization (norm_pix_loss), layout."""

import numpy as np
import pytest
import torch

from maekit import MAEForPreTraining, patchify, unpatchify
from maekit.masking import sample_mask
from maekit.targets import patch_statistics
from maekit.visualize import (
    HEADER_HEIGHT,
    reconstruction_grid,
    reconstruction_images,
    visible_patch_statistics,
    visualize_reconstructions,
)

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
    out = reconstruction_images(normalized, target, mask, config, image_mean=MEAN, image_std=STD, unnormalize="oracle")
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
    assert grid.mode == "RGB" and grid.size == (4 * 96 + 5 * 2, HEADER_HEIGHT + 3 * 96 + 4 * 2)
    assert model.training  # mode restored
    pixels, normalized = images_in_unit_range()
    small = reconstruction_grid(normalized, torch.zeros(2, 16, 192), torch.ones(2, 16), tiny_config(), min_tile_size=32,
                                padding=0, image_mean=MEAN, image_std=STD, header=False)  # fmt: skip
    assert small.size == (4 * 32, 2 * 32)
    assert abs(small.getpixel((5, 40))[0] - round(pixels[1, 0, 8, 5].item() * 255)) <= 1  # row 2, original column
    with_header = reconstruction_grid(normalized, torch.zeros(2, 16, 192), torch.ones(2, 16), tiny_config(),
                                      min_tile_size=32, padding=0, image_mean=MEAN, image_std=STD)  # fmt: skip
    assert with_header.size == (4 * 32, HEADER_HEIGHT + 2 * 32)
    assert np.array_equal(np.asarray(with_header)[HEADER_HEIGHT:], np.asarray(small))  # the tiles, shifted down


def test_channel_statistics_must_match(tiny_config):
    _, normalized = images_in_unit_range()
    with pytest.raises(ValueError, match="image_mean has 2 values"):
        reconstruction_images(
            normalized, torch.zeros(2, 16, 192), torch.ones(2, 16), tiny_config(), image_mean=(0.5, 0.5)
        )


def masked_stats_setup(tiny_config):
    config = tiny_config(norm_pix_loss=True)
    _, normalized = images_in_unit_range()
    mask = sample_mask("random", 2, config.grid_size, 0.75, torch.Generator().manual_seed(0)).float()
    logits = torch.randn(2, 16, 192, generator=torch.Generator().manual_seed(1))
    removed = unpatchify(mask[..., None].expand(-1, -1, 192), 8, 32).bool()
    return config, normalized, mask, logits, removed


def test_honest_rendering_does_not_look_at_removed_pixels(tiny_config):
    config, normalized, mask, logits, removed = masked_stats_setup(tiny_config)
    changed = torch.where(removed, normalized * 3 + 1, normalized)  # other contents, other statistics
    for unnormalize, same in (("honest", True), ("oracle", False)):
        first = reconstruction_images(normalized, logits, mask, config, unnormalize=unnormalize)
        second = reconstruction_images(changed, logits, mask, config, unnormalize=unnormalize)
        assert torch.equal(first["masked"], second["masked"])
        for name in ("reconstruction", "reconstruction_visible"):
            assert torch.equal(first[name], second[name]) == same, (unnormalize, name)
    # not even a NaN in a removed patch reaches the honest rendering
    poisoned = torch.where(removed, torch.nan, normalized)
    honest = reconstruction_images(poisoned, logits, mask, config)
    assert torch.isfinite(honest["reconstruction"]).all()
    assert torch.equal(
        honest["reconstruction"], reconstruction_images(normalized, logits, mask, config)["reconstruction"]
    )


def test_visible_patch_statistics():
    patches = torch.randn(1, 9, 12) * torch.arange(1, 10).view(1, 9, 1) + torch.arange(9).view(1, 9, 1)
    true_mean, true_std = patch_statistics(patches)
    mask = torch.ones(1, 9)
    mask[0, 4] = 0  # only the centre of a 3x3 grid is visible
    mean, std = visible_patch_statistics(patches, mask, (3, 3))
    torch.testing.assert_close(mean, true_mean[:, 4:5].expand(1, 9, 1))  # every patch gets the only visible one's
    torch.testing.assert_close(std, true_std[:, 4:5].expand(1, 9, 1))
    mask[0, 0] = 0  # a second visible patch in a corner: the corner's neighbours lean towards it
    mean, _ = visible_patch_statistics(patches, mask, (3, 3))
    assert torch.equal(mean[0, [0, 4]], true_mean[0, [0, 4]])  # visible patches keep their own
    # patch 1 (top middle) is at distance 1 from both: their plain average
    torch.testing.assert_close(mean[0, 1, 0], (true_mean[0, 0, 0] + true_mean[0, 4, 0]) / 2)
    assert abs(mean[0, 8, 0] - true_mean[0, 4, 0]) < abs(mean[0, 8, 0] - true_mean[0, 0, 0])  # far corner: the centre
    nothing = visible_patch_statistics(patches, torch.ones(1, 9), (3, 3))  # nothing visible: the data's 0 and 1
    assert torch.equal(nothing[0], torch.zeros(1, 9, 1)) and torch.equal(nothing[1], torch.ones(1, 9, 1))


def test_header_names_the_rendering(tiny_config):
    config, normalized, mask, logits, _ = masked_stats_setup(tiny_config)
    grids = {
        u: np.asarray(reconstruction_grid(normalized, logits, mask, config, unnormalize=u))
        for u in ("honest", "oracle")
    }
    header = {u: g[:HEADER_HEIGHT] for u, g in grids.items()}
    assert (header["honest"] < 128).any()  # text is drawn
    tile = 96 + 2
    assert np.array_equal(header["honest"][:, : 2 * tile], header["oracle"][:, : 2 * tile])  # original, masked
    assert not np.array_equal(header["honest"][:, 2 * tile :], header["oracle"][:, 2 * tile :])  # the renderings
    with pytest.raises(ValueError, match="unnormalize"):
        reconstruction_grid(normalized, logits, mask, config, unnormalize="true")


def test_hog_models_show_the_input_columns_only(tiny_config):
    model = MAEForPreTraining(tiny_config(target="hog"))
    images = reconstruction_images(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, 108), torch.ones(2, 16), model.config)
    assert set(images) == {"original", "masked"}
    grid = visualize_reconstructions(model, torch.randn(2, 3, 32, 32), seed=0)
    assert grid.size == (3 * 96 + 4 * 2, HEADER_HEIGHT + 2 * 96 + 3 * 2)  # 2 columns + room for the note


def test_visualize_with_a_strategy_and_seed(tiny_config):
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True))
    pixels = torch.randn(2, 3, 32, 32)
    first = visualize_reconstructions(model, pixels, mask_strategy="grid", seed=3)
    assert np.array_equal(
        np.asarray(first), np.asarray(visualize_reconstructions(model, pixels, mask_strategy="grid", seed=3))
    )
    # the masked column shows the grid: 8-pixel patches enlarged x3 (24 px), one visible in every 2x2 cell (48 px)
    masked = np.asarray(first)[HEADER_HEIGHT + 2 : HEADER_HEIGHT + 2 + 96, 96 + 4 : 2 * 96 + 4]
    gray = (np.abs(masked.astype(int) - 128) <= 1).all(-1)  # (96, 96): removed pixels
    cells = gray.reshape(2, 48, 2, 48).transpose(0, 2, 1, 3).reshape(4, 48, 48)
    assert all((~cell).sum() == 24 * 24 for cell in cells)  # one 24x24 visible patch in every 48x48 cell
    mask = sample_mask("block", 2, (4, 4), 0.5)
    assert visualize_reconstructions(model, pixels, mask=mask).size == first.size
    with pytest.raises(ValueError, match="unnormalize"):
        visualize_reconstructions(model, pixels, unnormalize="both")
