"""Layer-wise learning-rate decay for ViT fine-tuning (ELECTRA / BEiT rule, as the official MAE fine-tuning code).

A ViT with `depth` blocks is seen as `depth + 1` layers: the embeddings (cls token, position table, patch
projection) are layer 0, block `i` is layer `i + 1`, and everything after the blocks (final norm, `fc_norm`, head)
is the top layer `depth + 1`. A parameter of layer `l` trains at `lr * layer_decay ** (depth + 1 - l)`: the head at
the full rate, each block below it `layer_decay` times slower.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["get_layer_id", "param_groups_layer_decay"]


def get_layer_id(name: str, num_layers: int, prefix: str = "") -> int:
    """Layer index of a parameter of a ViT encoder under the BEiT rule.

    Args:
        name (`str`): the parameter's name, e.g. `"mae.blocks.3.attn.qkv.weight"`.
        num_layers (`int`): number of blocks + 1 (the index of the top layer).
        prefix (`str`, *optional*): a leading module path removed before matching (`"mae."` for maekit models).

    Returns:
        `int`: 0 for `cls_token`, `pos_embed` and `patch_embed.*`; `i + 1` for `blocks.i.*`; `num_layers` otherwise.
    """
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    no_weight_decay_list: Iterable[str] = ("cls_token", "pos_embed"),
) -> list[dict[str, object]]:
    """Optimizer parameter groups with layer-wise learning-rate decay, as the official `param_groups_lrd`.

    Works on an `MAEForImageClassification` (names under `mae.`), an `MAEModel`, a model holding an `MAEBackbone`
    (e.g. `UperNetForSemanticSegmentation`: names under `backbone.mae.`; neck and heads are the top layer), or any ViT
    whose encoder exposes `blocks` (an `nn.ModuleList`) and names its embeddings `cls_token` / `pos_embed` /
    `patch_embed`. No weight decay goes to 1-D parameters (biases, norm weights) and to the names in
    `no_weight_decay_list` (matched with or without the encoder's prefix). Frozen parameters are left out.

    The optimizer does not read `lr_scale` itself: the learning-rate schedule sets each group's rate to
    `lr * group["lr_scale"]` at every step, as the official `adjust_learning_rate`.

    Args:
        model (`nn.Module`): the model to fine-tune.
        weight_decay (`float`): decay of the decayed groups.
        layer_decay (`float`): per-layer decay factor (official: 0.65 for ViT-B, 0.75 for ViT-L/H); 1.0 turns layer
            decay off.
        no_weight_decay_list (`Iterable[str]`): further parameter names without weight decay. maekit's `pos_embed`
            is a fixed buffer, not a parameter, so only `cls_token` is affected by the default.

    Returns:
        `list[dict]`: one group per (layer, decay / no decay), each with `"params"`, `"param_names"`,
        `"weight_decay"`, `"lr_scale"` and `"layer_id"`, ordered as the parameters are first met.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, model) if prefix else model
    if not isinstance(getattr(encoder, "blocks", None), nn.ModuleList):
        # An encoder deeper in the model: a segmentation or detection model around an MAEBackbone
        # (`backbone.mae.blocks`); everything outside it (pyramid, heads) is the top layer.
        prefix, encoder = next(
            ((name, m) for name, m in model.named_modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)),
            ("", model),
        )
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no ViT encoder with a `blocks` ModuleList; layer decay needs one "
            "(an MAEModel, MAEForImageClassification, a model around an MAEBackbone or a timm-style VisionTransformer)."
        )
    num_layers = len(blocks) + 1
    prefix = f"{prefix}." if encoder is not model else ""
    skip = set(no_weight_decay_list)

    groups: dict[str, dict[str, object]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        short_name = name[len(prefix) :] if prefix and name.startswith(prefix) else name
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in skip or short_name in skip
        layer_id = get_layer_id(name, num_layers, prefix)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - layer_id),
                "layer_id": layer_id,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())
