"""Reconstruction grids: original / masked / reconstruction / reconstruction + visible patches, as one PNG."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .configuration_mae import MAEConfig
from .image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .patches import patchify, unpatchify

__all__ = ["reconstruction_images", "reconstruction_grid", "visualize_reconstructions"]

COLUMNS = ("original", "masked", "reconstruction", "reconstruction_visible")


def reconstruction_images(
    pixel_values: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    config: MAEConfig,
    *,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> dict[str, torch.Tensor]:
    """Turn a pretraining forward into displayable images.

    With `config.norm_pix_loss` the model predicts per-patch normalized pixels; they are mapped back with the mean and
    standard deviation of the corresponding original patch (as the loss normalizes them), so the reconstruction shows
    structure, not true absolute colours, for removed patches.

    Args:
        pixel_values (`torch.Tensor` of shape `(B, C, H, W)`): the normalized model inputs.
        logits (`torch.Tensor` of shape `(B, L, p*q*C)`): `MAEForPreTrainingOutput.logits`.
        mask (`torch.Tensor` of shape `(B, L)`): `MAEForPreTrainingOutput.mask`, 1 for removed patches.
        config (`MAEConfig`): the model configuration (patch size, channels, `norm_pix_loss`).
        image_mean, image_std (`Sequence[float]`): the normalization of `pixel_values`, undone for display.

    Returns:
        `dict[str, torch.Tensor]`: `"original"`, `"masked"` (removed patches gray), `"reconstruction"` and
        `"reconstruction_visible"` (reconstruction with the visible patches pasted back), each `(B, C, H, W)` in
        [0, 1] on the CPU.
    """
    channels = pixel_values.shape[1]
    mean, std = _channel_stats(image_mean, channels, "image_mean"), _channel_stats(image_std, channels, "image_std")
    pixel_values, logits, mask = pixel_values.detach().float().cpu(), logits.detach().float().cpu(), mask.float().cpu()
    pred = logits
    if config.norm_pix_loss:
        target = patchify(pixel_values, config.patch_hw)
        patch_mean, patch_var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (patch_var + 1.0e-6) ** 0.5 + patch_mean
    size = pixel_values.shape[-2:]
    reconstruction = unpatchify(pred, config.patch_hw, size, channels)
    # (B, L) -> (B, L, p*q*C) -> (B, C, H, W): 1 on removed pixels
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand_as(pred), config.patch_hw, size, channels)

    def denormalize(x: torch.Tensor) -> torch.Tensor:
        return (x * std + mean).clamp(0.0, 1.0)

    original = denormalize(pixel_values)
    return {
        "original": original,
        "masked": original * (1 - pixel_mask) + 0.5 * pixel_mask,
        "reconstruction": denormalize(reconstruction),
        "reconstruction_visible": denormalize(pixel_values * (1 - pixel_mask) + reconstruction * pixel_mask),
    }


def reconstruction_grid(
    pixel_values: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    config: MAEConfig,
    *,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    min_tile_size: int = 96,
    padding: int = 2,
) -> Image.Image:
    """One RGB image: a row per input, columns original / masked / reconstruction / reconstruction + visible.

    Small images are enlarged by an integer factor (nearest neighbour, patches stay sharp) to at least
    `min_tile_size` pixels. Arguments as `reconstruction_images`. Save it with `grid.save("reconstruction.png")`.
    """
    images = reconstruction_images(pixel_values, logits, mask, config, image_mean=image_mean, image_std=image_std)
    b, c, h, w = images["original"].shape
    scale = max(1, math.ceil(min_tile_size / min(h, w)))
    th, tw = h * scale, w * scale
    canvas = np.full((b * th + (b + 1) * padding, 4 * tw + 5 * padding, 3), 255, dtype=np.uint8)
    for column, name in enumerate(COLUMNS):
        tiles = images[name].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        tiles = (tiles * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, th, tw, C)
        if c != 3:  # gray (or any other channel count): show the first channel in gray
            tiles = np.repeat(tiles[..., :1], 3, axis=-1)
        for row in range(b):
            top, left = padding + row * (th + padding), padding + column * (tw + padding)
            canvas[top : top + th, left : left + tw] = tiles[row, ..., :3]
    return Image.fromarray(canvas)


def visualize_reconstructions(
    model,
    pixel_values: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    mask_ratio: float | None = None,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Image.Image:
    """Run `model` (a `MAEForPreTraining`) on `pixel_values` and return its `reconstruction_grid`.

    Example:

    ```python
    import torch
    from maekit import MAEConfig, MAEForPreTraining
    from maekit.visualize import visualize_reconstructions

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=32, patch_size=8)
    grid = visualize_reconstructions(MAEForPreTraining(config), torch.randn(2, 3, 32, 32))
    assert grid.size == (4 * 96 + 5 * 2, 2 * 96 + 3 * 2)
    ```
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixel_values, noise=noise, mask_ratio=mask_ratio)
    model.train(was_training)
    return reconstruction_grid(
        pixel_values, out.logits, out.mask, model.config, image_mean=image_mean, image_std=image_std
    )


def _channel_stats(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels.")
    return torch.tensor(values).view(1, channels, 1, 1)
