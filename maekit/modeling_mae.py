"""Masked Autoencoder (He et al., 2021): ViT encoder on visible patches, light decoder, pixel MSE on masked ones.

Reading order follows the official `models_mae.py`: patches -> random masking -> encoder -> decoder -> loss.
Patch vectors are ordered (p, q, c): row inside the patch, column inside the patch, channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_mae import MAEConfig, check_mask_ratio
from .masking import check_mask, mask_to_noise, masking_from_noise, num_kept, random_masking, sample_mask_noise
from .patches import patchify, sincos_pos_embed_2d, unpatchify
from .targets import hog_targets, normalize_patches, target_dim

__all__ = [
    "MAEModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "MAEImageClassifierOutput",
    "MAEPreTrainedModel",
    "MAEModelOutput",
    "MAEForPreTrainingOutput",
    "patchify",
    "unpatchify",
    "sincos_pos_embed_2d",
]


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class MAEModelOutput(ModelOutput):
    """Output of `MAEModel`.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(batch, 1 + kept, hidden_size)`): final-norm features of the cls
            token and the visible patches (all patches, in image order, when no masking was asked for or with
            `config.encoder_mask_token`).
        pooler_output (`torch.Tensor` of shape `(batch, hidden_size)`): the cls token of `last_hidden_state`.
        mask (`torch.Tensor` of shape `(batch, num_patches)`): 1 for removed patches, 0 for kept; `None` without
            masking.
        ids_restore (`torch.LongTensor` of shape `(batch, num_patches)`): `argsort` of the shuffle; `None` without
            masking.
        hidden_states (`tuple(torch.Tensor)`): embeddings and the output of every block (before the final norm).
        attentions (`tuple(torch.Tensor)`): attention probabilities of every block, `(batch, heads, seq, seq)`.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MAEForPreTrainingOutput(ModelOutput):
    """Output of `MAEForPreTraining`.

    Args:
        loss (`torch.Tensor`, scalar): mean squared error over the masked patches (over all patches if none is masked).
        logits (`torch.Tensor` of shape `(batch, num_patches, target_dim)`): the prediction of every patch in the
            space of `config.target`: pixels (p·q·C values), per-patch normalized pixels, or HOG features (2·2·C·9).
        mask, ids_restore, hidden_states, attentions: as in `MAEModelOutput` (encoder side).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _resize_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Bicubic 2-D resize of a (1, 1 + gh*gw, D) table to another grid (as transformers and the official fine-tuning)."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    # Under torch.export the size comparison would become a guard that fixes the image size, so the table is resized
    # even at the same grid there (bicubic to the same size is the identity, bit for bit). `exporting` is tested
    # first: evaluating the comparison at all records the guard. torch < 2.6 has no is_exporting; is_compiling covers
    # export too.
    exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)()
    if not exporting and old_grid == new_grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=new_grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer block (timm anatomy: fused qkv, SDPA, pre-norm, drop path)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `drop_prob` while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) with the softmax in float32: (B, heads, N, N)."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


def _matmul_attention(q, k, v, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    return F.dropout(_attention_probs(q, k, scale), dropout_p, training) @ v


class MAEAttention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float, config: MAEConfig
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.config = config  # read at call time: `_attn_implementation` may change after construction
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        attn = None
        if output_attentions or self.config._attn_implementation == "eager":
            attn = _attention_probs(q, k, self.scale)  # (B, heads, N, N)
            x = F.dropout(attn, dropout_p, self.training) @ v
        elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
            # SDPA's CPU flash kernel is slow in backward at low precision while plain GEMMs are fast (measured in
            # docs/performance.md). Same math, recomputed in backward so the (B, heads, N, N) probabilities are not
            # kept, as with SDPA.
            x = checkpoint(_matmul_attention, q, k, v, self.scale, dropout_p, self.training, use_reentrant=False)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))
        return x, (attn if output_attentions else None)


class MAEMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class MAEBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: MAEConfig, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = MAEAttention(
            dim, num_heads, config.qkv_bias, config.attention_probs_dropout_prob, config.hidden_dropout_prob, config
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MAEMlp(dim, mlp_dim, config.hidden_act, config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, attn = self.attn(self.norm1(x), output_attentions)
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


# ----------------------------------------------------------------------------------------------------------------------
# Base class: init, conversion on load


class MAEPreTrainedModel(PreTrainedModel):
    """Weight init as the official code, and `from_pretrained` that also reads transformers `vit_mae` checkpoints."""

    config_class = MAEConfig
    config: MAEConfig
    base_model_prefix = "mae"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MAEBlock"]
    _supports_sdpa = True
    has_decoder = False  # whether the class holds the MAE decoder (what a `vit_mae` checkpoint is loaded through)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # `MAEAttention` reads `config._attn_implementation` at every call, so switching after loading works.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection, initialised like a Linear as official
            # The view drops the "loaded from the checkpoint" flag the init functions check; without this test a
            # transformers model holding a maekit one (UperNet + MAEBackbone) re-initialises it after loading.
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            init.zeros_(module.bias)
        elif isinstance(module, MAEModel):
            init.normal_(module.cls_token, std=std)
            if module.encoder_mask_token is not None:
                init.normal_(module.encoder_mask_token, std=std)
            init.copy_(module.pos_embed, sincos_pos_embed_2d(module.pos_embed.shape[-1], self.config.grid_size))
        elif isinstance(module, MAEDecoder):
            if module.mask_token is not None:
                init.normal_(module.mask_token, std=std)
            init.copy_(module.pos_embed, sincos_pos_embed_2d(module.pos_embed.shape[-1], self.config.grid_size))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a maekit folder or Hub repo, or a transformers `vit_mae` one (converted on load).

        Accepts every argument of `transformers.PreTrainedModel.from_pretrained`.
        """
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            from .vit_mae_interop import load_transformers_vit_mae, transformers_vit_mae_config

            config_dict = transformers_vit_mae_config(pretrained_model_name_or_path, **kwargs)
            if config_dict is not None:
                return load_transformers_vit_mae(cls, pretrained_model_name_or_path, config_dict, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Encoder


class MAEPatchEmbed(nn.Module):
    """Linear projection of p×q patches. Stored as a Conv2d (official / timm layout) but applied as a matmul on
    gathered patch vectors, so masked patches are never embedded."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.patch_size = config.patch_hw
        self.proj = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C*p*q): the (c, p, q) order of the conv weight, so a matmul equals the conv."""
        p, q = self.patch_size
        b, c, h, w = pixel_values.shape
        x = pixel_values.reshape(b, c, h // p, p, w // q, q)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // q), c * p * q)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B or 1, L, D), ids (B, K) -> (B, K, D) without materialising repeated indices."""
    if x.shape[0] != ids.shape[0]:
        x = x.expand(ids.shape[0], -1, -1)
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MAEModel(MAEPreTrainedModel):
    """The MAE ViT encoder. Without `mask_ratio`/`noise`/`mask` it embeds every patch (features for downstream use);
    with them it encodes only the visible patches, as during pretraining (or, with `config.encoder_mask_token`, every
    patch with the removed ones replaced by a learned mask token).

    Args:
        config (`MAEConfig`): the model configuration.
        use_mask_token (`bool`, *optional*): create the encoder mask token; defaults to `config.encoder_mask_token`.
            The classifier passes `False`: it never masks, and an unused parameter would stall DDP.

    Example:

    ```python
    import torch
    from maekit import MAEConfig, MAEModel

    config = MAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    model = MAEModel(config).eval()
    features = model(torch.randn(2, 3, 32, 32)).last_hidden_state  # (2, 1 + 16, 32)
    assert features.shape == (2, 17, 32)
    ```
    """

    # A pretraining checkpoint also holds the decoder: loading just the encoder from it is expected, not an error.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(
        self,
        config: MAEConfig,
        use_mask_token: bool | None = None,
        trainable_pos_embed: bool = False,
        final_norm: bool = True,
    ):
        """
        Args:
            config (`MAEConfig`): the architecture.
            use_mask_token (`bool`, *optional*): hold the encoder mask token (default: `config.encoder_mask_token`).
            trainable_pos_embed (`bool`): the position table is a trained parameter initialised with the sin-cos table
                (official fine-tuning, timm's `VisionTransformer`) instead of a fixed buffer (pretraining).
            final_norm (`bool`): end with a LayerNorm (else an `nn.Identity`: a mean-pooling head norms itself).
        """
        super().__init__(config)
        config.validate()
        self.patch_embed = MAEPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        use_mask_token = config.encoder_mask_token if use_mask_token is None else use_mask_token
        # Not `mask_token`: in the official key layout that name is the decoder's.
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        # The sin-cos table, persistent either way so checkpoints carry it, as the official and transformers ones.
        table = torch.zeros(1, 1 + config.num_patches, config.hidden_size)
        if trainable_pos_embed:
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table)
        depth = config.num_hidden_layers
        dpr = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth, as timm
        self.blocks = nn.ModuleList(
            [
                MAEBlock(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, dpr[i])
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if final_norm else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values has dtype {pixel_values.dtype}; MAE models take floating-point images normalized with "
                "the model's mean and std (any float dtype, cast to the model's). Prepare images with "
                "MAEImageProcessor (or maekit.data's transforms), or by hand: (x.float() / 255 - mean) / std."
            )
        b, c, h, w = pixel_values.shape
        if b == 0:
            raise ValueError(
                f"pixel_values is an empty batch (shape {tuple(pixel_values.shape)}); pass at least one image."
            )
        if c != self.config.num_channels:
            raise ValueError(f"pixel_values has {c} channels but config.num_channels is {self.config.num_channels}.")
        p, q = self.config.patch_hw
        if interpolate_pos_encoding:
            if h % p or w % q:
                raise ValueError(f"pixel_values size {h}x{w} must be divisible by patch_size {p}x{q}.")
        elif (h, w) != self.config.image_hw:
            raise ValueError(
                f"pixel_values size {h}x{w} does not match config.image_size {self.config.image_hw}; "
                "pass interpolate_pos_encoding=True to run at another resolution."
            )
        return h // p, w // q

    def _masking(self, batch: int, grid: tuple[int, int], mask_ratio, noise, mask, device) -> tuple:
        """(ids_keep, mask, ids_restore) of this call, or three `None` when nothing is masked."""
        length = grid[0] * grid[1]
        if mask is not None:
            if noise is not None:
                raise ValueError("Pass either noise= or mask=, not both: both choose the removed patches.")
            kept = check_mask(mask, batch, length)
            if mask_ratio is not None and num_kept(length, mask_ratio) != kept:
                raise ValueError(
                    f"mask keeps {kept} of {length} patches but mask_ratio={mask_ratio!r} keeps "
                    f"{num_kept(length, mask_ratio)}; leave mask_ratio out (the mask sets the count)."
                )
            return masking_from_noise(mask_to_noise(mask).to(device), kept)
        if mask_ratio is None and noise is None:
            return None, None, None
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio, length)
        if noise is not None and tuple(noise.shape) != (batch, length):
            raise ValueError(
                f"noise must have shape (batch, num_patches) = {(batch, length)}, got {tuple(noise.shape)}."
            )
        if noise is None and self.config.mask_strategy != "random":
            noise = sample_mask_noise(self.config.mask_strategy, batch, grid, mask_ratio)
        return random_masking(batch, length, mask_ratio, noise, device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> MAEModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): normalized images.
            mask_ratio (`float`, *optional*): remove this fraction of patches, chosen by `config.mask_strategy`.
                Default: no masking, unless `noise` is given, which masks with `config.mask_ratio`.
            noise (`torch.Tensor` of shape `(batch, num_patches)`, *optional*): masking noise; the
                `int(L * (1 - mask_ratio))` patches with the smallest values are kept. Makes masking reproducible;
                `maekit.masking.sample_mask_noise` draws it for every strategy.
            interpolate_pos_encoding (`bool`): run at a resolution other than `config.image_size` by bicubic resizing
                of the position table.
            mask (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): the patches to remove (True), the
                same number in every sample; instead of `noise`. It sets the kept count: a `mask_ratio` given with it
                must agree.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        grid = self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)  # float64/16 pixels: as transformers' ViT
        pos_embed = self.pos_embed
        if interpolate_pos_encoding:
            pos_embed = _resize_pos_embed(pos_embed, self.config.grid_size, grid)
        patches = self.patch_embed.patches(pixel_values)  # (B, L, C*p*q)
        batch, length = patches.shape[:2]

        ids_keep, mask, ids_restore = self._masking(batch, grid, mask_ratio, noise, mask, pixel_values.device)
        patch_pos = pos_embed[:, 1:]
        if mask is None:
            x = self.patch_embed(patches) + patch_pos  # (B, L, D)
        elif self.encoder_mask_token is not None:
            # SimMIM-style: every patch is encoded, removed ones replaced by the mask token (position kept).
            x = self.patch_embed(patches)
            x = torch.where(mask.bool().unsqueeze(-1), self.encoder_mask_token.to(x.dtype), x) + patch_pos  # (B, L, D)
        else:
            # (B, kept, C*p*q): only visible patches get embedded
            x = self.patch_embed(_gather_tokens(patches, ids_keep)) + _gather_tokens(patch_pos, ids_keep)
        cls = (self.cls_token + pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + kept, D), or (B, 1 + L, D) without masking / with mask tokens

        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        for block in self.blocks:
            x, attn = block(x, output_attentions)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (attn,)
        x = self.norm(x)

        out = MAEModelOutput(
            last_hidden_state=x,
            pooler_output=x[:, 0],
            mask=mask,
            ids_restore=ids_restore,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Decoder and pretraining head


class MAEDecoder(nn.Module):
    """Narrow ViT that sees encoder tokens plus a shared mask token for every removed patch, and predicts the target
    of every patch. With `config.encoder_mask_token` the encoder output already holds every patch: no mask token."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = config
        dim = config.decoder_hidden_size
        self.embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = None if config.encoder_mask_token else nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.zeros(1, 1 + config.num_patches, dim))
        self.blocks = nn.ModuleList(
            [
                MAEBlock(config, dim, config.decoder_num_attention_heads, config.decoder_intermediate_size)
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pred = nn.Linear(dim, target_dim(config))

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(latent)  # (B, 1 + kept, Dd)
        if self.mask_token is not None:
            batch, length = x.shape[0], ids_restore.shape[1]
            mask_tokens = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
            x_ = _gather_tokens(x_, ids_restore)  # unshuffle
            x = torch.cat([x[:, :1], x_], dim=1)
        x = x + _resize_pos_embed(self.pos_embed, self.config.grid_size, grid)  # (B, 1 + L, Dd)
        for block in self.blocks:
            x, _ = block(x)
        x = self.pred(self.norm(x))
        return x[:, 1:]  # (B, L, p*q*C), cls dropped


class MAEForPreTraining(MAEPreTrainedModel):
    """MAE encoder + decoder with the pixel reconstruction loss.

    Example:

    ```python
    import torch
    from maekit import MAEConfig, MAEForPreTraining

    config = MAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=32, patch_size=8)
    model = MAEForPreTraining(config)
    out = model(torch.randn(2, 3, 32, 32))
    out.loss.backward()
    assert out.logits.shape == (2, 16, 8 * 8 * 3) and out.mask.sum() == 2 * 12
    ```
    """

    has_decoder = True

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.mae = MAEModel(config)
        self.decoder = MAEDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.patch_embed

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*q*C) in the layout of `logits`."""
        return patchify(pixel_values, self.config.patch_hw)

    def unpatchify(self, patches: torch.Tensor, image_size=None) -> torch.Tensor:
        """(B, L, p*q*C) -> (B, C, H, W); `image_size` defaults to `config.image_size`."""
        size = self.config.image_hw if image_size is None else image_size
        return unpatchify(patches, self.config.patch_hw, size, self.config.num_channels)

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses, `config.target` of every patch: (B, C, H, W) -> (B, L, target_dim), in float32
        (float64 stays float64)."""
        dtype = torch.promote_types(pixel_values.dtype, torch.float32)
        if self.config.target == "hog":
            return hog_targets(pixel_values.to(dtype), self.config.patch_hw)
        target = self.patchify(pixel_values).to(dtype)
        return normalize_patches(target) if self.config.target == "norm_pixel" else target

    def forward_loss(
        self, pixel_values: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Per-patch MSE against `targets(pixel_values)`, averaged over removed patches: over the whole batch
        (`reduction="mean"`, a scalar) or per image (`reduction="none"`, shape `(batch,)`)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
        # In float32 whatever the model dtype (as autocast does): a bf16/fp16 sum over a large batch overflows or
        # rounds, and so do the per-patch statistics of norm_pix_loss.
        dtype = torch.promote_types(pred.dtype, torch.float32)  # float64 stays float64
        target, pred = self.targets(pixel_values.to(dtype)), pred.to(dtype)
        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        dim = None if reduction == "mean" else 1  # None: over the whole batch
        removed = mask.sum(dim=dim)
        # mask_ratio 0 (nothing removed): plain autoencoding over all patches. torch.where avoids a host sync.
        return torch.where(removed > 0, (loss * mask).sum(dim=dim) / removed.clamp(min=1), loss.mean(dim=dim))

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> MAEForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): normalized images.
            noise (`torch.Tensor` of shape `(batch, num_patches)`, *optional*): masking noise (reproducible masks;
                `maekit.masking.sample_mask_noise` draws it for every strategy). Without `noise` or `mask`, the
                model draws a mask of `config.mask_strategy` from the global RNG.
            mask_ratio (`float`, *optional*): defaults to `config.mask_ratio`.
            interpolate_pos_encoding (`bool`): run at another resolution (bicubic 2-D resize of both position tables).
            mask (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): the patches to remove (True), the
                same number in every sample; instead of `noise`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if mask is None and mask_ratio is None:
            mask_ratio = self.config.mask_ratio
        enc = self.mae(
            pixel_values,
            mask_ratio=mask_ratio,
            noise=noise,
            mask=mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        p, q = self.config.patch_hw
        grid = (pixel_values.shape[2] // p, pixel_values.shape[3] // q)
        logits = self.decoder(enc.last_hidden_state, enc.ids_restore, grid)
        loss = self.forward_loss(pixel_values, logits, enc.mask)
        out = MAEForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=enc.mask,
            ids_restore=enc.ids_restore,
            hidden_states=enc.hidden_states,
            attentions=enc.attentions,
        )
        return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------------------------------
# Classification head (fine-tuning / linear probing)


@dataclass
class MAEImageClassifierOutput(ModelOutput):
    """Output of `MAEForImageClassification`.

    Args:
        loss (`torch.Tensor`, scalar): cross-entropy against `labels` (soft cross-entropy for (batch, num_labels)
            soft targets, as produced by mixup/cutmix), when labels are given.
        logits (`torch.Tensor` of shape `(batch, num_labels)`): class scores.
        pooled_output (`torch.Tensor` of shape `(batch, hidden_size)`): the features the head sees.
        hidden_states, attentions: as in `MAEModelOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooled_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class MAEForImageClassification(MAEPreTrainedModel):
    """MAE encoder (no masking) + pooling + linear head, as the official fine-tuning model.

    `config.pooling == "mean"`: mean of the patch tokens of the last block (before the encoder's final norm), then
    `fc_norm` (the official `global_pool`). `"cls"`: the cls token after the final norm. The head is initialised
    trunc_normal(std 2e-5) as in the official fine-tuning code.
    """

    # Loading a pretraining checkpoint: the decoder (and, with mean pooling, the final norm) is dropped and the new
    # head initialised on purpose, without a wall of load-report warnings.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^mae\.norm\.", r"^mae\.encoder_mask_token$"]
    _keys_to_ignore_on_load_missing = [r"^head\.", r"^fc_norm\."]

    def __init__(self, config: MAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        # As official fine-tuning (timm's VisionTransformer): never masks; the position table starts from the
        # pretrained sin-cos one and is trained (layer 0 for layer decay, no weight decay); with mean pooling no final
        # encoder norm (the official global-pool model: it would get no gradient and stall DDP).
        self.mae = MAEModel(
            config, use_mask_token=False, trainable_pos_embed=True, final_norm=config.pooling != "mean"
        )
        self.fc_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pooling == "mean" else None
        )
        self.head = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "head", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=2e-5)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.mae.patch_embed

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> MAEImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch, num_channels, height, width)`): normalized images.
            labels (`torch.LongTensor` of shape `(batch,)` or `torch.Tensor` of shape `(batch, num_labels)`):
                class indices (cross-entropy) or soft targets (soft cross-entropy).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        enc = self.mae(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        if self.fc_norm is not None:  # mean pooling: the encoder's final norm is an Identity here
            pooled = self.fc_norm(enc.last_hidden_state[:, 1:].mean(dim=1))
        else:
            pooled = enc.last_hidden_state[:, 0]
        logits = self.head(pooled)
        loss = None
        if labels is not None:
            if labels.ndim == 2 and labels.is_floating_point():
                loss = torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            elif labels.ndim == 1:
                loss = F.cross_entropy(logits.float(), labels)
            else:
                raise ValueError(
                    f"labels must be class indices of shape (batch,) or soft targets of shape (batch, num_labels), "
                    f"got {tuple(labels.shape)} {labels.dtype}."
                )
        out = MAEImageClassifierOutput(
            loss=loss,
            logits=logits,
            pooled_output=pooled,
            hidden_states=enc.hidden_states,
            attentions=enc.attentions,
        )
        return out if return_dict else out.to_tuple()
