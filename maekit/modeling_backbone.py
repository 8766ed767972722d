"""MAEBackbone: the MAE encoder as a transformers backbone (feature maps for segmentation and detection heads).

Feature maps are block outputs (before the encoder's final norm, as BEiT's and ViTDet's backbones) reshaped to
`(batch, hidden_size, H/p, W/p)`; with `pyramid_scales` the ViTDet simple feature pyramid (Li et al., 2022, "Exploring
Plain Vision Transformer Backbones for Object Detection") turns them into strides p/4 ... 2p. The encoder runs on all
patches at any resolution (bicubic resize of the position table) and never masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .configuration_backbone import MAEBackboneConfig
from .modeling_mae import MAEModel, MAEPreTrainedModel

__all__ = ["MAEBackbone", "MAESimpleFeaturePyramid", "LayerNorm2d"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a `(batch, channels, height, width)` map (detectron2's "LN" norm, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MAESimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: from a stride-p map, scale 4 = two 2×2 transposed convolutions (LayerNorm +
    GELU between), 2 = one, 1 = identity, 1/2 = 2×2 max pooling; each level then a 1×1 and a 3×3 convolution, each
    followed by a channel LayerNorm (no bias, as detectron2 with norm="LN")."""

    def __init__(self, dim: int, channels: int, scales: list[float]):
        super().__init__()
        self.scales = list(scales)
        self.stages = nn.ModuleList([self._stage(dim, channels, scale) for scale in self.scales])

    @staticmethod
    def _stage(dim: int, channels: int, scale: float) -> nn.Sequential:
        if scale == 4.0:
            layers = [
                nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                LayerNorm2d(dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
            ]
            width = dim // 4
        elif scale == 2.0:
            layers, width = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
        elif scale == 1.0:
            layers, width = [], dim
        elif scale == 0.5:
            layers, width = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
        else:
            raise ValueError(f"pyramid scale must be one of 4, 2, 1, 0.5, got {scale!r}.")
        layers += [
            nn.Conv2d(width, channels, kernel_size=1, bias=False),
            LayerNorm2d(channels),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(channels),
        ]
        return nn.Sequential(*layers)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One `(B, D, h, w)` map (every level built from it) or one per level -> one `(B, channels, h·s, w·s)` per
        scale s, highest resolution first."""
        if len(features) == 1:
            features = features * len(self.stages)
        return [stage(x) for stage, x in zip(self.stages, features)]


class MAEBackbone(BackboneMixin, MAEPreTrainedModel):
    """The MAE encoder as a transformers backbone (`AutoBackbone`), for UperNet, the DETR family and other heads that
    take a `backbone_config`.

    `from_pretrained` reads maekit pretraining / encoder / classification folders (the decoder and the heads are
    dropped), saved backbones, and transformers `vit_mae` folders; keyword arguments set backbone fields
    (`out_indices=[4, 6, 8, 12]`, `pyramid_scales=[4, 2, 1, 0.5]`, `drop_path_rate=0.1`). Inputs of any size run (the
    position table is resized bicubically); a size that is not a multiple of the patch size is zero-padded at the
    bottom and right first, as ViTDet pads.

    Example:

    ```python
    import torch
    from maekit import MAEBackbone, MAEBackboneConfig

    config = MAEBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8, pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=16)
    backbone = MAEBackbone(config).eval()
    maps = backbone(torch.randn(1, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 16, 32, 32), (1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4)]
    assert backbone.channels == [16, 16, 16, 16] and config.feature_strides == [2, 4, 8, 16]
    ```
    """

    config_class = MAEBackboneConfig
    config: MAEBackboneConfig
    # What a backbone does not use from pretraining / classification checkpoints: the decoder, the final encoder norm
    # (feature maps are block outputs), an encoder mask token (a backbone never masks), classification heads.
    _keys_to_ignore_on_load_unexpected = [
        r"^decoder\.",
        r"^(mae\.)?norm\.",
        r"^(mae\.)?encoder_mask_token$",
        r"^fc_norm\.",
        r"^head\.",
    ]
    # A pyramid absent from the folder (always, for pretraining folders) is new, like a classification head.
    _keys_to_ignore_on_load_missing = [r"^pyramid\."]

    def __init__(self, config: MAEBackboneConfig):
        if not isinstance(config, MAEBackboneConfig):  # e.g. AutoBackbone.from_config(MAEConfig(...))
            config = MAEBackboneConfig.from_encoder_config(config)
        super().__init__(config)
        # Feature maps are block outputs and a backbone never masks: an unused final norm or encoder mask token would
        # get no gradient (and stall DDP).
        self.mae = MAEModel(config, use_mask_token=False, final_norm=False)
        self.num_features = [config.hidden_size] * len(self.stage_names)
        self.pyramid = (
            MAESimpleFeaturePyramid(config.hidden_size, config.pyramid_channels, config.pyramid_scales)
            if config.pyramid_scales is not None
            else None
        )
        self.post_init()

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature map, in order (pyramid levels when there is a pyramid)."""
        if self.pyramid is None:
            return super().channels
        return [self.config.pyramid_channels] * len(self.pyramid.scales)

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.patch_embed

    def _init_weights(self, module: nn.Module) -> None:
        # Pyramid layers: PyTorch's default (kaiming-uniform) weights as detectron2, zero biases. Every tensor is set
        # here: parameters missing from a checkpoint are (re)initialised only through this method.
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LayerNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load from a maekit folder (pretraining, encoder, classification or backbone) or a transformers `vit_mae`
        one. Accepts every argument of `transformers.PreTrainedModel.from_pretrained` and backbone / encoder config
        fields as keyword arguments."""
        from transformers import ViTMAEConfig

        from .vit_mae_interop import HUB_KWARGS, transformers_vit_mae_config

        config = kwargs.pop("config", None)
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # the config loading below consumes it
        vit_mae = isinstance(config, ViTMAEConfig) or (
            config is None and transformers_vit_mae_config(pretrained_model_name_or_path, **hub) is not None
        )
        if config is None:
            config, kwargs = MAEBackboneConfig.from_pretrained(
                pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs
            )
            kwargs.update(hub)  # consumed by the config loading, needed again for the weights
        elif not isinstance(config, MAEBackboneConfig):
            # AutoBackbone passes the folder's own MAEConfig / ViTMAEConfig; backbone fields are still in kwargs.
            overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
            config = MAEBackboneConfig.from_encoder_config(config, **overrides)
        if vit_mae:
            if dtype is not None:
                kwargs["dtype"] = dtype
            return cls._from_vit_mae(pretrained_model_name_or_path, config, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def _from_vit_mae(cls, pretrained_model_name_or_path, config: MAEBackboneConfig, **kwargs) -> MAEBackbone:
        # maekit's own conversion (fused q/k/v, renames, legacy names) loads the encoder; the backbone takes its blocks.
        output_loading_info = kwargs.pop("output_loading_info", False)
        encoder = MAEModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = cls(config)
        state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("norm.")}
        model.mae.load_state_dict(state, strict=True)
        param = next(encoder.parameters())
        model = model.to(dtype=param.dtype).eval()
        model.config._name_or_path = str(pretrained_model_name_or_path)
        if output_loading_info:
            missing = [n for n, _ in model.named_parameters() if n.startswith("pyramid.")]
            return model, {"missing_keys": missing, "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): normalized images.
            output_hidden_states (`bool`, *optional*): also return the embeddings and every block output,
                `(batch, 1 + num_patches, hidden_size)` each (cls token first).
            output_attentions (`bool`, *optional*): also return every block's attention probabilities.

        Returns:
            `BackboneOutput` whose `feature_maps` hold one `(batch, hidden_size, H/p, W/p)` map per out feature, or
            one `(batch, pyramid_channels, H·s/p, W·s/p)` map per pyramid scale s.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        p, q = self.config.patch_hw
        pad_h, pad_w = -pixel_values.shape[-2] % p, -pixel_values.shape[-1] % q
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        out = self.mae(
            pixel_values,
            interpolate_pos_encoding=True,
            output_hidden_states=True,
            output_attentions=output_attentions,
            return_dict=True,
        )
        batch, _, height, width = pixel_values.shape
        feature_maps = [
            # (B, 1 + L, D) -> (B, D, H/p, W/p), cls token dropped
            out.hidden_states[self.stage_names.index(name)][:, 1:]
            .transpose(1, 2)
            .reshape(batch, -1, height // p, width // q)
            for name in self.out_features
        ]
        if self.pyramid is not None:
            feature_maps = self.pyramid(feature_maps)
        output = BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
        )
        return output if return_dict else output.to_tuple()


# Config fields a keyword argument of `from_pretrained` may set (beyond transformers' generic ones).
_CONFIG_FIELDS = frozenset(
    {*MAEBackboneConfig.__dataclass_fields__, "out_features", "out_indices"}
    - {*PretrainedConfig.__dataclass_fields__, "_out_features", "_out_indices"}
)
