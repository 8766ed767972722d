"""Learning-rate schedule of the official MAE recipe: linear warmup, then a half-cycle cosine down to `min_lr`."""

from __future__ import annotations

import math

__all__ = ["cosine_lr_with_warmup"]


def cosine_lr_with_warmup(
    step: int, *, learning_rate: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> float:
    """Learning rate for optimizer step `step` (0-based), adjusted every iteration as the official code does.

    During warmup the rate rises linearly from 0 (`learning_rate * step / warmup_steps`); afterwards it follows
    `min_lr + (learning_rate - min_lr) * 0.5 * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps)))`.

    Args:
        step (`int`): number of optimizer steps already taken.
        learning_rate (`float`): peak learning rate, reached at the end of warmup.
        total_steps (`int`): length of the whole schedule in optimizer steps.
        warmup_steps (`int`): length of the linear warmup in optimizer steps.
        min_lr (`float`, defaults to 0.0): learning rate at the end of the cosine.

    Returns:
        `float`: the learning rate to use for this step.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if step < warmup_steps:
        return learning_rate * step / warmup_steps
    if total_steps == warmup_steps:
        return learning_rate
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
