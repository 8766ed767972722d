"""Optimizer parameter groups as in the official MAE pretraining code."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["param_groups_weight_decay", "create_optimizer"]


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()
) -> list[dict[str, object]]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    As the official recipe (timm's `add_weight_decay`), biases and every 1-D parameter (LayerNorm weights) get no
    weight decay; matrices, the patch projection and the cls / mask tokens do. Frozen parameters are left out.

    Args:
        model (`nn.Module`): the model to optimize.
        weight_decay (`float`): decay of the first group.
        no_weight_decay (`Iterable[str]`, *optional*): further parameter names to exclude from decay.

    Returns:
        `list[dict]`: `[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]`,
        each also holding the parameter names under `"param_names"`.
    """
    skip = set(no_weight_decay)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "param_names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names},
    ]


def create_optimizer(
    model: nn.Module, *, learning_rate: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over `param_groups_weight_decay(model, weight_decay)` (official: betas (0.9, 0.95), decay 0.05)."""
    return adamw(param_groups_weight_decay(model, weight_decay), learning_rate=learning_rate, betas=betas, eps=eps)


def adamw(
    groups: list[dict], *, learning_rate: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW over the non-empty parameter groups, with the single fused kernel whenever every parameter allows it.

    On CPU the default AdamW is a per-parameter loop that costs a noticeable part of a step, the fused one very little
    (measured in docs/performance.md). The fused kernel takes CPU and CUDA floating-point tensors.
    """
    groups = [g for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
