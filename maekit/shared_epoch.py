"""`SharedEpoch`: an epoch counter that reaches persistent DataLoader workers."""

from __future__ import annotations

import torch

__all__ = ["SharedEpoch"]


class SharedEpoch:
    """An epoch counter in shared memory, so `set_epoch` in the main process reaches persistent DataLoader workers."""

    def __init__(self):
        self.value = torch.zeros(1, dtype=torch.int64).share_memory_()

    def get(self) -> int:
        return int(self.value[0])

    def set(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}.")
        self.value[0] = epoch
