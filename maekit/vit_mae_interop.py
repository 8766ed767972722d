"""transformers' ViTMAE and maekit: the config fields and parameter names they share, and loading a transformers
`vit_mae` folder or Hub repo into a maekit class.

maekit keeps the official / timm parameter layout (fused `qkv`, `blocks.N.norm1`, ...); transformers 5.x splits q/k/v
and names layers `layers.N.layernorm_before`. The tables below are the single place both directions of each mapping
use. This module imports no maekit model: `maekit.modeling_mae` loads `vit_mae` folders through it, and
`maekit.convert` builds its conversions on it.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.utils import logging

from .configuration_mae import VIT_MAE_FIELDS, MAEConfig

logger = logging.get_logger(__name__)

__all__ = [
    "HUB_KWARGS",
    "config_from_transformers",
    "config_to_transformers",
    "load_transformers_vit_mae",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "transformers_vit_mae_config",
]

# maekit block -> transformers layer, for modules that map one to one.
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def config_from_transformers(config: ViTMAEConfig) -> MAEConfig:
    """A `MAEConfig` with the fields of a transformers `ViTMAEConfig`."""
    fields = {name: getattr(config, name) for name in VIT_MAE_FIELDS if hasattr(config, name)}
    return MAEConfig(**fields)


def config_to_transformers(config: MAEConfig) -> ViTMAEConfig:
    """A transformers `ViTMAEConfig` for a `MAEConfig` (square integer patches only: transformers' patchify)."""
    p, q = config.patch_hw
    if p != q:
        raise ValueError(f"transformers' ViTMAE needs a square patch_size, got {config.patch_size!r}.")
    if config.encoder_mask_token or config.target == "hog":
        raise ValueError(
            "transformers' ViTMAE has neither mask tokens in the encoder nor HOG targets; got "
            f"encoder_mask_token={config.encoder_mask_token!r}, target={config.target!r}."
        )
    fields = {name: getattr(config, name) for name in VIT_MAE_FIELDS}
    fields["patch_size"] = p
    fields["image_size"] = list(config.image_hw) if isinstance(config.image_size, (list, tuple)) else config.image_size
    return ViTMAEConfig(**fields)


def _block_to_transformers(src: str, dst: str, sd: dict, out: dict) -> None:
    q, k, v = sd.pop(f"{src}.attn.qkv.weight").chunk(3, dim=0)
    out.update(
        {f"{dst}.attention.q_proj.weight": q, f"{dst}.attention.k_proj.weight": k, f"{dst}.attention.v_proj.weight": v}
    )
    if f"{src}.attn.qkv.bias" in sd:
        q, k, v = sd.pop(f"{src}.attn.qkv.bias").chunk(3, dim=0)
        out.update(
            {f"{dst}.attention.q_proj.bias": q, f"{dst}.attention.k_proj.bias": k, f"{dst}.attention.v_proj.bias": v}
        )
    for ours, theirs in _BLOCK_RENAMES.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{theirs}.{kind}"] = sd.pop(f"{src}.{ours}.{kind}")


def _block_from_transformers(src: str, dst: str, sd: dict, out: dict) -> None:
    out[f"{dst}.attn.qkv.weight"] = torch.cat([sd.pop(f"{src}.attention.{n}_proj.weight") for n in "qkv"], dim=0)
    if f"{src}.attention.q_proj.bias" in sd:
        out[f"{dst}.attn.qkv.bias"] = torch.cat([sd.pop(f"{src}.attention.{n}_proj.bias") for n in "qkv"], dim=0)
    for ours, theirs in _BLOCK_RENAMES.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{ours}.{kind}"] = sd.pop(f"{src}.{theirs}.{kind}")


# Non-block tensors: (maekit name, transformers name), encoder names relative to the encoder prefix.
_ENCODER_RENAMES = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)
_DECODER_RENAMES = (
    ("decoder.embed.weight", "decoder.decoder_embed.weight"),
    ("decoder.embed.bias", "decoder.decoder_embed.bias"),
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.pos_embed", "decoder.decoder_pos_embed"),
    ("decoder.norm.weight", "decoder.decoder_norm.weight"),
    ("decoder.norm.bias", "decoder.decoder_norm.bias"),
    ("decoder.pred.weight", "decoder.decoder_pred.weight"),
    ("decoder.pred.bias", "decoder.decoder_pred.bias"),
)


def state_dict_to_transformers(state_dict: dict, config: MAEConfig) -> dict:
    """maekit state dict (of `MAEForPreTraining` or `MAEModel`) -> transformers 5.x `ViTMAEForPreTraining` names.

    Encoder-only input gives an encoder-only result with the `vit.` prefix.
    """
    sd = dict(state_dict)
    has_prefix = any(k.startswith("mae.") for k in sd)
    enc, out = ("mae." if has_prefix else ""), {}
    for ours, theirs in _ENCODER_RENAMES:
        out[f"vit.{theirs}"] = sd.pop(f"{enc}{ours}")
    for i in range(config.num_hidden_layers):
        _block_to_transformers(f"{enc}blocks.{i}", f"vit.layers.{i}", sd, out)
    if "decoder.embed.weight" in sd:
        for ours, theirs in _DECODER_RENAMES:
            out[theirs] = sd.pop(ours)
        for i in range(config.decoder_num_hidden_layers):
            _block_to_transformers(f"decoder.blocks.{i}", f"decoder.decoder_layers.{i}", sd, out)
    if sd:
        raise ValueError(f"Unexpected keys with no transformers counterpart: {sorted(sd)}")
    return out


def state_dict_from_transformers(state_dict: dict, config: MAEConfig) -> dict:
    """transformers 5.x ViTMAE state dict (`vit.`-prefixed or bare `ViTMAEModel`) -> maekit `MAEForPreTraining`
    names (`mae.` prefix; decoder keys only when present)."""
    sd = dict(state_dict)
    if not any(k.startswith("vit.") for k in sd):
        sd = {(k if k.startswith("decoder.") else f"vit.{k}"): v for k, v in sd.items()}
    out = {}
    for ours, theirs in _ENCODER_RENAMES:
        out[f"mae.{ours}"] = sd.pop(f"vit.{theirs}")
    for i in range(config.num_hidden_layers):
        _block_from_transformers(f"vit.layers.{i}", f"mae.blocks.{i}", sd, out)
    if "decoder.decoder_embed.weight" in sd:
        for ours, theirs in _DECODER_RENAMES:
            out[ours] = sd.pop(theirs)
        for i in range(config.decoder_num_hidden_layers):
            _block_from_transformers(f"decoder.decoder_layers.{i}", f"decoder.blocks.{i}", sd, out)
    if sd:
        raise ValueError(f"Unexpected transformers keys with no maekit counterpart: {sorted(sd)}")
    return out


def transformers_vit_mae_config(pretrained_model_name_or_path, **kwargs) -> dict | None:
    """The config dict of a folder or Hub repo holding a transformers `vit_mae` model, or None for anything else."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    except OSError:
        return None  # let transformers raise its own, complete error
    return config_dict if config_dict.get("model_type") == "vit_mae" else None


def load_transformers_vit_mae(cls, pretrained_model_name_or_path, config_dict: dict | None = None, **kwargs):
    """Load a transformers `vit_mae` checkpoint (5.x or legacy key names, local or Hub) as the maekit class `cls`
    (its `has_decoder` says whether it is a pretraining model with the decoder).

    transformers does the file resolution and the legacy-name renames; maekit then fuses q/k/v and renames.
    `config_dict` is the checkpoint's config when the caller has already read it.
    """
    dtype = kwargs.pop("dtype", None)
    kwargs.pop("torch_dtype", None)
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    # Read a pretraining checkpoint through the pretraining class even for an encoder (no wall of "unexpected
    # decoder keys"); an encoder-only one through ViTMAEModel.
    if config_dict is None:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    has_decoder = "ViTMAEForPreTraining" in (config_dict.get("architectures") or [])
    source_cls = ViTMAEForPreTraining if cls.has_decoder or has_decoder else ViTMAEModel
    source, info = source_cls.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **hub)
    config = config_from_transformers(source.config)
    attn_implementation = kwargs.pop("attn_implementation", None)
    # Config overrides as transformers' from_pretrained takes them (num_labels=, pooling=, drop_path_rate=, ...).
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in HUB_KWARGS and hasattr(config, k)}
    for name, value in overrides.items():  # as attributes, which keeps linked fields (norm_pix_loss / target) in step
        setattr(config, name, value)
    config.validate()
    sd = state_dict_from_transformers(source.state_dict(), config)
    model = cls(config)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    source_missing = sorted(info["missing_keys"])
    if any(k.startswith("decoder.") for k in source_missing):
        # transformers initialises an absent decoder with zero mask token / position table: keep maekit's own init.
        logger.warning(
            f"{pretrained_model_name_or_path} has no (complete) MAE decoder; the decoder is randomly initialised."
        )
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    elif source_missing:
        logger.warning(f"Not in {pretrained_model_name_or_path}, initialised by transformers: {source_missing}")
    if not cls.has_decoder:
        prefix = "mae." if hasattr(model, "mae") else ""
        sd = {prefix + k.removeprefix("mae."): v for k, v in sd.items() if k.startswith("mae.")}
    own = model.state_dict()
    # Tensors the maekit class does not have on purpose (e.g. the final norm of a mean-pooling classifier).
    sd = {k: v for k, v in sd.items() if k in own}
    # A transformers model built without stored position tables leaves them at zero: keep our exact sin-cos then.
    for name in [k for k in sd if k.endswith("pos_embed")]:
        if not sd[name].any():
            logger.warning(f"{name} is all zeros in {pretrained_model_name_or_path}; using the exact sin-cos table.")
            sd[name] = own[name]
    missing, _ = model.load_state_dict(sd, strict=False)
    # An absent decoder was warned about above; a classifier's new head is expected.
    missing = [k for k in missing if not k.startswith(("decoder.", "head.", "fc_norm."))]
    if missing:
        logger.warning(f"Not in {pretrained_model_name_or_path}, left at their initial values: {missing}")
    model.config._name_or_path = str(pretrained_model_name_or_path)
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model.eval()
