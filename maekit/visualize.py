"""Reconstruction grids: original / masked / reconstruction / reconstruction + visible patches, as one PNG.

With a `"norm_pixel"` target the model predicts every patch up to its own mean and standard deviation, which the
visible input does not contain for removed patches. The usual figures (the official notebook, transformers' demos) put
back each removed patch's TRUE statistics: they show the model's structure on top of colours and contrast taken from
the answer. maekit calls that rendering `"oracle"` and defaults to an `"honest"` one that uses visible information
only: a removed patch gets the statistics of the visible patches around it (Gaussian-weighted by distance on the patch
grid). Every grid says in its header row which rendering it shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .configuration_mae import MAEConfig
from .image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .masking import sample_mask_noise
from .patches import patchify, unpatchify
from .targets import patch_statistics

__all__ = [
    "UNNORMALIZE",
    "reconstruction_images",
    "reconstruction_grid",
    "visible_patch_statistics",
    "visualize_reconstructions",
]

COLUMNS = ("original", "masked", "reconstruction", "reconstruction_visible")
UNNORMALIZE = ("honest", "oracle")
HEADER_HEIGHT = 28  # two lines of PIL's default font
# Width (in patches) of the Gaussian that weights visible patches by their distance to a removed one. Chosen by
# looking at reconstructions of a model trained on photos (docs/make_figures.py): 1 follows local brightness and
# contrast; much wider tends to the image-wide statistics, which wash out dark or bright regions.
_HONEST_SIGMA = 1.0


def visible_patch_statistics(
    patches: torch.Tensor, mask: torch.Tensor, grid_size: tuple[int, int], sigma: float = _HONEST_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and standard deviation (as `norm_pix_loss` computes them) estimated from visible patches only.

    A visible patch keeps its own statistics; a removed patch gets the average of the visible patches' statistics,
    weighted by `exp(-d² / (2 sigma²))` with `d` the distance on the patch grid. Without any visible patch, mean 0
    and standard deviation 1 (the normalized data's). Nothing read from a removed patch enters the result.

    Args:
        patches (`torch.Tensor` of shape `(B, L, D)`): patchified images (`patchify`).
        mask (`torch.Tensor` of shape `(B, L)`): 1 (or True) for removed patches.
        grid_size (`(height, width)`): the patch grid, `height * width == L`.
        sigma (`float`): width of the distance weighting, in patches.

    Returns:
        `(mean, std)`, each of shape `(B, L, 1)`.
    """
    gh, gw = grid_size
    keep = ~mask.bool()  # (B, L)
    visible = keep.to(patches.dtype)
    mean, std = patch_statistics(patches)
    # Removed patches' statistics are replaced by 0 before any arithmetic: they cannot leak, not even as NaN or inf.
    mean, std = torch.where(keep, mean.squeeze(-1), 0.0), torch.where(keep, std.squeeze(-1), 0.0)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).to(patches.dtype)  # (L, 2)
    weights = torch.exp(-(torch.cdist(coords, coords) ** 2) / (2 * sigma**2))  # (L, L), symmetric
    total = visible @ weights  # (B, L): weight of the visible patches seen from each patch
    has_visible = total > 0
    estimate_mean = torch.where(has_visible, (mean @ weights) / total.clamp(min=1e-30), 0.0)
    estimate_std = torch.where(has_visible, (std @ weights) / total.clamp(min=1e-30), 1.0)
    mean, std = torch.where(keep, mean, estimate_mean), torch.where(keep, std, estimate_std)
    return mean.unsqueeze(-1), std.unsqueeze(-1)


def reconstruction_images(
    pixel_values: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    config: MAEConfig,
    *,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    unnormalize: str = "honest",
) -> dict[str, torch.Tensor]:
    """Turn a pretraining forward into displayable images.

    With a `"norm_pixel"` target (`norm_pix_loss`) the model predicts per-patch normalized pixels, mapped back here
    with a mean and standard deviation per patch: `unnormalize="honest"` estimates them for removed patches from the
    visible ones (`visible_patch_statistics`); `"oracle"` uses each removed patch's true statistics, read from the
    original image, i.e. from the answer (what the official demo and most MAE figures show). With a `"pixel"` target
    both are the same. A `"hog"` target predicts no pixels: only `"original"` and `"masked"` are returned.

    Args:
        pixel_values (`torch.Tensor` of shape `(B, C, H, W)`): the normalized model inputs.
        logits (`torch.Tensor` of shape `(B, L, p*q*C)`): `MAEForPreTrainingOutput.logits`.
        mask (`torch.Tensor` of shape `(B, L)`): `MAEForPreTrainingOutput.mask`, 1 for removed patches.
        config (`MAEConfig`): the model configuration (patch size, channels, `target`).
        image_mean, image_std (`Sequence[float]`): the normalization of `pixel_values`, undone for display.
        unnormalize (`str`): `"honest"` (default) or `"oracle"`, see above.

    Returns:
        `dict[str, torch.Tensor]`: `"original"`, `"masked"` (removed patches gray), `"reconstruction"` and
        `"reconstruction_visible"` (reconstruction with the visible patches pasted back), each `(B, C, H, W)` in
        [0, 1] on the CPU.
    """
    if unnormalize not in UNNORMALIZE:
        raise ValueError(f"unnormalize must be one of {UNNORMALIZE}, got {unnormalize!r}.")
    channels = pixel_values.shape[1]
    mean, std = _channel_stats(image_mean, channels, "image_mean"), _channel_stats(image_std, channels, "image_std")
    pixel_values, mask = pixel_values.detach().float().cpu(), mask.detach().float().cpu()
    size = pixel_values.shape[-2:]
    patch_hw = config.patch_hw
    # (B, L) -> (B, L, p*q*C) -> (B, C, H, W): 1 on removed pixels
    patch_dim = patch_hw[0] * patch_hw[1] * channels
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(*mask.shape, patch_dim), patch_hw, size, channels)

    def denormalize(x: torch.Tensor) -> torch.Tensor:
        return (x * std + mean).clamp(0.0, 1.0)

    original = denormalize(pixel_values)
    images = {"original": original, "masked": original * (1 - pixel_mask) + 0.5 * pixel_mask}
    if config.target == "hog":
        return images
    pred = logits.detach().float().cpu()
    if config.target == "norm_pixel":
        patches = patchify(pixel_values, patch_hw)
        if unnormalize == "oracle":
            patch_mean, patch_std = patch_statistics(patches)
        else:
            grid = (size[0] // patch_hw[0], size[1] // patch_hw[1])
            patch_mean, patch_std = visible_patch_statistics(patches, mask, grid)
        pred = pred * patch_std + patch_mean
    reconstruction = unpatchify(pred, patch_hw, size, channels)
    images["reconstruction"] = denormalize(reconstruction)
    images["reconstruction_visible"] = denormalize(pixel_values * (1 - pixel_mask) + reconstruction * pixel_mask)
    return images


def _header_labels(config: MAEConfig, mask: torch.Tensor, unnormalize: str) -> list[tuple[str, str]]:
    """Two lines of text per column, naming what it shows."""
    removed = mask.float().mean().item()
    if config.target == "hog":
        return [("original", ""), ("masked", f"{removed:.0%} removed"), ("no pixel output:", "HOG target")]
    if config.target == "pixel":
        rendering = "pixel target"
    else:
        rendering = "honest: visible stats" if unnormalize == "honest" else "ORACLE: true stats"
    return [
        ("original", ""),
        ("masked", f"{removed:.0%} removed"),
        ("reconstruction", rendering),
        ("+ visible patches", rendering),
    ]


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
    unnormalize: str = "honest",
    header: bool = True,
) -> Image.Image:
    """One RGB image: a row per input, columns original / masked / reconstruction / reconstruction + visible.

    Small images are enlarged by an integer factor (nearest neighbour, patches stay sharp) to at least
    `min_tile_size` pixels. With `header` (default) a first row of text names each column and the rendering
    (`"honest"` or `"ORACLE"` statistics for a `"norm_pixel"` target, see `reconstruction_images`); it is
    `HEADER_HEIGHT` pixels tall. A `"hog"` target shows the first two columns only. Other arguments as
    `reconstruction_images`. Save it with `grid.save("reconstruction.png")`.
    """
    images = reconstruction_images(
        pixel_values, logits, mask, config, image_mean=image_mean, image_std=image_std, unnormalize=unnormalize
    )
    columns = [name for name in COLUMNS if name in images]
    b, c, h, w = images["original"].shape
    scale = max(1, math.ceil(min_tile_size / min(h, w)))
    th, tw = h * scale, w * scale
    top0 = HEADER_HEIGHT if header else 0
    width = (1 if config.target == "hog" and header else 0) + len(columns)  # room for the "no pixels" note
    canvas = np.full((top0 + b * th + (b + 1) * padding, width * tw + (width + 1) * padding, 3), 255, np.uint8)
    for column, name in enumerate(columns):
        tiles = images[name].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        tiles = (tiles * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, th, tw, C)
        if c != 3:  # gray (or any other channel count): show the first channel in gray
            tiles = np.repeat(tiles[..., :1], 3, axis=-1)
        for row in range(b):
            top, left = top0 + padding + row * (th + padding), padding + column * (tw + padding)
            canvas[top : top + th, left : left + tw] = tiles[row, ..., :3]
    image = Image.fromarray(canvas)
    if header:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default()
        for column, lines in enumerate(_header_labels(config, mask, unnormalize)):
            left = padding + column * (tw + padding)
            for line_index, line in enumerate(lines):
                draw.text((left + 1, 2 + 13 * line_index), line, fill=(0, 0, 0), font=font)
    return image


def visualize_reconstructions(
    model,
    pixel_values: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    mask_ratio: float | None = None,
    image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    mask: torch.Tensor | None = None,
    mask_strategy: str | None = None,
    seed: int | None = None,
    unnormalize: str = "honest",
) -> Image.Image:
    """Run `model` (a `MAEForPreTraining`) on `pixel_values` and return its `reconstruction_grid`.

    The mask: `noise` or `mask` when given (see `MAEForPreTraining.forward`); otherwise one of `mask_strategy`
    (default `config.mask_strategy`) at `mask_ratio` (default `config.mask_ratio`), drawn from
    `torch.Generator().manual_seed(seed)` when `seed` is given (the same figure every time), else from the global RNG.

    Example:

    ```python
    import torch
    from maekit import MAEConfig, MAEForPreTraining
    from maekit.visualize import HEADER_HEIGHT, visualize_reconstructions

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=32, patch_size=8, norm_pix_loss=True)
    model = MAEForPreTraining(config)
    grid = visualize_reconstructions(model, torch.randn(2, 3, 32, 32), mask_strategy="block", seed=0)
    assert grid.size == (4 * 96 + 5 * 2, HEADER_HEIGHT + 2 * 96 + 3 * 2)
    oracle = visualize_reconstructions(model, torch.randn(2, 3, 32, 32), seed=0, unnormalize="oracle")
    ```
    """
    if unnormalize not in UNNORMALIZE:  # before running the model
        raise ValueError(f"unnormalize must be one of {UNNORMALIZE}, got {unnormalize!r}.")
    config = model.config
    if noise is None and mask is None:
        ratio = config.mask_ratio if mask_ratio is None else mask_ratio
        p, q = config.patch_hw
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // q)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        noise = sample_mask_noise(mask_strategy or config.mask_strategy, pixel_values.shape[0], grid, ratio, generator)
        noise = noise.to(pixel_values.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixel_values, noise=noise, mask=mask, mask_ratio=mask_ratio)
    model.train(was_training)
    return reconstruction_grid(
        pixel_values,
        out.logits,
        out.mask,
        config,
        image_mean=image_mean,
        image_std=image_std,
        unnormalize=unnormalize,
    )


def _channel_stats(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels.")
    return torch.tensor(values).view(1, channels, 1, 1)
