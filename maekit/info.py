"""What a model is: architecture, patch grid, parameter counts and FLOPs per image (`maekit info`).

FLOPs follow `torch.utils.flop_counter.FlopCounterMode` (the accounting of docs/performance.md): 2 FLOPs per
multiply-add, matmul-like operations only (linear layers, the patch projection, attention scores and weighted sum);
norms, activations, softmax and the optimizer are not counted, as usual for MFU. For one pre-norm block on `n` tokens
of width `d` with MLP width `m`: `2·n·d·3d` (qkv) + `4·n²·d` (scores and weighted sum) + `2·n·d²` (projection) +
`4·n·d·m` (MLP). A train step adds the backward pass: twice the forward for every linear layer, once for the patch
projection (pixels need no gradient), and 2.5 times the forward for the attention core (flash attention recomputes
the scores), as torch's counter counts `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .configuration_mae import MAEConfig, check_mask_ratio, num_kept
from .modeling_mae import MAEForImageClassification
from .validation import pair

__all__ = ["FlopCounts", "ModelInfo", "flops_per_image", "model_info", "parameter_counts"]


@dataclass
class FlopCounts:
    """FLOPs per image, by where they are spent.

    Args:
        pretraining_forward (`int`): `MAEForPreTraining` forward at the mask ratio (encoder on visible patches,
            decoder on all).
        pretraining_step (`int`): forward + backward of the pretraining step.
        inference (`int`): `MAEModel` forward on all patches, no masking (features for downstream use); plus the
            head for a classifier.
        encoder_pretraining, decoder (`int`): the two parts of `pretraining_forward` (patch projection in the encoder).
    """

    pretraining_forward: int
    pretraining_step: int
    inference: int
    encoder_pretraining: int
    decoder: int


def _block(n: int, d: int, m: int) -> tuple[int, int]:
    """(linear FLOPs, attention-core FLOPs) of one pre-norm block on n tokens of width d, MLP width m."""
    return 2 * n * d * 3 * d + 2 * n * d * d + 4 * n * d * m, 4 * n * n * d


def flops_per_image(
    config: MAEConfig,
    image_size: int | tuple[int, int] | None = None,
    mask_ratio: float | None = None,
    num_labels: int = 0,
) -> FlopCounts:
    """FLOPs per image of pretraining and inference, from the configuration alone (no model is built).

    Args:
        config (`MAEConfig`): the model configuration.
        image_size (`int` or `(height, width)`, *optional*): input resolution; defaults to `config.image_size`.
        mask_ratio (`float`, *optional*): defaults to `config.mask_ratio`.
        num_labels (`int`): classes of a classification head added to `inference` (0: features only).

    Returns:
        `FlopCounts`.

    Example:

    ```python
    from maekit import MAEConfig
    from maekit.info import flops_per_image

    flops = flops_per_image(MAEConfig.from_preset("vit-base-patch16"))
    assert round(flops.inference / 1e9, 1) == 35.1  # ViT-B/16 at 224x224, all 196 patches
    ```
    """
    (h, w), (p, q) = pair(image_size) if image_size is not None else config.image_hw, config.patch_hw
    if h % p or w % q:
        raise ValueError(f"image_size {h}x{w} is not divisible by patch_size {p}x{q}.")
    mask_ratio = config.mask_ratio if mask_ratio is None else mask_ratio
    length = (h // p) * (w // q)
    kept = num_kept(length, mask_ratio)
    width, dec_width, pixels = config.hidden_size, config.decoder_hidden_size, config.patch_dim

    def encoder(tokens: int) -> tuple[int, int, int]:
        linear, attention = _block(1 + tokens, width, config.intermediate_size)
        return 2 * tokens * pixels * width, config.num_hidden_layers * linear, config.num_hidden_layers * attention

    embed, enc_linear, enc_attention = encoder(kept)
    dec_block_linear, dec_block_attention = _block(1 + length, dec_width, config.decoder_intermediate_size)
    dec_linear = (
        2 * (1 + kept) * width * dec_width
        + config.decoder_num_hidden_layers * dec_block_linear
        + 2 * (1 + length) * dec_width * pixels
    )
    dec_attention = config.decoder_num_hidden_layers * dec_block_attention
    linear, attention = enc_linear + dec_linear, enc_attention + dec_attention
    forward = embed + linear + attention
    step = forward + embed + 2 * linear + int(2.5 * attention)
    inf_embed, inf_linear, inf_attention = encoder(length)
    return FlopCounts(
        pretraining_forward=forward,
        pretraining_step=step,
        inference=inf_embed + inf_linear + inf_attention + 2 * width * num_labels,
        encoder_pretraining=embed + enc_linear + enc_attention,
        decoder=dec_linear + dec_attention,
    )


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of `model` by part: `encoder`, `decoder`, `head` (classifier head and `fc_norm`) and `total`.

    Shared parameters are counted once; buffers (the fixed sin-cos position tables) are not parameters.
    """
    counts = {"encoder": 0, "decoder": 0, "head": 0}
    for name, parameter in model.named_parameters():
        part = "decoder" if name.startswith("decoder.") else "head" if name.startswith(("head.", "fc_norm.")) else None
        counts[part or "encoder"] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


@dataclass
class ModelInfo:
    """Everything `maekit info` prints; `asdict(info)` is its `--json` form.

    Args:
        name (`str`): what was asked for (preset, folder or Hub id).
        architecture (`str`): the maekit class the checkpoint loads as.
        config (`dict`): the configuration fields that define the architecture.
        grid (`tuple[int, int]`): patches along (height, width) at `image_size`.
        image_size (`tuple[int, int]`): the resolution the numbers are for.
        parameters (`dict[str, int]`): `parameter_counts` of the architecture.
        flops (`FlopCounts`): FLOPs per image at `image_size`.
    """

    name: str
    architecture: str
    config: dict
    grid: tuple[int, int]
    image_size: tuple[int, int]
    parameters: dict[str, int]
    flops: FlopCounts

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Human-readable summary, one fact per line."""
        c, (gh, gw), (h, w) = self.config, self.grid, self.image_size
        p, q = pair(c["patch_size"])
        kept = num_kept(gh * gw, c["mask_ratio"])
        params, flops = self.parameters, self.flops
        lines = [
            f"model          {self.name}",
            f"architecture   {self.architecture}",
            f"encoder        {c['num_hidden_layers']} blocks, width {c['hidden_size']}, {c['num_attention_heads']} heads, "
            f"MLP {c['intermediate_size']}, {c['hidden_act']}, LayerNorm eps {c['layer_norm_eps']:g}",
        ]
        if self.architecture == "MAEForPreTraining":
            lines.append(
                f"decoder        {c['decoder_num_hidden_layers']} blocks, width {c['decoder_hidden_size']}, "
                f"{c['decoder_num_attention_heads']} heads, MLP {c['decoder_intermediate_size']}"
            )
        if self.architecture == "MAEForImageClassification":
            lines.append(f"head           {c['num_labels']} classes, {c['pooling']} pooling")
        lines += [
            f"input          {h}x{w} pixels, {c['num_channels']} channels, patch {p}x{q}",
            f"patch grid     {gh}x{gw} = {gh * gw} patches (+ cls token), {p * q * c['num_channels']} values per patch",
        ]
        pretraining = self.architecture == "MAEForPreTraining"
        if pretraining:
            lines.append(
                f"pretraining    mask ratio {c['mask_ratio']:g}: the encoder sees {kept} of {gh * gw} patches, "
                f"norm_pix_loss {c['norm_pix_loss']}"
            )
        lines += [
            "parameters     " + ", ".join(f"{part} {count:,}" for part, count in params.items() if count),
            "FLOPs / image  (matmul-like ops, 2 per multiply-add)",
        ]
        if pretraining:
            lines += [
                f"  pretraining forward        {_giga(flops.pretraining_forward)}  "
                f"(encoder {_giga(flops.encoder_pretraining)}, decoder {_giga(flops.decoder)})",
                f"  pretraining step (fwd+bwd) {_giga(flops.pretraining_step)}",
            ]
        lines.append(f"  inference, all patches     {_giga(flops.inference)}")
        return "\n".join(lines)


def _giga(flops: int) -> str:
    return f"{flops / 1e9:.4g} GFLOP" if flops >= 1e8 else f"{flops / 1e6:.4g} MFLOP"


_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "mask_ratio",
    "norm_pix_loss",
    "pooling",
    "num_labels",
)


def model_info(
    name_or_path: str, image_size: int | tuple[int, int] | None = None, mask_ratio: float | None = None
) -> ModelInfo:
    """Describe a preset, a maekit or transformers `vit_mae` folder, or a Hub repo, without loading its weights.

    Parameters are counted on an instance built on the `meta` device (no memory, no weights read).

    Args:
        name_or_path (`str`): a preset name (e.g. `"vit-base-patch16"`), a model folder or a Hub repo id.
        image_size (`int` or `(height, width)`, *optional*): resolution of the FLOP counts and the grid.
        mask_ratio (`float`, *optional*): mask ratio of the pretraining FLOPs; defaults to the config's.

    Example:

    ```python
    from maekit.info import model_info

    info = model_info("vit-base-patch16")
    assert info.grid == (14, 14) and info.parameters["encoder"] == 85_647_360
    print(info.format())
    ```
    """
    from .inputs import resolve_config

    config, model_class = resolve_config(name_or_path, allow_presets=True)
    if mask_ratio is not None:
        check_mask_ratio(mask_ratio)
        config.mask_ratio = mask_ratio
    size = pair(image_size) if image_size is not None else config.image_hw
    p, q = config.patch_hw
    if size[0] % p or size[1] % q or min(size) < 1:
        raise ValueError(f"image_size {size[0]}x{size[1]} must be a positive multiple of patch_size {p}x{q}.")
    with torch.device("meta"):
        model = model_class(config)
    num_labels = config.num_labels if model_class is MAEForImageClassification else 0
    fields = {**config.to_dict(), "num_labels": config.num_labels}
    return ModelInfo(
        name=name_or_path,
        architecture=model_class.__name__,
        config={field: fields.get(field) for field in _ARCHITECTURE_FIELDS},
        grid=(size[0] // p, size[1] // q),
        image_size=tuple(size),
        parameters=parameter_counts(model),
        flops=flops_per_image(config, size, num_labels=num_labels),
    )
