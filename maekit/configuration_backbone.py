"""MAEBackboneConfig: an MAE encoder configuration plus what a dense-prediction head needs from it.

A separate class (not fields on `MAEConfig`) so that pretraining and classification configs stay exactly as they are,
while transformers' backbone machinery (`AutoBackbone`, `UperNetConfig(backbone_config=...)`, the DETR family) gets
the `out_features` / `out_indices` / `stage_names` it expects. Stages follow transformers' ViT backbones (Dinov2,
VitDet): `"stem"` is the patch embedding, `"stageN"` the output of block N.
"""

from __future__ import annotations

from typing import ClassVar

from transformers.backbone_utils import BackboneConfigMixin

from .configuration_mae import MAEConfig

__all__ = ["MAEBackboneConfig", "PYRAMID_SCALES"]

# Scales the ViTDet simple feature pyramid builds (Li et al. 2022, Fig. 2c): 4 and 2 with transposed convolutions,
# 1 as is, 1/2 with max pooling.
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
# Keys of a config.json that belong to the checkpoint, not to the encoder geometry.
_NOT_COPIED = ("model_type", "transformers_version", "architectures")


class MAEBackboneConfig(BackboneConfigMixin, MAEConfig):
    r"""Configuration of `MAEBackbone`: every `MAEConfig` field plus the backbone outputs.

    Args:
        out_features (`list[str]`, *optional*): stages whose feature maps are returned, from `"stem"`, `"stage1"`, ...,
            `f"stage{num_hidden_layers}"`. Defaults to the last block.
        out_indices (`list[int]`, *optional*): the same as indices into `stage_names` (negative indices count from
            the end); give one of `out_features` / `out_indices`.
        pyramid_scales (`list[float]`, *optional*): build the ViTDet simple feature pyramid with these scales,
            strictly decreasing, each one of 4, 2, 1, 0.5 (`[4, 2, 1, 0.5]` gives strides p/4 ... 2p: 4, 8, 16, 32 for
            patch 16). With one out feature every scale is built from it (ViTDet); with as many out features as
            scales, scale i is built from out feature i (the BEiT / MAE segmentation multi-level features).
            `None` (default): the plain `(batch, hidden_size, H/p, W/p)` block outputs.
        pyramid_channels (`int`, defaults to 256): channels of every pyramid level (ViTDet's `out_channels`).

    All other arguments are those of `MAEConfig` (the encoder); the decoder fields are kept but unused.

    Example:

    ```python
    from maekit import MAEBackboneConfig

    config = MAEBackboneConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8, out_indices=[2, 4])
    assert config.out_features == ["stage2", "stage4"] and config.stage_names[0] == "stem"
    ```
    """

    model_type = "maekit_mae_backbone"
    also_loads_model_types: ClassVar[tuple[str, ...]] = ("maekit_mae",)

    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    pyramid_scales: list[float] | None = None
    pyramid_channels: int = 256

    def __post_init__(self, **kwargs):
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        kwargs.pop("stage_names", None)  # derived from num_hidden_layers; a saved copy is not authoritative
        super().__post_init__(**kwargs)  # MAEConfig's: sets the fields and validates them
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        if isinstance(out_indices, tuple):
            out_indices = list(out_indices)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.validate()

    @classmethod
    def from_encoder_config(cls, config, **overrides) -> MAEBackboneConfig:
        """A backbone config with the encoder of `config` (`MAEConfig`, `MAEBackboneConfig` or transformers'
        `ViTMAEConfig`); keyword arguments override single fields (`out_indices=[4, 8]`, `drop_path_rate=0.1`)."""
        from transformers import ViTMAEConfig

        if isinstance(config, ViTMAEConfig):
            from .vit_mae_interop import config_from_transformers

            config = config_from_transformers(config)
        if not isinstance(config, MAEConfig):
            raise TypeError(
                f"config must be a MAEConfig, MAEBackboneConfig or transformers ViTMAEConfig, got {type(config).__name__}."
            )
        fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_COPIED}
        if any(k in overrides for k in ("out_features", "out_indices", "num_hidden_layers")):
            fields.pop("out_features", None)  # a selection made for another depth or replaced by the override
            fields.pop("out_indices", None)
        return cls(**{**fields, **overrides})

    @classmethod
    def _foreign_config_hint(cls, model_type: str | None) -> str:
        return (
            " (a segmentation model: load it with AutoModelForSemanticSegmentation)" if model_type == "upernet" else ""
        )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """Read a maekit (`maekit_mae` or `maekit_mae_backbone`) or transformers `vit_mae` config.json as a backbone
        config, so `MAEBackboneConfig.from_pretrained(pretraining_folder, out_indices=...)` works."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        config_dict = {k: v for k, v in config_dict.items() if k not in _NOT_COPIED}
        return {**config_dict, "model_type": cls.model_type}, kwargs

    @property
    def feature_strides(self) -> list[float]:
        """Stride in pixels of every feature map the backbone returns: patch size / scale for pyramid levels, the
        patch size for plain block outputs (the patch height; for a non-square patch the width stride is
        `patch_size[1] / scale`)."""
        p = self.patch_hw[0]
        if self.pyramid_scales is None:
            return [float(p)] * len(self.out_features)
        return [p / scale for scale in self.pyramid_scales]

    def validate(self) -> None:
        """`MAEConfig.validate` plus the pyramid fields."""
        super().validate()
        if self.pyramid_scales is not None:
            scales = self.pyramid_scales
            if (
                not isinstance(scales, (list, tuple))
                or not scales
                or any(isinstance(s, bool) or s not in PYRAMID_SCALES for s in scales)
                or any(a <= b for a, b in zip(scales, scales[1:]))
            ):
                raise ValueError(
                    f"pyramid_scales must be a strictly decreasing list of values from {list(PYRAMID_SCALES)}, "
                    f"got {scales!r}."
                )
        if (
            self.pyramid_scales is not None
            and self._out_features is not None
            and len(self._out_features) not in (1, len(self.pyramid_scales))
        ):
            raise ValueError(
                f"With pyramid_scales={list(self.pyramid_scales)} the pyramid is built from one out feature or from one "
                f"per scale ({len(self.pyramid_scales)}); got out_features={self._out_features}."
            )
        value = self.pyramid_channels
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"pyramid_channels must be a positive integer, got {value!r}.")
