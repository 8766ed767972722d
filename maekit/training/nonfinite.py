"""What a run does about steps whose loss or gradient norm is NaN or infinite (`nonfinite_loss`)."""

from __future__ import annotations

import math
from pathlib import Path

from .arguments import TrainingArguments
from .checkpointing import TrainerState

__all__ = ["NonFiniteLossError", "NonFinitePolicy"]

ADVICE = (
    "Lower the learning rate, enable max_grad_norm or use mixed_precision='bf16', or set nonfinite_loss='skip' (drop "
    "such steps) or 'rollback' (reload the newest checkpoint and skip the data since then)."
)


class NonFiniteLossError(RuntimeError):
    """Raised when a training step's loss or gradient norm is NaN or infinite (`nonfinite_loss="error"`), or when
    `"skip"`/`"rollback"` meet too many such steps, or when the weights stopped being finite."""


class NonFinitePolicy:
    """Counts non-finite steps in the trainer's state and decides: stop (raise), skip, or roll back.

    Args:
        args (`TrainingArguments`): `nonfinite_loss`, `nonfinite_patience`, `nonfinite_max_fraction`.
    """

    def __init__(self, args: TrainingArguments):
        self.mode = args.nonfinite_loss
        self.patience = args.nonfinite_patience
        self.max_fraction = args.nonfinite_max_fraction

    def decide(
        self,
        state: TrainerState,
        step: int,
        epoch: int,
        loss: float,
        grad_norm: float,
        latest: Path | None,
        applied: bool = False,
    ) -> str:
        """Count the bad step (0-based `step`) and return `"skip"` or `"rollback"`, or raise `NonFiniteLossError`.

        `latest` is the newest checkpoint (None: none yet, so no rollback); `applied` means the step was already
        applied (DeepSpeed steps inside `backward`), so only stopping is possible.
        """
        state.num_nonfinite_steps += 1
        state.consecutive_nonfinite_steps += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss})"
        where = f"step {step + 1} (epoch {epoch})"
        kept = f"the last good checkpoint {latest} is intact" if latest else "no checkpoint had been saved yet"
        if self.mode == "error" or applied:
            applied_note = " (DeepSpeed had already applied the step)" if applied else ""
            raise NonFiniteLossError(f"Non-finite training {what} at {where}{applied_note}; {kept}. {ADVICE}")
        fraction = state.num_nonfinite_steps / max(step + 1, 1)
        if state.consecutive_nonfinite_steps >= self.patience or (
            state.num_nonfinite_steps >= self.patience and fraction > self.max_fraction
        ):
            raise NonFiniteLossError(
                f"Too many non-finite steps: {state.num_nonfinite_steps} of {step + 1} "
                f"({state.consecutive_nonfinite_steps} in a row; limits nonfinite_patience={self.patience}, "
                f"nonfinite_max_fraction={self.max_fraction}), the last one with {what} at {where}; {kept}. {ADVICE}"
            )
        return "rollback" if self.mode == "rollback" and latest is not None else "skip"

    @staticmethod
    def weights_error(when: str, step: int, latest: Path | None) -> NonFiniteLossError:
        """The error for weights found non-finite at `when` (nothing is saved from them)."""
        kept = f"the last good checkpoint {latest} is intact" if latest else "no checkpoint had been saved yet"
        return NonFiniteLossError(
            f"The weights are not finite at {when} (step {step}): nothing was saved; {kept}. Lower the learning rate "
            "or enable max_grad_norm."
        )
