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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.utils import logging

from .configuration_mae import MAEConfig
from .image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, sincos_pos_embed_2d
from .vit_mae_interop import (
    config_from_transformers,
    config_to_transformers,
    state_dict_from_transformers,
    state_dict_to_transformers,
)

logger = logging.get_logger(__name__)

__all__ = [
    "config_from_official",
    "config_from_transformers",
    "config_to_transformers",
    "load_official_checkpoint",
    "load_official_state_dict",
    "main",
    "save_timm",
    "set_layer_norm_eps",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "timm_model_args",
    "to_official_state_dict",
    "to_timm_state_dict",
    "to_transformers",
]


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
    `{"model": state_dict}` wrapper of the official files is removed. Every tensor must be backed by as many values
    as its shape declares: a pickle can declare broadcast (stride-0) views that cost a few bytes on disk and expand to
    any size once copied into a model, so those are refused before anything is built from them.

    Args:
        path (`str` or `Path`): the file, or an http(s) URL such as the official release's (downloaded once into
            torch's hub cache).

    Returns:
        `dict[str, torch.Tensor]`: the state dict, in the file's own (official / timm) key names.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt or truncated file, a pickle that needs more than tensors and plain containers, no state
            dict, or tensors that declare more values than the file stores.
    """
    return _read_official_file(path)[0]


def _read_official_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """`(state dict, the maekit config stored beside it or None)` of an official / timm file (see
    `load_official_state_dict`)."""
    path = _download(path) if _is_url(path) else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.suffix == ".safetensors":
        try:
            state_dict, stored = load_file(path), None
        except SafetensorError as err:
            raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {err}") from err
    else:
        state_dict, stored = _load_pickled_state_dict(path)
    _check_declared_sizes(state_dict, path)
    return state_dict, stored


def _load_pickled_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
        if "global" not in reason.lower():  # not a refused class or function: the bytes themselves are wrong
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?).") from err
        raise ValueError(
            f"{path}: not a plain tensor checkpoint: unpickling it needs objects that could run code, and maekit "
            "only loads with torch.load(weights_only=True). If you trust the file, re-save its weights alone, e.g. "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, 'clean.pth'). "
            f"torch said: {reason[:300]}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:  # zip archive errors, empty or cut files
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {reason}") from err
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    stored = checkpoint.get(MAEKIT_CONFIG_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{path}: holds no state dict: expected a dict of tensors or {{'model': dict of tensors}}.")
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path}: not a state dict: these entries are not tensors: {not_tensors[:10]}.")
    return state_dict, stored if isinstance(stored, dict) else None


def _check_declared_sizes(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor's values must be stored in the file, once: compare declared sizes with the storages' sizes.

    A pickled tensor is a (storage, offset, shape, strides) view, and `torch.load` builds views without copying, so
    a 1-value storage can declare a (8192, 8192) weight. Copied into a model (whose size is inferred from those very
    shapes) it would allocate the declared size; here only metadata is read.
    """
    stored, declared = {}, 0
    for name, tensor in state_dict.items():
        storage = tensor.untyped_storage()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > storage.nbytes():
            raise ValueError(
                f"{path}: tensor {name!r} declares shape {tuple(tensor.shape)} ({tensor.numel():,} values) but the "
                f"file stores {storage.nbytes() // tensor.element_size():,} for it (a broadcast view): refused, as "
                "copying it into a model would allocate the declared size. A checkpoint saved from a model's "
                "state_dict never holds such tensors."
            )
        stored[(storage.device.type, storage.data_ptr())] = storage.nbytes()
        declared += nbytes
    if declared > sum(stored.values()):
        raise ValueError(
            f"{path}: its tensors declare {declared:,} bytes but the file stores {sum(stored.values()):,} bytes for "
            "them (tensors that share storage): refused, as the model built from it would allocate the declared "
            "size. Re-save it with a copy of each tensor: {k: v.clone() for k, v in state_dict.items()}."
        )


def _count_blocks(state_dict: dict, prefix: str) -> int:
    """The number of `{prefix}N.` blocks, which must be numbered 0..N-1: the depth of the model built from it."""
    names = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
    not_numbers = sorted(name for name in names if not name.isdigit())
    if not_numbers:
        raise ValueError(f"{prefix}N keys need a block number N, got {prefix}{not_numbers[0]}.")
    indices = {int(name) for name in names}
    missing = len(set(range(max(indices, default=-1) + 1)) - indices)
    if missing:
        raise ValueError(
            f"{prefix}N keys go up to {prefix}{max(indices)} but {missing} of the blocks before it are missing (a "
            f"model of depth {max(indices) + 1} would be built from {len(indices)} blocks)."
        )
    return len(indices)


def _shape(state_dict: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Size:
    """The shape of `state_dict[key]`, which must exist and have `ndim` dimensions."""
    if key not in state_dict:
        raise ValueError(f"no {key!r} tensor, which this architecture needs.")
    shape = state_dict[key].shape
    if len(shape) != ndim:
        raise ValueError(f"{key} has shape {tuple(shape)}; expected a {ndim}-D tensor.")
    return shape


# Official files hold no head counts (the code fixes them per model size). maekit writes the config next to the
# weights under this key (the official loaders read only "model"), and reads it back instead of guessing.
MAEKIT_CONFIG_KEY = "maekit_config"


def _infer_heads(width: int, head_dim: int, field: str) -> int:
    heads = _KNOWN_ENCODER_HEADS.get(width) if head_dim == _ENCODER_HEAD_DIM else None
    if heads is None:
        if width % head_dim:
            raise ValueError(
                f"Cannot infer {field} for width {width} (not a multiple of the {head_dim}-d heads of the published "
                f"models); pass {field}=... to config_from_official, or config=MAEConfig(...) to the loader "
                f"(maekit convert: --{field.replace('_', '-')})."
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
    hidden, channels, p, q = _shape(state_dict, "patch_embed.proj.weight", 4)
    fields = {
        "hidden_size": hidden,
        "num_hidden_layers": _count_blocks(state_dict, "blocks."),
        "intermediate_size": _shape(state_dict, "blocks.0.mlp.fc1.weight", 2)[0],
        "num_channels": channels,
        "patch_size": p if p == q else [p, q],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "layer_norm_eps": 1e-6,
    }
    if "num_attention_heads" not in overrides:
        fields["num_attention_heads"] = _infer_heads(hidden, _ENCODER_HEAD_DIM, "num_attention_heads")
    if "image_size" not in overrides:
        num_patches = _shape(state_dict, "pos_embed", 3)[1] - 1
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(
                f"pos_embed has {num_patches} patch positions, not a square grid; pass image_size=(height, width)."
            )
        fields["image_size"] = grid * p if p == q else [grid * p, grid * q]
    if "decoder_embed.weight" in state_dict:
        width = _shape(state_dict, "decoder_embed.weight", 2)[0]
        fields.update(
            decoder_hidden_size=width,
            decoder_num_hidden_layers=_count_blocks(state_dict, "decoder_blocks."),
            decoder_intermediate_size=_shape(state_dict, "decoder_blocks.0.mlp.fc1.weight", 2)[0],
        )
        if "decoder_num_attention_heads" not in overrides:
            fields["decoder_num_attention_heads"] = _infer_heads(
                width, _DECODER_HEAD_DIM, "decoder_num_attention_heads"
            )
    if "head.weight" in state_dict or "fc_norm.weight" in state_dict:
        fields.update(
            num_labels=_shape(state_dict, "head.weight", 2)[0] if "head.weight" in state_dict else 0,
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


def _fit_official(model, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An official-layout state dict renamed for a maekit model (which may be on the meta device), with the tensors it
    does not use dropped (with a warning); `ValueError` naming, by key, everything that does not fit."""
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
            f"{source}: does not fit {type(model).__name__} with this config. "
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
        raise ValueError(f"{source}: does not fit {type(model).__name__}: missing keys {missing}.")
    return sd


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
    state_dict, stored = _read_official_file(path)
    if config is None and stored is not None:  # written by maekit: the exact architecture, heads included
        config = MAEConfig(**{k: v for k, v in stored.items() if k not in ("model_type", "transformers_version")})
    return _official_model(state_dict, config, model_class, source=str(path))


def _official_model(
    state_dict: dict[str, torch.Tensor],
    config: MAEConfig | None,
    model_class: type | None,
    source: str,
    overrides: dict | None = None,
):
    """The model of an official-layout state dict; without `config`, `config_from_official(state_dict, **overrides)`
    (head counts, which the weights do not hold)."""
    if config is None:
        try:
            config = config_from_official(state_dict, **(overrides or {}))
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
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
    # Check every key and shape against the architecture on a weightless (meta) model first: only a file that fits
    # gets a real model allocated.
    with torch.device("meta"):
        skeleton = model_class(config)
    sd = _fit_official(skeleton, state_dict, source)
    model = model_class(config)
    model.config._name_or_path = source
    if not any(k.startswith(_HEAD_PREFIXES) for k in state_dict):  # pretraining tables are fixed sin-cos;
        for name in ("mae.pos_embed", "pos_embed", "decoder.pos_embed"):  # fine-tuning learns (and keeps) its own
            if name in sd:
                _check_pos_embed(name, sd[name], config, source)
    model.load_state_dict(sd, strict=False)
    return model.eval()


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


def _eps_test_images(config: MAEConfig, num_images: int = 2) -> torch.Tensor:
    """A fixed batch of photo-like inputs: smooth random colour fields with a few edges, ImageNet-normalized."""
    generator = torch.Generator().manual_seed(0)
    c, (h, w) = config.num_channels, config.image_hw
    coarse = torch.rand(num_images, c, 6, 6, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    edges = torch.nn.functional.interpolate(coarse.roll(1, dims=0), size=(h, w), mode="nearest")  # sharp steps
    pixels = (0.7 * smooth + 0.3 * edges).clamp(0, 1)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN if c == 3 else [0.5] * c).view(1, c, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD if c == 3 else [0.5] * c).view(1, c, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def _eps_sensitive_outputs(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    if isinstance(model, MAEForPreTraining):
        noise = torch.rand(pixel_values.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(0))
        return [
            model.mae(pixel_values).last_hidden_state,
            model(pixel_values, noise=noise.to(pixel_values.device)).logits,
        ]
    if isinstance(model, MAEForImageClassification):
        return [model(pixel_values).logits]
    return [model(pixel_values).last_hidden_state]


def set_layer_norm_eps(model, eps: float = 1e-6, pixel_values: torch.Tensor | None = None) -> float:
    """Give every LayerNorm of a maekit model (and `config.layer_norm_eps`) another epsilon, and measure what it did.

    transformers' `ViTMAEConfig` defaults to `layer_norm_eps=1e-12` (the `facebook/vit-mae-*` configs hold it), the
    official code and timm use 1e-6. Exporting such a model to timm or the official layout changes eps; this measures
    by how much the outputs move: the model runs (in eval mode, restored afterwards) before and after the change.

    Args:
        model: `MAEModel`, `MAEForPreTraining` or `MAEForImageClassification`.
        eps (`float`): the new epsilon.
        pixel_values (`torch.Tensor`, *optional*): images to measure on; default: a fixed batch of two smooth
            synthetic colour images at `config.image_size`.

    Returns:
        `float`: the largest absolute difference of the outputs (`last_hidden_state` over all patches; with a decoder
        also the predicted pixels for a fixed mask; a classifier's `logits`).
    """
    if not isinstance(model, (MAEModel, MAEForPreTraining, MAEForImageClassification)):
        raise TypeError(f"Expected a maekit MAE model, got {type(model).__name__}.")
    param = next(model.parameters())
    if pixel_values is None:
        pixel_values = _eps_test_images(model.config)
    pixel_values = pixel_values.to(param.device, param.dtype)
    was_training = model.training
    model.eval()
    before = _eps_sensitive_outputs(model, pixel_values)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = eps
    model.config.layer_norm_eps = eps
    after = _eps_sensitive_outputs(model, pixel_values)
    model.train(was_training)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(before, after))


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
        raise ValueError(
            f"timm's ViT uses LayerNorm eps 1e-6; layer_norm_eps={config.layer_norm_eps!r} differs. Call "
            "maekit.convert.set_layer_norm_eps(model, 1e-6) first: it returns by how much the outputs change "
            "(maekit-convert does it, and prints the difference)."
        )
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
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1):
        raise ValueError(f"{source}: no such file or folder.")  # a local path, not a Hub repo id
    if path.is_file():
        if path.suffix not in _CHECKPOINT_SUFFIXES:
            raise ValueError(f"{source}: a file but not a checkpoint; accepted suffixes: {_CHECKPOINT_SUFFIXES}.")
        return "official"
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source)
    except OSError as err:
        raise ValueError(
            f"{source}: neither a checkpoint file nor a folder / Hub repo with a config.json ({err})."
        ) from err
    if not config_dict:
        raise ValueError(
            f"{source}: no config.json, so the architecture of the weights there is unknown; copy the config.json "
            "of the run that wrote them into it (or convert the checkpoint file itself)."
        )
    if "architecture" in config_dict:  # timm's config.json (transformers reads it as model_type "timm_wrapper")
        return "timm"
    kinds = {"vit_mae": "transformers", MAEConfig.model_type: "maekit"}
    model_type = config_dict.get("model_type")
    if model_type in ("maekit_mae_backbone", "upernet"):
        raise ValueError(
            f"{source} is a {model_type!r} folder (an MAE backbone, or a UperNet segmentation model); maekit-convert "
            "converts MAE encoders, pretraining and classification models only. The folder already loads with "
            "transformers after `import maekit` (AutoBackbone / AutoModelForSemanticSegmentation); convert the "
            "pretraining folder it was built from instead."
        )
    if model_type not in kinds:
        raise ValueError(
            f"{source}: holds a model_type={model_type!r} config; accepted: a transformers 'vit_mae', a maekit "
            f"{MAEConfig.model_type!r} or a timm ViT folder, or an official .pth file."
        )
    return kinds[model_type]


def _load_source(source: str, kind: str, model_class: type | None, heads: dict | None = None):
    heads = heads or {}
    if kind == "official":
        if not heads:
            return load_official_checkpoint(source, model_class=model_class)
        state_dict, _ = _read_official_file(source)
        return _official_model(state_dict, None, model_class, str(source), overrides=heads)
    if kind == "timm":
        folder = Path(source)
        if folder.is_dir():
            weights, timm_config = folder / "model.safetensors", folder / "config.json"
        else:
            weights, timm_config = hf_hub_download(source, "model.safetensors"), hf_hub_download(source, "config.json")
        # Head counts are not in the weights; timm exports with `model_args` record them.
        num_heads = json.loads(Path(timm_config).read_text()).get("model_args", {}).get("num_heads")
        overrides = ({} if num_heads is None else {"num_attention_heads": num_heads}) | heads
        state_dict = load_official_state_dict(weights)
        return _official_model(state_dict, None, model_class, str(weights), overrides=overrides)
    if model_class is None:
        config_dict, _ = PretrainedConfig.get_config_dict(source)
        architectures = config_dict.get("architectures") or ["MAEForPreTraining"]
        model_class = _ARCHITECTURES.get(architectures[0], MAEForPreTraining)
    if kind == "transformers" and model_class is MAEForImageClassification:
        raise ValueError("a transformers ViTMAE checkpoint has no classification head; use --model-class encoder.")
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
        config = json.loads(
            model.config.to_json_string()
        )  # plain JSON types: torch.load(weights_only=True) reads them
        torch.save({"model": to_official_state_dict(model), MAEKIT_CONFIG_KEY: config}, output)


def build_parser(prog: str = "maekit-convert") -> argparse.ArgumentParser:
    """The command line's parser (`prog`: the name in its usage and errors)."""
    parser = argparse.ArgumentParser(
        prog=prog,
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
    for name in ("num-attention-heads", "decoder-num-attention-heads"):
        parser.add_argument(
            f"--{name}",
            type=int,
            help=f"{name.replace('-', ' ')} of an official or timm SOURCE whose file does not record them (default: "
            "inferred from the widths, as in the published models)",
        )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the output to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return parser


# What reading a bad SOURCE raises (after maekit's own checks turn most of it into ValueErrors naming the file).
_READ_ERRORS = (ValueError, TypeError, OSError, RuntimeError, EOFError, KeyError, SafetensorError)
# The LayerNorm epsilon of the official code and of timm's ViT.
_OFFICIAL_EPS = 1e-6


def _error(name, err: BaseException | str, prog: str = "maekit-convert") -> int:
    """Print `<prog>: error: <name>: <what is wrong>` on one line (no traceback); returns exit status 1."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        message = f"missing entry {message}"
    elif isinstance(err, SafetensorError):
        message = f"its weights are not a readable safetensors file: {message}"
    if not message.startswith(str(name)):
        message = f"{name}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, prog: str = "maekit-convert") -> int:
    """Entry point of `maekit-convert` / `maekit convert` / `python -m maekit.convert`; returns the exit status.

    Wrong arguments exit with status 2 and the usage; a SOURCE that cannot be read or converted, or an OUTPUT that
    cannot be written, exits with status 1 and one line `maekit-convert: error: <file>: <what is wrong>`.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.to == "official" and output.suffix not in (".pth", ".pt"):
        parser.error(f"--to official writes one file; give OUTPUT a .pth suffix, got {str(output)!r}.")
    try:
        kind = _source_kind(args.source) if args.source_kind == "auto" else args.source_kind
        model_class = None if args.model_class == "auto" else _MODEL_CLASSES[args.model_class]
        heads = {
            field: value
            for field, value in (
                ("num_attention_heads", args.num_attention_heads),
                ("decoder_num_attention_heads", args.decoder_num_attention_heads),
            )
            if value is not None
        }
        model = _load_source(args.source, kind, model_class, heads)
    except _READ_ERRORS as err:
        return _error(args.source, err, prog)
    if args.to in ("timm", "official") and model.config.layer_norm_eps != _OFFICIAL_EPS:
        # These formats have no eps field: their code uses 1e-6. Convert, and say by how much the outputs move.
        eps, difference = model.config.layer_norm_eps, set_layer_norm_eps(model, _OFFICIAL_EPS)
        print(
            f"{prog}: warning: {args.source}: layer_norm_eps is {eps!r}, the {args.to} format uses "
            f"{_OFFICIAL_EPS!r}: converted with {_OFFICIAL_EPS!r}; on test images the outputs change by at most "
            f"{difference:.1e} (max abs). transformers' ViTMAE defaults to 1e-12, but the facebook/vit-mae-* weights "
            "were trained with the official 1e-6.",
            file=sys.stderr,
        )
    try:
        _save(model, output, args.to)
    except ValueError as err:  # what the target format cannot hold
        return _error(args.source, err, prog)
    except OSError as err:
        return _error(output, err, prog)
    print(f"Wrote {type(model).__name__} ({kind} -> {args.to}) to {output}")
    if args.push_to_hub:
        try:
            api = HfApi()
            repo = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True)
            if output.is_dir():
                api.upload_folder(
                    repo_id=repo.repo_id, folder_path=output, commit_message="Upload with maekit-convert"
                )
            else:
                api.upload_file(
                    repo_id=repo.repo_id,
                    path_or_fileobj=output,
                    path_in_repo=output.name,
                    commit_message="Upload with maekit-convert",
                )
        except Exception as err:  # network, credentials, quota: the conversion itself is done
            return _error(args.push_to_hub, f"push failed ({' '.join(str(err).split())}); {output} is written.", prog)
        print(f"Pushed to https://huggingface.co/{repo.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
