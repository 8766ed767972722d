"""Learning-rate schedules, adjusted every optimizer step: the official MAE recipe's linear warmup + half-cycle cosine
(`cosine_lr_with_warmup`), and mmsegmentation's linear warmup + polynomial decay (`poly_lr_with_warmup`, the ADE20K
segmentation recipe); `lr_with_warmup` picks one by name (`TrainingArguments.lr_schedule`)."""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "cosine_lr_with_warmup", "lr_with_warmup", "poly_lr_with_warmup"]

LR_SCHEDULES = ("cosine", "poly")


def _check_lengths(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")


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
    _check_lengths(total_steps, warmup_steps)
    if step < warmup_steps:
        return learning_rate * step / warmup_steps
    if total_steps == warmup_steps:
        return learning_rate
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_lr_with_warmup(
    step: int,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
    power: float = 1.0,
    warmup_ratio: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (0-based) under mmcv's `PolyLrUpdaterHook` with linear warmup, per
    iteration (`by_epoch=False`), as mmsegmentation's and BEiT's segmentation recipes use it.

    The polynomial decay runs over the whole run, warmup included:
    `poly = (learning_rate - min_lr) * (1 - step / total_steps) ** power + min_lr`. During the first `warmup_steps`
    steps it is multiplied by `1 - (1 - step / warmup_steps) * (1 - warmup_ratio)`, rising linearly from
    `warmup_ratio` to 1.

    Args:
        step (`int`): number of optimizer steps already taken.
        learning_rate (`float`): the rate at step 0 without warmup (the recipe's `lr`).
        total_steps (`int`): length of the run (`max_iters`).
        warmup_steps (`int`): length of the linear warmup (`warmup_iters`).
        min_lr (`float`, defaults to 0.0): the rate the decay ends at.
        power (`float`, defaults to 1.0): the polynomial's power (1.0: linear decay).
        warmup_ratio (`float`, defaults to 0.0): the warmup's starting factor (mmsegmentation's configs: 1e-6).

    Returns:
        `float`: the learning rate to use for this step.
    """
    _check_lengths(total_steps, warmup_steps)
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power!r}.")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio!r}.")
    progress = min(step, total_steps) / total_steps
    rate = (learning_rate - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_steps:
        rate *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return rate


def lr_with_warmup(
    schedule: str,
    step: int,
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float = 0.0,
    poly_power: float = 1.0,
) -> float:
    """The learning rate of step `step` under `schedule`: `"cosine"` (`cosine_lr_with_warmup`) or `"poly"`
    (`poly_lr_with_warmup` with `power=poly_power`); both warm up linearly from 0."""
    if schedule == "cosine":
        return cosine_lr_with_warmup(
            step, learning_rate=learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=min_lr
        )
    if schedule == "poly":
        return poly_lr_with_warmup(
            step,
            learning_rate=learning_rate,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            min_lr=min_lr,
            power=poly_power,
        )
    raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")
