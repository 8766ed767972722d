"""MAE model configuration."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .validation import pair

logger = logging.get_logger(__name__)

__all__ = ["MAEConfig", "PRESETS", "MASK_STRATEGIES", "TARGETS"]

# Fields with the same name and meaning in transformers' `ViTMAEConfig`: a `vit_mae` config converts through them.
VIT_MAE_FIELDS = (
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

_OFFICIAL_DECODER = {
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_num_attention_heads": 16,
    "decoder_intermediate_size": 2048,
}

# Encoder sizes from the ViT / DeiT papers; the decoder and LayerNorm eps are those of the official MAE release.
PRESETS: dict[str, dict] = {
    "vit-tiny-patch16": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "intermediate_size": 768,
    },
    "vit-small-patch16": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    },
    "vit-base-patch16": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "vit-large-patch16": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "vit-huge-patch14": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "intermediate_size": 5120,
        "patch_size": 14,
    },
}
for _preset in PRESETS.values():
    _preset.setdefault("patch_size", 16)
    _preset.update(image_size=224, layer_norm_eps=1e-6, **_OFFICIAL_DECODER)

_POOLINGS = ("mean", "cls")
# How the removed patches are chosen (maekit.masking) and what the decoder regresses (maekit.targets).
MASK_STRATEGIES = ("random", "block", "grid")
TARGETS = ("pixel", "norm_pixel", "hog")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: `int(num_patches * (1 - mask_ratio))`, the official rounding."""
    return int(num_patches * (1 - mask_ratio))


def largest_mask_ratio(num_patches: int) -> float:
    """The largest `mask_ratio` that leaves the encoder at least one visible patch: `num_kept(L, r) >= 1`."""
    ratio = 1.0 - 1.0 / num_patches
    while ratio > 0 and num_kept(num_patches, ratio) < 1:  # 1 - 1/L can round to a ratio that keeps none
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def check_mask_ratio(mask_ratio, num_patches: int | None = None) -> None:
    """`ValueError` unless `mask_ratio` is a number in [0, 1) that, when `num_patches` is given, keeps at least one
    of them."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}.")
    if num_patches is None:
        return
    kept = num_kept(num_patches, mask_ratio)
    if kept < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio!r} keeps {kept} of {num_patches} patches, but the encoder needs at least one "
            f"visible patch: use mask_ratio <= {largest_mask_ratio(num_patches)!r} for {num_patches} patches."
        )


@dataclass(repr=False)
class MAEConfig(PretrainedConfig):
    r"""Configuration of a Masked Autoencoder (ViT encoder + lightweight decoder).

    Field names follow transformers' `ViTMAEConfig`, so a `vit_mae` config converts field by field. Defaults are the
    official ViT-B/16 MAE (`MAEConfig.from_preset("vit-base-patch16")` gives the same model).

    Args:
        hidden_size (`int`, defaults to 768): width of the encoder.
        num_hidden_layers (`int`, defaults to 12): number of encoder blocks.
        num_attention_heads (`int`, defaults to 12): attention heads per encoder block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden width of the encoder MLPs.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, any key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the attention projection and the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the normal init of the cls and mask tokens.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (official MAE value; transformers uses 1e-12).
        image_size (`int` or `(height, width)`, defaults to 224): input resolution the position tables are built for.
        patch_size (`int` or `(height, width)`, defaults to 16): patch size; must divide `image_size`.
        num_channels (`int`, defaults to 3): input channels.
        qkv_bias (`bool`, defaults to `True`): bias on the fused query/key/value projection.
        decoder_num_attention_heads (`int`, defaults to 16): attention heads per decoder block.
        decoder_hidden_size (`int`, defaults to 512): width of the decoder.
        decoder_num_hidden_layers (`int`, defaults to 8): number of decoder blocks.
        decoder_intermediate_size (`int`, defaults to 2048): hidden width of the decoder MLPs.
        mask_ratio (`float`, defaults to 0.75): fraction of patches removed during pretraining, in [0, 1).
        norm_pix_loss (`bool`, defaults to `False`): regress per-patch normalized pixels (mean 0, unit variance); the
            same as `target="norm_pixel"`. Kept in sync with `target`: setting either one updates the other.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth of the encoder, increasing linearly over depth.
        pooling (`str`, defaults to `"mean"`): how `MAEForImageClassification` pools: `"mean"` of the patch tokens
            followed by `fc_norm` (the official fine-tuning default) or the `"cls"` token after the final norm.
        mask_strategy (`str`, defaults to `"random"`): how the removed patches are chosen when the model draws its own
            mask and in training: `"random"` (official), `"block"` (BEiT-style blocks) or `"grid"` (keep one patch
            of every 2×2). See `maekit.masking`.
        encoder_mask_token (`bool`, defaults to `False`): the encoder sees every patch, removed ones replaced by a
            learned mask token (SimMIM's design, paper Table 1(c)), and the decoder gets that full sequence. The
            official MAE (`False`) encodes the visible patches only, which is 3-4x cheaper.
        target (`str`, *optional*): what the decoder regresses for each patch: `"pixel"`, `"norm_pixel"` (per-patch
            normalized pixels, the official recipe) or `"hog"` (MaskFeat's histograms of oriented gradients, 2×2
            cells per patch, 9 bins, per channel). Defaults to what `norm_pix_loss` says, so configs written before
            this field load unchanged.

    Example:

    ```python
    from maekit import MAEConfig

    config = MAEConfig.from_preset("vit-base-patch16", norm_pix_loss=True)
    assert config.num_patches == 196
    ```
    """

    model_type = "maekit_mae"
    # Further maekit model types whose config.json this class reads (subclasses widen it).
    also_loads_model_types: ClassVar[tuple[str, ...]] = ()
    # Read by AutoImageProcessor when a preprocessor_config.json does not name its class (a class attribute: never
    # serialized).
    image_processor_type = "MAEImageProcessor"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    decoder_num_attention_heads: int = 16
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    drop_path_rate: float = 0.0
    pooling: str = "mean"
    mask_strategy: str = "random"
    encoder_mask_token: bool = False
    target: str | None = None  # None: "norm_pixel" if norm_pix_loss else "pixel" (configs older than the field)

    def __post_init__(self, **kwargs):
        # An `auto_map` points Auto classes at code in a repository. A maekit config loads maekit's own classes, so
        # one found in a config.json is dropped: it never runs, and save_pretrained never writes it on.
        auto_map = kwargs.pop("auto_map", None)
        if auto_map:
            logger.warning(f"Ignoring the config's auto_map {auto_map}: a maekit config loads maekit's own classes.")
        super().__post_init__(**kwargs)
        # Reconciled without the syncing `__setattr__`, so that an invalid value is reported, not overwritten.
        if self.target is None:
            super().__setattr__("target", "norm_pixel" if self.norm_pix_loss is True else "pixel")
        elif self.target == "norm_pixel" and self.norm_pix_loss is False:
            super().__setattr__("norm_pix_loss", True)  # False may be the default: the named target says what is meant
        elif self.norm_pix_loss is True and self.target != "norm_pixel":
            raise ValueError(
                f"norm_pix_loss=True means target='norm_pixel' but target={self.target!r} was given; "
                "pass only one of them."
            )
        self.validate()

    def __setattr__(self, name, value):
        # `norm_pix_loss` and `target` say the same thing for pixel targets: after construction (once `target`
        # exists), setting one updates the other, so `config.norm_pix_loss = True` and
        # `from_pretrained(..., norm_pix_loss=True)` keep working as before the `target` field.
        constructed = "target" in self.__dict__
        super().__setattr__(name, value)
        if not constructed:
            return
        if name == "norm_pix_loss" and isinstance(value, bool):
            if value:
                super().__setattr__("target", "norm_pixel")
            elif self.target == "norm_pixel":
                super().__setattr__("target", "pixel")
        elif name == "target" and value in TARGETS:
            super().__setattr__("norm_pix_loss", value == "norm_pixel")

    @classmethod
    def _foreign_config_hint(cls, model_type: str | None) -> str:
        """What to do instead, for a config.json of another model type (subclasses add hints)."""
        return ""

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """Read the config.json of a folder or Hub repo, as transformers does, and check it is an MAE config.

        A maekit (`model_type` `"maekit_mae"`) config is returned as is, a transformers `vit_mae` one is converted
        field by field; anything else, and a folder without config.json, is an error naming the folder: transformers
        would build the default (ViT-B) config, and `from_pretrained` a model that is not the one saved.

        Raises:
            OSError: no config.json there.
            ValueError: a config.json of another model type (or none).
        """
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        source = str(pretrained_model_name_or_path)
        if not config_dict:
            raise OSError(
                f"{source} has no config.json, so the architecture of its weights is unknown (maekit never guesses "
                "it). Load it with config=MAEConfig.from_pretrained(<folder of the run that wrote it>) (or "
                "config=MAEConfig(...) with the sizes it was trained with), or copy that config.json into it."
            )
        model_type = config_dict.get("model_type")
        if model_type == "vit_mae":
            converted = {name: config_dict[name] for name in VIT_MAE_FIELDS if name in config_dict}
            return {**converted, "model_type": cls.model_type}, kwargs
        accepted = (cls.model_type, *cls.also_loads_model_types)
        if model_type not in accepted:
            found = "has no model_type" if model_type is None else f"is a {model_type!r} config"
            raise ValueError(
                f"The config.json of {source} {found}{cls._foreign_config_hint(model_type)}; {cls.__name__} loads "
                f"{' / '.join(repr(t) for t in accepted)} (maekit) and 'vit_mae' (transformers ViTMAE, converted on "
                "load) configs only."
            )
        return config_dict, kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MAEConfig:
        """Build the configuration of a published model size; keyword arguments override single fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}.")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    # Derived geometry (image_size/patch_size may be an int or (height, width); JSON turns tuples into lists).
    @property
    def image_hw(self) -> tuple[int, int]:
        return pair(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return pair(self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Number of patches along (height, width)."""
        (h, w), (p, q) = self.image_hw, self.patch_hw
        return h // p, w // q

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, p * q * num_channels."""
        p, q = self.patch_hw
        return p * q * self.num_channels

    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field. Called on construction and by the models."""
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for width, heads in (
            ("hidden_size", "num_attention_heads"),
            ("decoder_hidden_size", "decoder_num_attention_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"{width} ({getattr(self, width)}) must be divisible by {heads} ({getattr(self, heads)})."
                )
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            hw = pair(value)
            if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in hw):
                raise ValueError(
                    f"{name} must be a positive integer or a (height, width) pair of them, got {value!r}."
                )
        for axis, size, patch in zip(("height", "width"), self.image_hw, self.patch_hw):
            if size % patch:
                raise ValueError(
                    f"image_size {axis} ({size}) must be divisible by patch_size {axis} ({patch}); "
                    f"got image_size={self.image_size!r}, patch_size={self.patch_size!r}."
                )
        check_mask_ratio(self.mask_ratio, self.num_patches)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is unknown; accepted: {', '.join(sorted(ACT2FN))}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}.")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}.")
        for name in ("qkv_bias", "norm_pix_loss"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}.")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}.")
        if not isinstance(self.encoder_mask_token, bool):
            raise ValueError(f"encoder_mask_token must be True or False, got {self.encoder_mask_token!r}.")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}.")
        if self.norm_pix_loss != (self.target == "norm_pixel"):
            raise ValueError(
                f"norm_pix_loss={self.norm_pix_loss!r} contradicts target={self.target!r} "
                "(norm_pix_loss=True is target='norm_pixel'); set one of them."
            )
        if self.target == "hog" and any(side % 2 for side in self.patch_hw):
            raise ValueError(
                f"target='hog' splits each patch into 2x2 cells (MaskFeat), so patch_size must be even, "
                f"got {self.patch_size!r}."
            )
        for width in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, width) % 4:
                raise ValueError(
                    f"{width} ({getattr(self, width)}) must be divisible by 4 for 2-D sin-cos position embeddings."
                )
