"""Checkpoint interop: official MAE `.pth` files, timm, transformers' ViTMAE, and the `maekit-convert` CLI.

maekit keeps the official / timm parameter layout (fused `qkv`, `blocks.N.norm1`, ...), so official and timm files
load by renaming a few decoder keys. transformers 5.x splits q/k/v and names layers `layers.N.layernorm_before`; the
tables below are the single place both directions of each mapping use.

Run `maekit-convert --help` (or `python -m maekit.convert --help`) for the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import urllib.parse
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.utils import logging

from .configuration_mae import MAEConfig
from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, sincos_pos_embed_2d

logger = logging.get_logger(__name__)

__all__ = [
    "config_from_official",
    "config_from_transformers",
    "config_to_transformers",
    "load_official_checkpoint",
    "load_official_state_dict",
    "main",
    "save_timm",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "timm_model_args",
    "to_official_state_dict",
    "to_timm_state_dict",
    "to_transformers",
]

# Fields with the same name and meaning in both configs.
_SHARED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "decoder_num_attention_heads",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_intermediate_size",
    "mask_ratio",
    "norm_pix_loss",
)

# maekit block -> transformers layer, for modules that map one to one.
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def config_from_transformers(config: ViTMAEConfig) -> MAEConfig:
    """A `MAEConfig` with the fields of a transformers `ViTMAEConfig`."""
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS if hasattr(config, name)}
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
    fields = {name: getattr(config, name) for name in _SHARED_FIELDS}
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


def to_transformers(model) -> ViTMAEForPreTraining | ViTMAEModel:
    """Copy a maekit `MAEForPreTraining` (-> `ViTMAEForPreTraining`) or `MAEModel` (-> `ViTMAEModel`) into
    transformers, weights included; the result gives the same outputs for the same `noise`."""
    if not isinstance(model, (MAEForPreTraining, MAEModel)):
        raise TypeError(f"to_transformers expects MAEForPreTraining or MAEModel, got {type(model).__name__}.")
    config = config_to_transformers(model.config)
    sd = state_dict_to_transformers(model.state_dict(), model.config)
    if isinstance(model, MAEForPreTraining):
        target = ViTMAEForPreTraining(config)
    else:
        target = ViTMAEModel(config)
        sd = {k.removeprefix("vit."): v for k, v in sd.items()}
    target.load_state_dict(sd, strict=True)
    param = next(model.parameters())
    return target.to(device=param.device, dtype=param.dtype).train(model.training)


# ----------------------------------------------------------------------------------------------------------------------
# Loading transformers `vit_mae` folders / repos through maekit classes


def transformers_vit_mae_config(pretrained_model_name_or_path, **kwargs) -> dict | None:
    """The config dict of a folder or Hub repo holding a transformers `vit_mae` model, or None for anything else."""
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    except OSError:
        return None  # let transformers raise its own, complete error
    return config_dict if config_dict.get("model_type") == "vit_mae" else None


def load_transformers_vit_mae(cls, pretrained_model_name_or_path, config_dict: dict | None = None, **kwargs):
    """Load a transformers `vit_mae` checkpoint (5.x or legacy key names, local or Hub) as the maekit class `cls`.

    transformers does the file resolution and the legacy-name renames; maekit then fuses q/k/v and renames.
    `config_dict` is the checkpoint's config when the caller has already read it.
    """
    dtype = kwargs.pop("dtype", None)
    kwargs.pop("torch_dtype", None)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    # Read a pretraining checkpoint through the pretraining class even for an encoder (no wall of "unexpected
    # decoder keys"); an encoder-only one through ViTMAEModel.
    if config_dict is None:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
    has_decoder = "ViTMAEForPreTraining" in (config_dict.get("architectures") or [])
    source_cls = ViTMAEForPreTraining if issubclass(cls, MAEForPreTraining) or has_decoder else ViTMAEModel
    source, info = source_cls.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **hub)
    config = config_from_transformers(source.config)
    attn_implementation = kwargs.pop("attn_implementation", None)
    # Config overrides as transformers' from_pretrained takes them (num_labels=, pooling=, drop_path_rate=, ...).
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in _HUB_KWARGS and hasattr(config, k)}
    if overrides:
        config = MAEConfig(**{**config.to_dict(), **overrides})
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
    if not issubclass(cls, MAEForPreTraining):
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


# ----------------------------------------------------------------------------------------------------------------------
# Official MAE / timm files (`models_mae.py`, `models_vit.py`, timm `VisionTransformer`)

# Official pretraining names of the decoder -> maekit `MAEForPreTraining` names. A trailing dot renames a prefix; the
# encoder keys are the same in both layouts (maekit adds the `mae.` prefix in its wrapper models).
_OFFICIAL_DECODER_RENAMES = (
    ("mask_token", "decoder.mask_token"),
    ("decoder_pos_embed", "decoder.pos_embed"),
    ("decoder_embed.", "decoder.embed."),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("decoder_pred.", "decoder.pred."),
)
# Fine-tuning heads (`models_vit.py` with global_pool, timm with global_pool="avg"): same names in every layout.
_HEAD_PREFIXES = ("fc_norm.", "head.")
# Attention heads leave no trace in tensor shapes: the published models use 64-d encoder heads (ViT-H: 16 heads of
# 80) and 32-d decoder heads (16 heads of 512).
_ENCODER_HEAD_DIM, _DECODER_HEAD_DIM, _KNOWN_ENCODER_HEADS = 64, 32, {1280: 16}
# timm architectures with the geometry of the published sizes; any other size is described by `model_args` alone.
_TIMM_ARCHITECTURES = {
    192: "vit_tiny_patch16_224",
    384: "vit_small_patch16_224",
    768: "vit_base_patch16_224",
    1024: "vit_large_patch16_224",
    1280: "vit_huge_patch14_224",
}
_POS_EMBED_ATOL = 1e-4


def _rename(key: str, renames) -> str:
    for old, new in renames:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old) :]
    return key


def _group(key: str) -> str:
    """Which part of an MAE a maekit key (with or without `mae.`) belongs to: encoder, decoder or head."""
    if key.startswith("decoder."):
        return "decoder"
    if key.startswith(_HEAD_PREFIXES):
        return "head"
    return "encoder"


def _is_url(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(("https://", "http://"))


def _download(url: str) -> Path:
    """The file at `url` in torch's hub cache (`$TORCH_HOME/hub/checkpoints`), downloaded by torch.hub once."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached))
    return cached


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of an official MAE `.pth` file, a training checkpoint or a timm `.safetensors` file.

    Pickles are read with `torch.load(weights_only=True)` only, so a file can never run code. The one non-tensor
    type allowed is `argparse.Namespace`, which the official training checkpoints store as `args`. The
    `{"model": state_dict}` wrapper of the official files is removed.

    Args:
        path (`str` or `Path`): the file, or an http(s) URL such as the official release's (downloaded once into
            torch's hub cache).

    Returns:
        `dict[str, torch.Tensor]`: the state dict, in the file's own (official / timm) key names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the pickle needs more than tensors and plain containers, or holds no state dict.
    """
    path = _download(path) if _is_url(path) else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        raise ValueError(
            f"{path} is not a plain tensor checkpoint: unpickling it needs objects that could run code, and maekit "
            "only loads with torch.load(weights_only=True). If you trust the file, re-save its weights alone, e.g. "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, 'clean.pth'). "
            f"torch said: {' '.join(reason[:3])}"
        ) from err
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path} holds no state dict: expected a dict of tensors or {{'model': dict of tensors}}.")
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path} is not a state dict: these entries are not tensors: {not_tensors[:10]}.")
    return state_dict


def _count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _infer_heads(width: int, head_dim: int, field: str) -> int:
    heads = _KNOWN_ENCODER_HEADS.get(width) if head_dim == _ENCODER_HEAD_DIM else None
    if heads is None:
        if width % head_dim:
            raise ValueError(
                f"Cannot infer {field} for width {width} (not a multiple of the {head_dim}-d heads of the published "
                f"models); pass {field}=... to config_from_official, or config=MAEConfig(...) to the loader."
            )
        heads = width // head_dim
    return heads


def config_from_official(state_dict: dict[str, torch.Tensor], **overrides) -> MAEConfig:
    """Infer the `MAEConfig` of an official / timm-layout state dict from its tensor shapes.

    Widths, depths, patch and image size, channels, qkv bias, decoder sizes and, for fine-tuned files, `num_labels`
    and `pooling` (`"mean"` when there is an `fc_norm`) are read off the tensors. Head counts are not visible in
    shapes: those of the published models are assumed (64-d encoder heads, 16 for ViT-H; 32-d decoder heads).
    LayerNorm eps is the official 1e-6. Keyword arguments override any field (e.g. `norm_pix_loss=True`).

    Args:
        state_dict (`dict[str, torch.Tensor]`): official / timm key names, as `load_official_state_dict` returns.

    Returns:
        `MAEConfig`.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise ValueError(
            f"Not an official MAE / timm ViT state dict: no {absent}. First keys found: {sorted(state_dict)[:8]}."
        )
    hidden, channels, p, q = state_dict["patch_embed.proj.weight"].shape
    fields = {
        "hidden_size": hidden,
        "num_hidden_layers": _count_blocks(state_dict, "blocks."),
        "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "num_channels": channels,
        "patch_size": p if p == q else [p, q],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "layer_norm_eps": 1e-6,
    }
    if "num_attention_heads" not in overrides:
        fields["num_attention_heads"] = _infer_heads(hidden, _ENCODER_HEAD_DIM, "num_attention_heads")
    if "image_size" not in overrides:
        num_patches = state_dict["pos_embed"].shape[1] - 1
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(
                f"pos_embed has {num_patches} patch positions, not a square grid; pass image_size=(height, width)."
            )
        fields["image_size"] = grid * p if p == q else [grid * p, grid * q]
    if "decoder_embed.weight" in state_dict:
        width = state_dict["decoder_embed.weight"].shape[0]
        fields.update(
            decoder_hidden_size=width,
            decoder_num_hidden_layers=_count_blocks(state_dict, "decoder_blocks."),
            decoder_intermediate_size=state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0],
        )
        if "decoder_num_attention_heads" not in overrides:
            fields["decoder_num_attention_heads"] = _infer_heads(
                width, _DECODER_HEAD_DIM, "decoder_num_attention_heads"
            )
    if "head.weight" in state_dict or "fc_norm.weight" in state_dict:
        fields.update(
            num_labels=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
            pooling="mean" if "fc_norm.weight" in state_dict else "cls",
        )
    return MAEConfig(**{**fields, **overrides})


def _check_pos_embed(name: str, table: torch.Tensor, config: MAEConfig, source: str) -> None:
    expected = sincos_pos_embed_2d(table.shape[-1], config.grid_size)
    diff = (table.float() - expected).abs().max().item()
    if diff > _POS_EMBED_ATOL:
        logger.warning(
            f"{name} in {source} differs from the fixed 2-D sin-cos table (max |diff| {diff:.2e}); keeping the "
            "checkpoint's values."
        )


def _load_official_into(model, state_dict: dict[str, torch.Tensor], source: str):
    """Load an official-layout state dict into a maekit model; report, by name, everything that does not fit."""
    config = model.config
    fine_tuned = any(k.startswith(_HEAD_PREFIXES) for k in state_dict)
    sd = {_rename(k, _OFFICIAL_DECODER_RENAMES): v for k, v in state_dict.items()}
    wrapped = isinstance(model, (MAEForPreTraining, MAEForImageClassification))
    sd = {(f"mae.{k}" if wrapped and _group(k) == "encoder" else k): v for k, v in sd.items()}
    own = model.state_dict()
    own_groups = {_group(k) for k in own}

    dropped = sorted({_group(k) for k in sd} - own_groups)
    if "head" in dropped:
        logger.warning(
            f"{source} is a fine-tuned checkpoint; its fc_norm/head are not used by {type(model).__name__}."
        )
    if "decoder" in dropped:
        logger.info(f"{source} has an MAE decoder; {type(model).__name__} does not use it.")
    sd = {k: v for k, v in sd.items() if _group(k) in own_groups}
    if isinstance(model, MAEForImageClassification) and model.config.pooling == "mean":
        # The official global-pool model has no final encoder norm; a pretrained one is dropped, as official.
        sd = {k: v for k, v in sd.items() if k not in ("mae.norm.weight", "mae.norm.bias")}

    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in sorted(sd)
        if k in own and sd[k].shape != own[k].shape
    ]
    if unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit {type(model).__name__} with this config. "
            + (f"Unexpected keys: {unexpected}. " if unexpected else "")
            + (f"Shape mismatches: {mismatched}." if mismatched else "")
        )

    missing = sorted(set(own) - set(sd))
    groups_absent = {_group(k) for k in missing} - {_group(k) for k in sd}
    if "decoder" in groups_absent:
        logger.warning(
            f"{source} has no MAE decoder: the decoder of {type(model).__name__} is RANDOMLY INITIALISED; its "
            "reconstructions and loss are meaningless until it is trained."
        )
    if "head" in groups_absent:
        logger.warning(f"{source} has no classification head: fc_norm/head are freshly initialised, to be fine-tuned.")
    missing = [k for k in missing if _group(k) not in groups_absent]
    # With mean pooling the official fine-tuning model drops the encoder's final norm: maekit's is unused then.
    final_norm = ("mae.norm.weight", "mae.norm.bias") if wrapped else ("norm.weight", "norm.bias")
    if isinstance(model, MAEForImageClassification) and config.pooling == "mean":
        missing = [k for k in missing if k not in final_norm]
    elif fine_tuned and set(final_norm) <= set(missing):
        logger.warning(
            f"{source} was fine-tuned with mean pooling and has no final encoder norm: `norm` is freshly initialised, "
            "so `last_hidden_state` is standardised but not the trained features (`hidden_states[-1]` is)."
        )
        missing = [k for k in missing if k not in final_norm]
    if missing:
        raise ValueError(f"{source} does not fit {type(model).__name__}: missing keys {missing}.")

    if not fine_tuned:  # pretraining tables are fixed sin-cos; fine-tuning learns (and keeps) its own
        for name in ("mae.pos_embed", "pos_embed", "decoder.pos_embed"):
            if name in sd:
                _check_pos_embed(name, sd[name], config, source)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def load_official_checkpoint(
    path: str | Path,
    config: MAEConfig | None = None,
    model_class: type | None = None,
) -> MAEForPreTraining | MAEModel | MAEForImageClassification:
    """Load an official MAE file (or a timm ViT file) into a maekit model.

    | file                                                 | holds                    | default class               |
    |------------------------------------------------------|--------------------------|-----------------------------|
    | `mae_pretrain_vit_{base,large,huge}.pth`             | encoder                  | `MAEModel`                  |
    | `mae_pretrain_vit_*_full.pth`, `mae_visualize_*.pth` | encoder + decoder        | `MAEForPreTraining`         |
    | `mae_finetuned_vit_*.pth`                            | encoder + fc_norm + head | `MAEForImageClassification` |
    | training `checkpoint-N.pth` (`models_mae.py`)        | encoder + decoder        | `MAEForPreTraining`         |
    | timm `model.safetensors` of a ViT                    | encoder (+ head)         | as above                    |

    Files are read with `torch.load(weights_only=True)` (see `load_official_state_dict`). Pretraining position tables
    are checked against the fixed 2-D sin-cos table (a warning names any that differ; the file's values are kept);
    fine-tuned files keep their learned ones. Loading a decoder-less file into `MAEForPreTraining` warns that the
    decoder is random; loading a file of another architecture raises `ValueError` naming the keys that do not fit.

    Args:
        path (`str` or `Path`): the `.pth` / `.pt` / `.bin` (pickle) or `.safetensors` file, or its http(s) URL.
        config (`MAEConfig`, *optional*): the architecture; inferred from tensor shapes when `None` (see
            `config_from_official`). Pass one for head counts other than the published models' or for
            `norm_pix_loss=True` (the released `*_full` pretraining runs used it).
        model_class (`type`, *optional*): `MAEModel`, `MAEForPreTraining` or `MAEForImageClassification`; by default
            the class that uses everything in the file (see the table).

    Returns:
        The model, in eval mode.

    Example:

    ```python no-run
    from maekit.convert import load_official_checkpoint

    model = load_official_checkpoint("https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_large.pth")
    ```
    """
    return _official_model(load_official_state_dict(path), config, model_class, source=str(path))


def _official_model(
    state_dict: dict[str, torch.Tensor], config: MAEConfig | None, model_class: type | None, source: str
):
    if config is None:
        config = config_from_official(state_dict)
    elif not isinstance(config, MAEConfig):
        raise TypeError(f"config must be a MAEConfig or None, got {type(config).__name__}.")
    if model_class is None:
        if any(k.startswith(_HEAD_PREFIXES) for k in state_dict):
            model_class = MAEForImageClassification
        elif "decoder_embed.weight" in state_dict:
            model_class = MAEForPreTraining
        else:
            model_class = MAEModel
    elif model_class not in (MAEModel, MAEForPreTraining, MAEForImageClassification):
        raise TypeError(
            f"model_class must be MAEModel, MAEForPreTraining or MAEForImageClassification, got {model_class!r}."
        )
    model = model_class(config)
    model.config._name_or_path = source
    return _load_official_into(model, state_dict, source)


def to_official_state_dict(model) -> dict[str, torch.Tensor]:
    """A maekit model's weights in the official key names.

    `MAEForPreTraining` gives the `models_mae.py` layout (encoder + `decoder_*` + `mask_token`), `MAEModel` the
    encoder of `mae_pretrain_vit_*.pth`, `MAEForImageClassification` the `models_vit.py` layout (`fc_norm` + `head`;
    with mean pooling no final `norm`, which that model does not use).
    """
    if not isinstance(model, (MAEModel, MAEForPreTraining, MAEForImageClassification)):
        raise TypeError(
            f"Expected MAEModel, MAEForPreTraining or MAEForImageClassification, got {type(model).__name__}."
        )
    inverse = tuple((new, old) for old, new in _OFFICIAL_DECODER_RENAMES)
    out = {_rename(k.removeprefix("mae."), inverse): v for k, v in model.state_dict().items()}
    if isinstance(model, MAEForImageClassification) and model.config.pooling == "mean":
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}
    return out


def to_timm_state_dict(model) -> dict[str, torch.Tensor]:
    """A state dict that timm's `VisionTransformer(**timm_model_args(model))` loads with `strict=True`.

    The encoder of any maekit model (the decoder of `MAEForPreTraining` is left out); `MAEForImageClassification`
    adds `fc_norm` + `head` (timm `global_pool="avg"`) or `norm` + `head` (`"token"`).
    """
    # Pretraining-only tensors: the decoder, its mask token, and the encoder mask token (`encoder_mask_token=True`).
    pretraining = ("decoder_", "mask_token", "encoder_mask_token")
    return {k: v for k, v in to_official_state_dict(model).items() if not k.startswith(pretraining)}


def timm_model_args(model) -> dict:
    """Keyword arguments of timm's `VisionTransformer` (or `timm.create_model`) matching a maekit model.

    Example:

    ```python no-run
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**timm_model_args(model))
    vit.load_state_dict(to_timm_state_dict(model), strict=True)
    ```
    """
    config = model.config
    if config.hidden_act != "gelu":
        raise ValueError(f"timm's ViT uses exact GELU; hidden_act={config.hidden_act!r} has no timm counterpart.")
    if config.layer_norm_eps != 1e-6:
        raise ValueError(f"timm's ViT uses LayerNorm eps 1e-6; layer_norm_eps={config.layer_norm_eps!r} differs.")
    classifier = isinstance(model, MAEForImageClassification)
    return {
        "img_size": config.image_size if isinstance(config.image_size, int) else list(config.image_hw),
        "patch_size": config.patch_size if isinstance(config.patch_size, int) else list(config.patch_hw),
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
        "qkv_bias": config.qkv_bias,
        "num_classes": config.num_labels if classifier else 0,
        "global_pool": "avg" if classifier and config.pooling == "mean" else "token",
    }


def save_timm(model, save_directory: str | Path) -> Path:
    """Write `model.safetensors` + a timm `config.json`, a folder `timm.create_model("local-dir:...")` (or an
    `hf-hub:` repo it is uploaded to) loads."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    args = timm_model_args(model)
    save_file({k: v.contiguous() for k, v in to_timm_state_dict(model).items()}, save_directory / "model.safetensors")
    config = model.config
    timm_config = {
        "architecture": _TIMM_ARCHITECTURES.get(config.hidden_size, "vit_base_patch16_224"),
        "num_classes": args["num_classes"],
        "num_features": config.hidden_size,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [config.num_channels, *config.image_hw],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "num_classes": args["num_classes"],
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (save_directory / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    return save_directory


# ----------------------------------------------------------------------------------------------------------------------
# Command line: maekit-convert SOURCE OUTPUT --to {maekit,transformers,timm,official}

_SOURCE_KINDS = ("official", "timm", "transformers", "maekit")
_TARGET_KINDS = ("maekit", "transformers", "timm", "official")
_MODEL_CLASSES = {"pretraining": MAEForPreTraining, "encoder": MAEModel, "classification": MAEForImageClassification}
_ARCHITECTURES = {
    "ViTMAEForPreTraining": MAEForPreTraining,
    "ViTMAEModel": MAEModel,
    **{cls.__name__: cls for cls in _MODEL_CLASSES.values()},
}
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _source_kind(source: str) -> str:
    """Tell what SOURCE is: a checkpoint file, or a local folder / Hub repo with a transformers, maekit or timm
    config.json (read through transformers' config loading, so Hub ids need no downloader of ours)."""
    path = Path(source)
    if _is_url(source):
        return "official"
    if path.is_file():
        if path.suffix not in _CHECKPOINT_SUFFIXES:
            raise ValueError(f"{source} is a file but not a checkpoint; accepted suffixes: {_CHECKPOINT_SUFFIXES}.")
        return "official"
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source)
    except OSError as err:
        raise ValueError(
            f"{source} is neither a checkpoint file nor a folder / Hub repo with a config.json ({err})."
        ) from err
    if "architecture" in config_dict:  # timm's config.json (transformers reads it as model_type "timm_wrapper")
        return "timm"
    kinds = {"vit_mae": "transformers", MAEConfig.model_type: "maekit"}
    model_type = config_dict.get("model_type")
    if model_type not in kinds:
        raise ValueError(
            f"{source} holds a model_type={model_type!r} config; accepted: a transformers 'vit_mae', a maekit "
            f"{MAEConfig.model_type!r} or a timm ViT folder, or an official .pth file."
        )
    return kinds[model_type]


def _load_source(source: str, kind: str, model_class: type | None):
    if kind == "official":
        return load_official_checkpoint(source, model_class=model_class)
    if kind == "timm":
        folder = Path(source)
        if folder.is_dir():
            weights, timm_config = folder / "model.safetensors", folder / "config.json"
        else:
            weights, timm_config = hf_hub_download(source, "model.safetensors"), hf_hub_download(source, "config.json")
        # Head counts are not in the weights; timm exports with `model_args` record them.
        heads = json.loads(Path(timm_config).read_text()).get("model_args", {}).get("num_heads")
        overrides = {} if heads is None else {"num_attention_heads": heads}
        state_dict = load_official_state_dict(weights)
        return _official_model(state_dict, config_from_official(state_dict, **overrides), model_class, str(weights))
    if model_class is None:
        config_dict, _ = PretrainedConfig.get_config_dict(source)
        architectures = config_dict.get("architectures") or ["MAEForPreTraining"]
        model_class = _ARCHITECTURES.get(architectures[0], MAEForPreTraining)
    if kind == "transformers" and model_class is MAEForImageClassification:
        raise ValueError("A transformers ViTMAE checkpoint has no classification head; use --model-class encoder.")
    return model_class.from_pretrained(source)


def _save(model, output: Path, kind: str) -> None:
    if kind == "maekit":
        model.save_pretrained(output)
    elif kind == "transformers":
        if isinstance(model, MAEForImageClassification):
            raise ValueError(
                "transformers' ViTMAE has no classification model (and ViT's has no mean pooling); export "
                "MAEForImageClassification --to timm, maekit or official instead."
            )
        to_transformers(model).save_pretrained(output)
    elif kind == "timm":
        save_timm(model, output)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": to_official_state_dict(model)}, output)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maekit-convert",
        description=(
            "Convert MAE checkpoints between the official release (.pth), timm, transformers' ViTMAE and maekit. "
            "SOURCE: an official or timm checkpoint file or URL, or a transformers / maekit / timm folder or Hub "
            "repo id."
        ),
    )
    parser.add_argument("source", help="checkpoint file or URL, model folder or Hub repo id")
    parser.add_argument("output", help="output folder (a .pth file for --to official)")
    parser.add_argument("--to", required=True, choices=_TARGET_KINDS, help="output format")
    parser.add_argument(
        "--from", dest="source_kind", default="auto", choices=("auto", *_SOURCE_KINDS), help="input format"
    )
    parser.add_argument(
        "--model-class",
        default="auto",
        choices=("auto", *_MODEL_CLASSES),
        help="maekit class to load into (default: the one that uses everything in SOURCE)",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the output to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `maekit-convert` / `python -m maekit.convert`; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        kind = _source_kind(args.source) if args.source_kind == "auto" else args.source_kind
        model_class = None if args.model_class == "auto" else _MODEL_CLASSES[args.model_class]
        model = _load_source(args.source, kind, model_class)
        if args.to == "official" and output.suffix not in (".pth", ".pt"):
            raise ValueError(f"--to official writes one file; give OUTPUT a .pth suffix, got {str(output)!r}.")
        _save(model, output, args.to)
    except (ValueError, TypeError, OSError) as err:
        parser.error(str(err))
    print(f"Wrote {type(model).__name__} ({kind} -> {args.to}) to {output}")
    if args.push_to_hub:
        api = HfApi()
        repo = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
        if output.is_dir():
            api.upload_folder(repo_id=repo.repo_id, folder_path=output, commit_message="Upload with maekit-convert")
        else:
            api.upload_file(
                repo_id=repo.repo_id,
                path_or_fileobj=output,
                path_in_repo=output.name,
                commit_message="Upload with maekit-convert",
            )
        print(f"Pushed to https://huggingface.co/{repo.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
