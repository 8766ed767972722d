"""Work-arounds for bugs in the installed transformers that maekit's public API would otherwise inherit.

Each fix is narrow (one call path, one condition), leaves every other input to transformers' own code, and is
applied once when `maekit` is imported.
"""

from __future__ import annotations

import functools
import os

from transformers import AutoBackbone
from transformers.models.auto.auto_factory import _BaseAutoModelClass

__all__ = ["fix_auto_backbone_local_folders"]


def fix_auto_backbone_local_folders() -> None:
    """Let `AutoBackbone.from_pretrained` load a local folder again.

    transformers 5.x decides between a Hub repo and a timm model name with `HfApi().repo_exists(name)`, which raises
    `HFValidationError` for an absolute path and asks the Hub about a relative one (an error offline), so no saved
    backbone folder can be loaded (checked with 5.24 for Dinov2 as well as maekit). For an existing local directory
    this goes to the generic Auto path, as transformers 4.x did; Hub ids and timm names are untouched.
    """
    original = AutoBackbone.from_pretrained.__func__
    if getattr(original, "_maekit_local_folders", False):
        return

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path
        ):
            kwargs.pop("use_timm_backbone", None)
            return _BaseAutoModelClass.from_pretrained.__func__(
                cls, str(pretrained_model_name_or_path), *model_args, **kwargs
            )
        return original(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    from_pretrained._maekit_local_folders = True
    AutoBackbone.from_pretrained = classmethod(from_pretrained)
