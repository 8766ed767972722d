"""Masking strategies (random / block / grid), user masks, and the guarantees the trainer relies on."""

import pytest
import torch

from maekit import MAEForPreTraining, MAEModel
from maekit.masking import (
    MASK_STRATEGIES,
    block_mask,
    check_mask,
    grid_mask,
    mask_to_noise,
    masking_from_noise,
    num_kept,
    random_masking,
    sample_mask,
    sample_mask_noise,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def official_masking(noise: torch.Tensor, mask_ratio: float):
    """The official `random_masking` of models_mae.py, transcribed independently (mask from a gather)."""
    batch, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


def removed_neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean number of removed 4-neighbours of a removed patch (a measure of how clustered the removed patches are)."""
    m = mask.view(-1, *grid).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    return ((neighbours * m).sum() / m.sum()).item()


def test_random_is_todays_noise_and_masks():
    # The trainer drew torch.rand(global_batch, L, generator=sample_rng(seed, step, stream)): same numbers, same masks.
    noise = sample_mask_noise("random", 6, (4, 4), 0.75, gen(3))
    torch.testing.assert_close(noise, torch.rand(6, 16, generator=gen(3)), rtol=0, atol=0)
    for ratio in (0.0, 0.5, 0.75, 0.9):
        ids_keep, mask, ids_restore = random_masking(6, 16, ratio, noise, "cpu")
        ref_keep, ref_mask, ref_restore = official_masking(noise, ratio)
        assert (
            torch.equal(ids_keep, ref_keep) and torch.equal(mask, ref_mask) and torch.equal(ids_restore, ref_restore)
        )


def test_per_sample_noise_is_todays_evaluation_draw():
    # The trainer's evaluation drew torch.rand(L, generator=sample_rng(seed, stream, index)) per image.
    for strategy in MASK_STRATEGIES:
        one = sample_mask_noise(strategy, 1, (4, 4), 0.75, gen(9))
        assert one.shape == (1, 16) and torch.equal(one, sample_mask_noise(strategy, 1, (4, 4), 0.75, gen(9)))
    torch.testing.assert_close(
        sample_mask_noise("random", 1, (4, 4), 0.75, gen(9))[0], torch.rand(16, generator=gen(9))
    )


def test_random_model_masks_equal_the_official_ones(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    noise = sample_mask_noise("random", 4, model.config.grid_size, 0.75, gen(1))
    out = model(torch.randn(4, 3, 32, 32), noise=noise)
    _, ref_mask, ref_restore = official_masking(noise, 0.75)
    assert torch.equal(out.mask, ref_mask) and torch.equal(out.ids_restore, ref_restore)


GRIDS = [(14, 14), (8, 8), (7, 7), (4, 6), (1, 5)]
RATIOS = [0.0, 0.1, 0.5, 0.6, 0.75, 0.9, 0.95]


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_every_strategy_keeps_the_exact_count(strategy, grid):
    length = grid[0] * grid[1]
    for ratio in RATIOS:
        noise = sample_mask_noise(strategy, 16, grid, ratio, gen(7))
        mask = sample_mask(strategy, 16, grid, ratio, gen(7))
        assert noise.shape == (16, length) and noise.dtype == torch.float32
        assert mask.shape == (16, length) and mask.dtype == torch.bool
        assert torch.all((~mask).sum(1) == num_kept(length, ratio)), (strategy, grid, ratio)
        # the mask the model makes from the noise is that mask
        assert torch.equal(masking_from_noise(noise, num_kept(length, ratio))[1].bool(), mask)


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_masks_are_a_pure_function_of_the_generator(strategy):
    first = sample_mask_noise(strategy, 8, (14, 14), 0.75, gen(5))
    torch.manual_seed(123)  # the global RNG plays no part
    again = sample_mask_noise(strategy, 8, (14, 14), 0.75, gen(5))
    assert torch.equal(first, again)
    other = sample_mask_noise(strategy, 8, (14, 14), 0.75, gen(6))
    assert not torch.equal(first, other)
    # different samples of a batch get different masks
    masks = sample_mask(strategy, 8, (14, 14), 0.75, gen(5))
    assert len({tuple(m.tolist()) for m in masks}) > 1


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_global_batch_sliced_per_process_equals_the_global_forward(tiny_config, strategy):
    """The trainer draws one global batch of noise and gives each process (and micro-batch) a slice."""
    model = MAEForPreTraining(tiny_config(mask_strategy=strategy)).eval()
    pixels = torch.randn(8, 3, 32, 32)
    noise = sample_mask_noise(strategy, 8, model.config.grid_size, model.config.mask_ratio, gen(11))
    whole = model(pixels, noise=noise)
    for processes in (2, 4):
        size = 8 // processes
        for rank in range(processes):
            part = slice(rank * size, (rank + 1) * size)
            out = model(pixels[part], noise=noise[part])
            assert torch.equal(out.mask, whole.mask[part]) and torch.equal(out.ids_restore, whole.ids_restore[part])
            torch.testing.assert_close(out.logits, whole.logits[part], rtol=1e-5, atol=1e-5)


def test_grid_keeps_one_of_every_two_by_two():
    mask = grid_mask(32, (14, 14), 0.75, gen(0)).view(32, 7, 2, 7, 2)
    kept = (~mask).sum(dim=(2, 4))  # (B, 7, 7): kept patches per 2x2 cell
    assert torch.all(kept == 1)
    # the same position inside every cell (a regular lattice), at an offset that varies between samples
    position = (~mask).permute(0, 1, 3, 2, 4).reshape(32, 49, 4).float().argmax(-1)  # (B, 49)
    assert torch.all(position == position[:, :1])
    assert len(set(position[:, 0].tolist())) > 1


def test_grid_on_odd_sides_and_other_ratios_stays_regular_where_it_can():
    # 7x7 at 0.75 keeps 12: a lattice of stride 2 holds 16, 12 or 9 points depending on its offset; the kept
    # patches are a subset of it (trimmed) or contain it (topped up).
    for seed in range(8):
        mask = grid_mask(1, (7, 7), 0.75, gen(seed)).view(7, 7)
        kept = ~mask
        lattices = []
        for dy in (0, 1):
            for dx in (0, 1):
                lattice = torch.zeros(7, 7, dtype=torch.bool)
                lattice[dy::2, dx::2] = True
                lattices.append(lattice)
        assert any(torch.equal(kept & lat, kept) or torch.equal(kept & lat, lat) for lat in lattices)
    # 0.9 on 14x14: stride 3, the 19 kept patches lie on one lattice of stride 3
    kept = ~grid_mask(4, (14, 14), 0.9, gen(0)).view(4, 14, 14)
    for sample in kept:
        rows, cols = sample.nonzero(as_tuple=True)
        assert len(set((rows % 3).tolist())) == 1 and len(set((cols % 3).tolist())) == 1


def test_block_masks_remove_clustered_patches():
    block = block_mask(64, (14, 14), 0.75, gen(0))
    random = sample_mask("random", 64, (14, 14), 0.75, gen(0))
    # a removed patch of a random mask has ~3 removed neighbours (0.75 * 4, fewer at the border); of blocks, more
    assert removed_neighbours(block, (14, 14)) > removed_neighbours(random, (14, 14)) + 0.4
    with pytest.raises(ValueError, match="min_aspect"):
        block_mask(2, (8, 8), 0.75, min_aspect=0.0)
    with pytest.raises(ValueError, match="min_block_patches"):
        block_mask(2, (8, 8), 0.75, min_block_patches=0)


def test_bad_strategy_and_geometry():
    with pytest.raises(ValueError, match="'spiral'"):
        sample_mask_noise("spiral", 2, (4, 4), 0.75)
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_mask_noise("grid", 2, (4, 4), 1.0)
    with pytest.raises(ValueError, match="grid_size"):
        sample_mask_noise("block", 2, (0, 4), 0.5)


def test_model_draws_masks_of_its_strategy(tiny_config):
    model = MAEForPreTraining(tiny_config(mask_strategy="grid")).eval()
    mask = model(torch.randn(6, 3, 32, 32)).mask.view(6, 2, 2, 2, 2)
    assert torch.all((1 - mask).sum(dim=(2, 4)) == 1)  # one kept patch in every 2x2 cell
    encoder = MAEModel(tiny_config(mask_strategy="block")).eval()
    out = encoder(torch.randn(2, 3, 32, 32), mask_ratio=0.5)
    assert out.last_hidden_state.shape == (2, 1 + 8, 32) and torch.all(out.mask.sum(1) == 8)
    # at another resolution the strategy masks the grid of that resolution
    out = model(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True)
    assert out.mask.shape == (2, 36) and torch.all((1 - out.mask).sum(1) == 9)


def test_mask_to_noise_keeps_exactly_the_visible_patches():
    mask = sample_mask("block", 5, (6, 6), 0.6, gen(2))
    noise = mask_to_noise(mask)
    kept = int((~mask[0]).sum())
    ids_keep, back, _ = masking_from_noise(noise, kept)
    assert torch.equal(back.bool(), mask)
    assert torch.all(ids_keep.diff(dim=1) > 0)  # raster order: deterministic


def test_user_mask_is_used_as_given(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    pixels = torch.randn(3, 3, 32, 32)
    mask = sample_mask("block", 3, (4, 4), 0.5, gen(0))
    out = model(pixels, mask=mask)
    assert torch.equal(out.mask.bool(), mask)
    # the same loss as the equivalent noise
    torch.testing.assert_close(out.loss, model(pixels, noise=mask_to_noise(mask), mask_ratio=0.5).loss)
    assert torch.equal(model(pixels, mask=mask, mask_ratio=0.5).mask.bool(), mask)  # an agreeing ratio is fine
    # any kept count works (it sets the count); the encoder sees that many patches
    few = torch.ones(3, 16, dtype=torch.bool)
    few[:, [0, 5]] = False
    assert MAEModel(tiny_config()).eval()(pixels, mask=few).last_hidden_state.shape == (3, 1 + 2, 32)


@pytest.mark.parametrize(
    "mask, kwargs, error, match",
    [
        (torch.zeros(3, 16), {}, ValueError, "bool"),
        (torch.zeros(3, 16, dtype=torch.long), {}, ValueError, "bool"),
        (torch.zeros(3, 15, dtype=torch.bool), {}, ValueError, r"\(3, 16\)"),
        (torch.zeros(2, 16, dtype=torch.bool), {}, ValueError, "shape"),
        (torch.eye(3, 16, dtype=torch.bool), {}, None, None),
        (torch.tensor([[True] * 8 + [False] * 8, [True] * 9 + [False] * 7, [True] * 8 + [False] * 8]), {},
         ValueError, r"same number.*\[8, 7, 8\]"),
        (torch.zeros(3, 16, dtype=torch.bool), {"noise": torch.rand(3, 16)}, ValueError, "either noise= or mask="),
        (torch.zeros(3, 16, dtype=torch.bool), {"mask_ratio": 0.75}, ValueError, "mask keeps 16 of 16"),
        ([[True] * 16] * 3, {}, TypeError, "bool tensor"),
    ],
)  # fmt: skip
def test_bad_masks_are_named(tiny_config, mask, kwargs, error, match):
    model = MAEForPreTraining(tiny_config()).eval()
    if error is None:  # a valid mask (one removed patch per sample)
        assert model(torch.randn(3, 3, 32, 32), mask=mask, **kwargs).mask.sum() == 3
        return
    with pytest.raises(error, match=match):
        model(torch.randn(3, 3, 32, 32), mask=mask, **kwargs)


def test_check_mask_returns_the_kept_count():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :7] = True
    assert check_mask(mask, 2, 10) == 3
