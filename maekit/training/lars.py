"""LARS (You et al., 2017) as used for MAE linear probing (the MoCo v3 variant in the official code)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio; 1-D parameters (biases, norm weights) get neither weight decay
    nor the trust ratio.

    For a parameter `p` with gradient `g` and more than one dimension, one step is

    ```
    u = g + weight_decay * p
    q = trust_coefficient * ||p|| / ||u||     (1 where ||p|| == 0 or ||u|| == 0)
    mu = momentum * mu + q * u
    p = p - lr * mu
    ```

    and for a 1-D parameter `u = g`, `q = 1`. Note that `lr` multiplies the already-normalized update, so the
    official linear-probing rates (blr 0.1, lr = blr * batch / 256) are much larger than SGD ones.

    Args:
        params (`Iterable`): parameters or parameter groups.
        lr (`float`): learning rate (set by the schedule at every step).
        weight_decay (`float`): L2 penalty added to the gradient of >1-D parameters (official linear probe: 0).
        momentum (`float`): momentum factor.
        trust_coefficient (`float`): scale of the trust ratio `||p|| / ||u||`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}.")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step.

        Args:
            closure (`Callable`, *optional*): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                update = param.grad
                if update is None:
                    continue
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    one = torch.ones_like(param_norm)
                    ratio = torch.where((param_norm > 0) & (update_norm > 0), ratio, one)
                    update = update.mul(ratio)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])
        return loss
