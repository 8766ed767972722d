"""What the decoder regresses for each patch (`MAEConfig.target`): pixels, per-patch normalized pixels, or HOG.

`"pixel"` and `"norm_pixel"` are the paper's (Table 1(d)); `"hog"` is MaskFeat's (Wei et al., 2022) histograms of
oriented gradients. The pixel layouts (`patchify`) live in `maekit.modeling_mae`; this module holds the per-patch
normalization shared by the loss and the reconstruction figures, and the HOG features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .configuration_mae import MAEConfig
from .validation import pair

__all__ = ["HOG_BINS", "hog_targets", "normalize_patches", "patch_statistics", "target_dim"]

HOG_BINS = 9  # unsigned orientations, 20 degrees each (MaskFeat, Dalal & Triggs)
_HOG_CELLS = 2  # cells per patch side: MaskFeat's 8-pixel cells in 16-pixel patches


def target_dim(config: MAEConfig) -> int:
    """Length of one patch's target vector: p·q·C for pixel targets, 2·2·C·9 for HOG."""
    if config.target == "hog":
        return _HOG_CELLS * _HOG_CELLS * config.num_channels * HOG_BINS
    return config.patch_dim


def patch_statistics(patches: torch.Tensor, eps: float = 1.0e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each patch vector (B, L, D) -> (B, L, 1) each, as `norm_pix_loss` uses them:
    the unbiased variance, plus `eps` before the square root (the official code)."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps) ** 0.5


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """The `"norm_pixel"` target: every patch vector (B, L, D) shifted and scaled to mean 0, variance 1."""
    mean, std = patch_statistics(patches)
    return (patches - mean) / std


def _gaussian_window(size: int, std: float, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device)
    return torch.exp(-0.5 * ((x - x.mean()) / std) ** 2)


@torch.no_grad()
def hog_targets(pixel_values: torch.Tensor, patch_size) -> torch.Tensor:
    """MaskFeat's HOG target of every patch: (B, C, H, W) -> (B, L, 2·2·C·9).

    Per channel: Sobel gradients (reflect padding), each pixel's gradient magnitude weighted by a Gaussian centred
    on its patch (std half the patch side, as MaskFeat's 16-pixel window of std 8) and added to one of 9 unsigned
    orientation bins; the histograms are summed over 2×2 cells per patch and each is L2-normalized. A patch vector is
    ordered (cell row, cell column, channel, bin). Computed in float32 (float64 stays float64), without gradients.
    """
    p, q = pair(patch_size)
    b, c, h, w = pixel_values.shape
    if p % _HOG_CELLS or q % _HOG_CELLS or h % p or w % q:
        raise ValueError(f"HOG targets need even patch sides dividing the image; got {h}x{w} with patch {p}x{q}.")
    dtype = torch.promote_types(pixel_values.dtype, torch.float32)
    x = F.pad(pixel_values.to(dtype), (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
    # Sobel [[1, 0, -1], [2, 0, -2], [1, 0, -1]] (and its transpose) as MaskFeat's cross-correlation, written as
    # differences so that a mirrored border gives an exact 0, not a rounding residue whose sign flips the bin.
    dx = x[..., :, :-2] - x[..., :, 2:]  # (B, C, H + 2, W)
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]  # (B, C, H, W)
    dy = x[..., :-2, :] - x[..., 2:, :]  # (B, C, H, W + 2)
    gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
    # Orientation modulo pi (unsigned): theta and theta + pi fall in the same bin.
    bins = torch.floor(torch.atan2(gx, gy) / math.pi * HOG_BINS).long() % HOG_BINS
    window = torch.outer(_gaussian_window(p, p / 2, dtype, x.device), _gaussian_window(q, q / 2, dtype, x.device))
    magnitude = torch.hypot(gx, gy) * window.repeat(h // p, w // q)
    # One histogram per (cell, channel): flat index bin * cells + cell, summed by scatter_add.
    ch, cw = p // _HOG_CELLS, q // _HOG_CELLS
    cell_rows, cell_cols = h // ch, w // cw
    cell = (torch.arange(h, device=x.device) // ch).view(h, 1) * cell_cols + torch.arange(w, device=x.device) // cw
    index = (bins * (cell_rows * cell_cols) + cell).flatten(2)  # (B, C, H*W)
    hist = torch.zeros(b, c, HOG_BINS * cell_rows * cell_cols, dtype=dtype, device=x.device)
    hist.scatter_add_(2, index, magnitude.flatten(2))
    hist = F.normalize(hist.view(b, c, HOG_BINS, cell_rows, cell_cols), dim=2)
    # (B, C, bins, gh, 2, gw, 2) -> (B, gh, gw, 2, 2, C, bins) -> (B, L, 2*2*C*bins)
    gh, gw = h // p, w // q
    hist = hist.view(b, c, HOG_BINS, gh, _HOG_CELLS, gw, _HOG_CELLS).permute(0, 3, 5, 4, 6, 1, 2)
    return hist.reshape(b, gh * gw, -1)
