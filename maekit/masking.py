"""Which patches the encoder sees: random (official), block-wise and grid masks, and user-supplied masks.

The model masks from *noise*: per sample, `ids_shuffle = argsort(noise)` and the first `int(L * (1 - mask_ratio))`
patches are kept. Every strategy here is therefore expressed as noise (`sample_mask_noise`), and a boolean mask is
turned into noise that keeps exactly its visible patches (`mask_to_noise`), so one code path in the model serves
them all. Everything is a pure function of a `torch.Generator`: a trainer draws the masks of a whole global batch
from one generator and gives each process its slice, so masks do not depend on the number of processes.

Example:

```python
import torch
from maekit.masking import sample_mask, sample_mask_noise

generator = torch.Generator().manual_seed(0)
noise = sample_mask_noise("block", batch_size=4, grid_size=(14, 14), mask_ratio=0.75, generator=generator)
mask = sample_mask("grid", batch_size=4, grid_size=(14, 14), mask_ratio=0.75)  # bool (4, 196), True = removed
assert noise.shape == (4, 196) and torch.all((~mask).sum(1) == 49)
```
"""

from __future__ import annotations

import math

import torch

from .configuration_mae import MASK_STRATEGIES, check_mask_ratio, num_kept
from .validation import pair

__all__ = [
    "MASK_STRATEGIES",
    "block_mask",
    "check_mask",
    "grid_mask",
    "mask_to_noise",
    "masking_from_noise",
    "num_kept",
    "random_masking",
    "sample_mask",
    "sample_mask_noise",
]


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the `len_keep` patches with the smallest noise of each row of `noise` (B, L).

    Returns ids_keep (B, len_keep), mask (B, L) float with 0 keep / 1 remove, ids_restore (B, L) that undoes the
    shuffle.
    """
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = (ids_restore >= len_keep).float()  # position j is removed iff its rank in the shuffle is >= len_keep
    return ids_keep, mask, ids_restore


def random_masking(batch: int, length: int, mask_ratio: float, noise: torch.Tensor | None, device) -> tuple:
    """Per-sample random masking by shuffling: keep the `int(L * (1 - mask_ratio))` patches with the smallest noise.

    `noise` (B, L) defaults to `torch.rand(batch, length, device=device)`. Returns ids_keep (B, kept), mask (B, L)
    with 0 keep / 1 remove, ids_restore (B, L) that undoes the shuffle.
    """
    if noise is None:
        noise = torch.rand(batch, length, device=device)  # noise in [0, 1)
    return masking_from_noise(noise.to(device), num_kept(length, mask_ratio))


def check_mask(mask: torch.Tensor, batch: int, length: int) -> int:
    """Validate a user mask (bool `(batch, length)`, True = removed) and return how many patches each sample keeps.

    Raises:
        TypeError: `mask` is not a tensor.
        ValueError: wrong dtype or shape, or samples that keep different numbers of patches (the encoder batches the
            visible patches, so every sample must keep as many).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor of shape (batch, num_patches), got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor (True = removed patch), got dtype {mask.dtype}; "
            "convert with mask.bool() (e.g. a previous output's .mask)."
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"mask must have shape (batch, num_patches) = {(batch, length)}, got {tuple(mask.shape)}.")
    kept = (~mask).sum(dim=1)
    if batch and not torch.all(kept == kept[0]):
        raise ValueError(
            f"every sample of mask must keep the same number of patches (the encoder batches them); "
            f"kept counts per sample: {kept.tolist()}."
        )
    return int(kept[0]) if batch else length


def mask_to_noise(mask: torch.Tensor) -> torch.Tensor:
    """Noise whose `argsort` keeps exactly the False (visible) patches of a bool mask (B, L), in raster order.

    Kept patches get values in [0, 0.5), removed ones in [1, 1.5); the order inside each group is the patch index, so
    the result is deterministic.
    """
    length = mask.shape[1]
    ramp = torch.arange(length, device=mask.device, dtype=torch.float32) * (0.5 / max(length, 1))
    return mask.float() + ramp


def _removed_from_scores(scores: torch.Tensor, len_keep: int) -> torch.Tensor:
    """Bool mask (B, L) removing all but the `len_keep` patches with the smallest score of each row."""
    return masking_from_noise(scores, len_keep)[1].bool()


def _grid_and_kept(grid_size, mask_ratio: float) -> tuple[int, int, int]:
    gh, gw = pair(grid_size)
    if not all(isinstance(s, int) and s > 0 for s in (gh, gw)):
        raise ValueError(f"grid_size must be a positive int or a (height, width) pair of them, got {grid_size!r}.")
    check_mask_ratio(mask_ratio)  # the range only: a mask may keep no patch (the model refuses that itself)
    return gh, gw, num_kept(gh * gw, mask_ratio)


def block_mask(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    *,
    min_block_patches: int = 4,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> torch.Tensor:
    """BEiT-style block-wise masks: rectangles of random area and aspect ratio until the ratio is reached.

    As BEiT's `MaskingGenerator` (written anew, vectorised over the batch): each block has an area drawn uniformly
    between `min_block_patches` and the number of patches still to remove, an aspect ratio log-uniform in
    [`min_aspect`, 1 / `min_aspect`] and a uniform position; it is accepted if it removes at least one new patch and
    no more than are still to remove. A sample stops after `max_attempts` rejected blocks in a row. Near the end,
    blocks smaller than `min_block_patches` are allowed, and a sample that still falls short removes the missing
    patches among the neighbours of its blocks (then anywhere), so that every sample keeps exactly
    `int(L * (1 - mask_ratio))` patches.

    Args:
        batch_size (`int`): number of masks.
        grid_size (`int` or `(height, width)`): patches along each side.
        mask_ratio (`float`): fraction of patches removed, in [0, 1).
        generator (`torch.Generator`, *optional*): the source of every random draw (the global RNG if `None`).
        min_block_patches (`int`): smallest block area while more than that many patches remain to be removed.
        min_aspect (`float`): smallest height/width ratio of a block, in (0, 1].
        max_attempts (`int`): rejected blocks in a row after which a sample stops placing blocks.

    Returns:
        `torch.Tensor` of shape `(batch_size, height * width)`, bool, True for removed patches (raster order).
    """
    gh, gw, len_keep = _grid_and_kept(grid_size, mask_ratio)
    if not isinstance(min_block_patches, int) or min_block_patches < 1:
        raise ValueError(f"min_block_patches must be a positive integer, got {min_block_patches!r}.")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect!r}.")
    length, to_remove = gh * gw, gh * gw - len_keep
    rows = torch.arange(gh).view(1, gh, 1)
    cols = torch.arange(gw).view(1, 1, gw)
    mask = torch.zeros(batch_size, gh, gw, dtype=torch.bool)
    count = torch.zeros(batch_size, dtype=torch.long)
    failures = torch.zeros(batch_size, dtype=torch.long)
    log_aspect = math.log(min_aspect)
    while True:
        active = (count < to_remove) & (failures < max_attempts)
        if not active.any():
            break
        u = torch.rand(batch_size, 4, generator=generator, dtype=torch.float64)  # area, aspect, top, left
        remaining = (to_remove - count).double()
        low = remaining.clamp(max=min_block_patches)
        area = low + (remaining - low) * u[:, 0]
        aspect = torch.exp(log_aspect - 2 * log_aspect * u[:, 1])
        h = torch.round(torch.sqrt(area * aspect)).long().clamp(min=1)
        w = torch.round(torch.sqrt(area / aspect)).long().clamp(min=1)
        top = (u[:, 2] * (gh - h + 1).clamp(min=1)).long().view(-1, 1, 1)
        left = (u[:, 3] * (gw - w + 1).clamp(min=1)).long().view(-1, 1, 1)
        box = (rows >= top) & (rows < top + h.view(-1, 1, 1)) & (cols >= left) & (cols < left + w.view(-1, 1, 1))
        new = (box & ~mask).sum(dim=(1, 2))
        accept = active & (h <= gh) & (w <= gw) & (new > 0) & (new <= to_remove - count)
        mask |= box & accept.view(-1, 1, 1)
        count += torch.where(accept, new, 0)
        failures = torch.where(accept, 0, failures + active.long())
    # Exact count: blocks never overshoot; a shortfall is removed next to the blocks first (4-neighbours), then
    # anywhere, in a random order. Scores: block 2 + u, neighbour 1 + u, other u; the smallest are kept.
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    near = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    scores = mask.double() + (mask | near).double() + torch.rand(batch_size, gh, gw, generator=generator)
    return _removed_from_scores(scores.view(batch_size, length), len_keep)


def grid_mask(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Regular grid sampling (paper Table 1(f)): keep one patch of every s×s cell, at a random offset per sample.

    At the default `mask_ratio=0.75` the stride is s = 2 (one of every 2×2) and, on a grid with even sides, the
    lattice holds exactly the `int(L * (1 - mask_ratio))` patches to keep. Otherwise it is generalised so that the
    kept count is always exact: s = `isqrt(L // kept)` (3 at 0.9, 1 at 0.5 and below), and a lattice with more points
    than the kept count (odd sides, ratios between 1 - 1/s² and the next stride) drops a random subset of them; one
    with fewer (odd sides with an offset of 1) adds random other patches. Below 0.75 the stride is 1, i.e. the
    pattern is random masking: there is no regular grid that keeps more than a quarter.

    Args:
        batch_size (`int`): number of masks.
        grid_size (`int` or `(height, width)`): patches along each side.
        mask_ratio (`float`): fraction of patches removed, in [0, 1).
        generator (`torch.Generator`, *optional*): the source of the offsets and the tie-breaks.

    Returns:
        `torch.Tensor` of shape `(batch_size, height * width)`, bool, True for removed patches (raster order).
    """
    gh, gw, len_keep = _grid_and_kept(grid_size, mask_ratio)
    stride = math.isqrt(gh * gw // len_keep) if len_keep else 1
    offset = (torch.rand(batch_size, 2, generator=generator) * stride).long()  # (B, 2): row and column phase
    rows = torch.arange(gh).view(1, gh, 1)
    cols = torch.arange(gw).view(1, 1, gw)
    lattice = ((rows - offset[:, :1, None]) % stride == 0) & ((cols - offset[:, 1:, None]) % stride == 0)
    scores = (~lattice).float() + torch.rand(batch_size, gh, gw, generator=generator)  # lattice first, then random
    return _removed_from_scores(scores.view(batch_size, gh * gw), len_keep)


def sample_mask_noise(
    strategy: str,
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masking noise (B, L) for the model's `noise=` argument: its `argsort` keeps exactly the wanted patches.

    `"random"` returns exactly `torch.rand(batch_size, L, generator=generator)`, the noise of the official code (and
    of maekit's trainer before strategies existed); `"block"` and `"grid"` return `mask_to_noise` of `block_mask` /
    `grid_mask`. Pass the model the same `mask_ratio` (by default both use `config.mask_ratio`).

    Args:
        strategy (`str`): one of `MASK_STRATEGIES`: `"random"`, `"block"`, `"grid"`.
        batch_size (`int`): rows of noise (a whole global batch: slice it per process).
        grid_size (`int` or `(height, width)`): patches along each side (`config.grid_size`).
        mask_ratio (`float`): fraction of patches removed, in [0, 1).
        generator (`torch.Generator`, *optional*): the source of every draw (the global RNG if `None`).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_patches)`, float32, on the CPU.
    """
    gh, gw, _ = _grid_and_kept(grid_size, mask_ratio)
    if strategy == "random":
        return torch.rand(batch_size, gh * gw, generator=generator)
    if strategy == "block":
        return mask_to_noise(block_mask(batch_size, (gh, gw), mask_ratio, generator))
    if strategy == "grid":
        return mask_to_noise(grid_mask(batch_size, (gh, gw), mask_ratio, generator))
    raise ValueError(f"mask strategy must be one of {MASK_STRATEGIES}, got {strategy!r}.")


def sample_mask(
    strategy: str,
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool masks (B, L), True = removed, of a strategy: the mask the model makes from `sample_mask_noise`."""
    noise = sample_mask_noise(strategy, batch_size, grid_size, mask_ratio, generator)
    return masking_from_noise(noise, num_kept(noise.shape[1], mask_ratio))[1].bool()
