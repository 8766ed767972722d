"""Patch operations on the patch grid (no model): images to patch vectors and back, in the official (p, q, c)
order, and the fixed 2-D sin-cos position table of a grid."""

from __future__ import annotations

import torch

from .validation import pair

__all__ = ["patchify", "sincos_pos_embed_2d", "unpatchify"]


def patchify(pixel_values: torch.Tensor, patch_size) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*q*C), patches in row-major order, each vector ordered (p, q, c)."""
    p, q = pair(patch_size)
    b, c, h, w = pixel_values.shape
    if h % p or w % q:
        raise ValueError(f"pixel_values of size {h}x{w} is not divisible by patch_size {p}x{q}.")
    x = pixel_values.reshape(b, c, h // p, p, w // q, q)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // q), p * q * c)


def unpatchify(patches: torch.Tensor, patch_size, image_size, num_channels: int | None = None) -> torch.Tensor:
    """(B, L, p*q*C) -> (B, C, H, W); inverse of `patchify` for an image of `image_size` (int or (H, W))."""
    p, q = pair(patch_size)
    h, w = pair(image_size)
    if h % p or w % q:
        raise ValueError(f"image_size {h}x{w} is not divisible by patch_size {p}x{q}.")
    gh, gw = h // p, w // q
    b, length, dim = patches.shape
    c = num_channels if num_channels is not None else dim // (p * q)
    if length != gh * gw or dim != p * q * c:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit image_size {h}x{w} with patch_size {p}x{q} and "
            f"{c} channels (expected ({b}, {gh * gw}, {p * q * c}))."
        )
    x = patches.reshape(b, gh, gw, p, q, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h, w)


def sincos_pos_embed_2d(embed_dim: int, grid_size, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position table in the official MAE layout, shape (1, [1 +] gh * gw, embed_dim).

    Each row is [sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)] with ω_i = 10000^(-i / (D/4)); rows are in row-major patch
    order; the cls row (if any) is zeros. Computed in float64 as the official numpy code, returned as float32.
    """
    gh, gw = pair(grid_size)
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    hh, ww = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    out_w = ww.reshape(-1, 1) * omega  # (gh*gw, D/4)
    out_h = hh.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)
