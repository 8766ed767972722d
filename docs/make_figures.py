"""Draw the figures of docs/model.md: the masking strategies, and honest vs oracle reconstructions.

    PYTHONPATH=. python docs/make_figures.py                      # trains the small model (2000 steps), draws
    PYTHONPATH=. python docs/make_figures.py --model-dir /tmp/mae  # reuses (or writes) the trained model there

The reconstruction figures need a model that has learned something from real images: a small MAE (width 128, depth
4, patch 8 on 64x64 images, `norm_pix_loss`) is trained by hand, with `MAEForPreTraining` and AdamW, on random crops
of the photos bundled with scikit-image, and shown photos it was not trained on (`chelsea`, `coffee`). Needs
scikit-image (`pip install maekit[data]`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from maekit import MAEConfig, MAEForPreTraining, patchify
from maekit.masking import MASK_STRATEGIES, sample_mask
from maekit.targets import patch_statistics
from maekit.visualize import visible_patch_statistics, visualize_reconstructions

IMAGES = Path(__file__).resolve().parent / "images"
TRAIN_PHOTOS = ("astronaut", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel", "camera",
                "brick", "grass", "gravel", "coins", "moon", "page", "text")  # fmt: skip
HELD_OUT = ("chelsea", "coffee")
MEAN, STD = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def photo(name: str, short_side: int) -> torch.Tensor:
    """A scikit-image photo as a (3, H, W) float tensor in [0, 1], resized so that its short side is `short_side`."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255
    scale = short_side / min(image.shape[1:])
    size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def random_crops(photos: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """`count` normalized (3, size, size) crops: a random photo, square side in [size, 3 * size], random flip."""
    crops = []
    for _ in range(count):
        image = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        side = int(torch.randint(size, min(3 * size, *image.shape[1:]) + 1, (1,), generator=generator))
        top = int(torch.randint(image.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - side + 1, (1,), generator=generator))
        crop = image[:, top : top + side, left : left + side]
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=generator) < 0.5:
            crop = crop.flip(-1)
        crops.append((crop - MEAN) / STD)
    return torch.stack(crops)


def train(steps: int, batch_size: int, seed: int) -> MAEForPreTraining:
    """A small `norm_pix_loss` MAE trained on random crops of the bundled photos (AdamW, warmup + cosine)."""
    torch.manual_seed(seed)
    config = MAEConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                       decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                       decoder_intermediate_size=512, image_size=64, patch_size=8, norm_pix_loss=True)  # fmt: skip
    model = MAEForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, steps // 20)
    photos = [photo(name, 192) for name in TRAIN_PHOTOS]
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / steps))
        for group in optimizer.param_groups:
            group["lr"] = 1.5e-3 * factor
        loss = model(random_crops(photos, batch_size, 64, generator)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def label_row(image: Image.Image, labels: list[str], tile: int, padding: int) -> Image.Image:
    """`image` with a row of one-line labels above its columns."""
    out = Image.new("RGB", (image.width, image.height + 16), "white")
    out.paste(image, (0, 16))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for column, text in enumerate(labels):
        draw.text((padding + column * (tile + padding) + 1, 2), text, fill=(0, 0, 0), font=font)
    return out


def strategies_figure(path: Path, seed: int) -> None:
    """One photo (224x224, 16-pixel patches: a 14x14 grid) under each strategy at 75%, and block/grid at 50%/90%."""
    image = photo("astronaut", 224)[:, :224, :224]
    patch, grid = 16, (14, 14)
    panels = [(strategy, 0.75) for strategy in MASK_STRATEGIES] + [("block", 0.5), ("grid", 0.9)]
    tiles, labels = [], []
    for strategy, ratio in panels:
        mask = sample_mask(strategy, 1, grid, ratio, torch.Generator().manual_seed(seed))[0].view(grid)
        pixel_mask = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).float()
        tiles.append(image * (1 - pixel_mask) + 0.5 * pixel_mask)
        labels.append(f"{strategy} {ratio:.0%}")
    padding = 4
    canvas = np.full((224 + 2 * padding, len(tiles) * (224 + padding) + padding, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        left = padding + i * (224 + padding)
        canvas[padding : padding + 224, left : left + 224] = (tile.permute(1, 2, 0) * 255).round().byte().numpy()
    label_row(Image.fromarray(canvas), labels, 224, padding).save(path)


def reconstructions_figure(model: MAEForPreTraining, folder: Path, seed: int) -> None:
    """Held-out photos (64x64 crops): the honest and the oracle rendering of the same forward, side by side."""
    crops = []
    for name in HELD_OUT:
        image = photo(name, 128)
        crops += [image[:, :64, 32:96], image[:, 64:128, 64:128]]
    pixel_values = (torch.stack(crops) - MEAN) / STD
    grids = {
        rendering: visualize_reconstructions(model, pixel_values, seed=seed, unnormalize=rendering, mask_strategy=None)
        for rendering in ("honest", "oracle")
    }
    both = Image.new("RGB", (2 * grids["honest"].width + 12, grids["honest"].height), "white")
    both.paste(grids["honest"], (0, 0))
    both.paste(grids["oracle"], (grids["honest"].width + 12, 0))
    both.save(folder / "reconstructions_honest_vs_oracle.png")


def compare_renderings(model: MAEForPreTraining, seed: int, count: int = 256) -> None:
    """Print how well each way of estimating a removed patch's mean/std from visible patches does, on held-out crops.

    Columns: the mean absolute error of the estimated mean and standard deviation of removed patches (in normalized
    pixel units), and the MSE of the un-normalized reconstruction of removed patches against the true pixels; the
    oracle (true statistics) as the bound.
    """
    photos = [photo(name, 192) for name in HELD_OUT]
    pixel_values = random_crops(photos, count, 64, torch.Generator().manual_seed(seed + 1))
    noise = torch.rand(count, model.config.num_patches, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        out = model(pixel_values, noise=noise)
    patches, removed = patchify(pixel_values, model.config.patch_hw), out.mask.bool()
    true_mean, true_std = patch_statistics(patches)
    print(f"un-normalizing removed patches, {count} held-out crops of {', '.join(HELD_OUT)}:")
    print("| statistics from | mean abs. err. of mean | of std | reconstruction MSE (removed patches) |")
    print("|---|---|---|---|")
    for label, sigma in [(f"visible, sigma {s:g}", s) for s in (0.5, 1.0, 2.0, 3.0)] + [("all visible", math.inf)]:
        mean, std = visible_patch_statistics(patches, out.mask, model.config.grid_size, sigma)
        mse = ((out.logits * std + mean - patches) ** 2).mean(-1)[removed].mean()
        print(f"| {label} | {(mean - true_mean)[removed].abs().mean():.3f} | "
              f"{(std - true_std)[removed].abs().mean():.3f} | {mse:.3f} |")  # fmt: skip
    mse = ((out.logits * true_std + true_mean - patches) ** 2).mean(-1)[removed].mean()
    print(f"| oracle (true statistics) | 0 | 0 | {mse:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="load the trained model from here if present, else save it")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(IMAGES), help="folder for the PNGs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    strategies_figure(output / "mask_strategies.png", args.seed)
    if args.model_dir and (Path(args.model_dir) / "config.json").is_file():
        model = MAEForPreTraining.from_pretrained(args.model_dir).eval()
    else:
        model = train(args.steps, args.batch_size, args.seed)
        if args.model_dir:
            model.save_pretrained(args.model_dir)
    reconstructions_figure(model, output, args.seed)
    compare_renderings(model, args.seed)
    print(f"figures written to {output}")


if __name__ == "__main__":
    main()
