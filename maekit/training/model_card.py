"""The model card (README.md) written next to a pretrained model."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["write_model_card"]

TAGS = ["maekit", "mae", "masked-autoencoder", "self-supervised", "vision", "image-feature-extraction"]


def _value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_model_card(
    path: str | Path,
    *,
    config,
    hyperparameters: dict,
    results: dict,
    dataset_name: str | None = None,
    model_name: str = "mae",
    reconstruction_image: str | None = None,
    license: str | None = None,
) -> Path:
    """Write a Hub model card with YAML metadata (library_name, tags, datasets) and the training summary.

    Args:
        path (`str` or `Path`): the README.md to write.
        config (`MAEConfig`): the pretrained model's configuration.
        hyperparameters (`dict`): training hyper-parameters, shown as a table.
        results (`dict`): final metrics (e.g. `loss`, `eval_loss`, `global_step`), shown as a table.
        dataset_name (`str`, *optional*): dataset Hub id or name, listed under `datasets`.
        model_name (`str`): title of the card.
        reconstruction_image (`str`, *optional*): a PNG path relative to the card, embedded as the reconstructions.
        license (`str`, *optional*): license of the weights (it depends on the training data: none is claimed unless
            given).

    Returns:
        `Path`: the written file.
    """
    metadata = {"library_name": "maekit", "tags": TAGS, "pipeline_tag": "image-feature-extraction"}
    if license:
        metadata["license"] = license
    if dataset_name:
        metadata["datasets"] = [dataset_name]
    (height, width), (p, q) = config.image_hw, config.patch_hw
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {model_name}",
        "",
        "A Masked Autoencoder (He et al., 2021, [arXiv:2111.06377](https://arxiv.org/abs/2111.06377)) pretrained with "
        f"[maekit](https://github.com/maekit/maekit){f' on `{dataset_name}`' if dataset_name else ''}: a ViT encoder "
        f"(depth {config.num_hidden_layers}, width {config.hidden_size}) on {height}x{width} images in {p}x{q} "
        f"patches, trained to reconstruct {config.mask_ratio:.0%} removed patches"
        f"{' (per-patch normalized pixel targets)' if config.norm_pix_loss else ''}.",
        "",
        "## Usage",
        "",
        "```python",
        "from maekit import MAEForPreTraining, MAEModel",
        "",
        f'encoder = MAEModel.from_pretrained("{model_name}")  # features of all patches, no masking',
        f'mae = MAEForPreTraining.from_pretrained("{model_name}")  # encoder + decoder, for reconstructions',
        "```",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {key} | {_value(value)} |" for key, value in results.items()),
        "",
        "## Training hyper-parameters",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *(f"| {key} | {_value(value)} |" for key, value in hyperparameters.items()),
        "",
    ]
    if reconstruction_image:
        lines += [
            "## Reconstructions",
            "",
            "Columns: original, masked, reconstruction, reconstruction with the visible patches pasted back.",
            "",
            f"![Reconstructions]({reconstruction_image})",
            "",
        ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
