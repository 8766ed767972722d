"""Targets: `MAEConfig.target` (pixel / norm_pixel / hog), its compatibility with `norm_pix_loss`, and HOG."""

import json
import math

import numpy as np
import pytest
import torch

from maekit import MAEConfig, MAEForPreTraining, patchify
from maekit.targets import hog_targets, target_dim

from .conftest import TINY

# config.json of a norm_pix_loss model as maekit wrote it before `target`, `mask_strategy`, `encoder_mask_token`.
OLD_CONFIG = {
    "attention_probs_dropout_prob": 0.0, "decoder_hidden_size": 32, "decoder_intermediate_size": 64,
    "decoder_num_attention_heads": 2, "decoder_num_hidden_layers": 1, "drop_path_rate": 0.0, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "hidden_size": 32, "image_size": 32, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-06, "mask_ratio": 0.75, "model_type": "maekit_mae",
    "norm_pix_loss": True, "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
    "pooling": "mean", "qkv_bias": True, "transformers_version": "5.24.0",
}  # fmt: skip


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_old_configs_load_unchanged(tmp_path, norm_pix_loss):
    (tmp_path / "config.json").write_text(json.dumps({**OLD_CONFIG, "norm_pix_loss": norm_pix_loss}))
    config = MAEConfig.from_pretrained(tmp_path)
    assert config.norm_pix_loss is norm_pix_loss and config.target == ("norm_pixel" if norm_pix_loss else "pixel")
    assert config.mask_strategy == "random" and config.encoder_mask_token is False


def test_old_model_folder_gives_the_same_loss(tmp_path):
    model = MAEForPreTraining(MAEConfig(**{**TINY, "norm_pix_loss": True})).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG))  # as written before the new fields
    loaded = MAEForPreTraining.from_pretrained(tmp_path).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = loaded(x, noise=noise)
    target = patchify(x, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((out.logits - target) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.loss, model(x, noise=noise).loss, rtol=0, atol=0)


def test_target_and_norm_pix_loss_stay_in_sync(tmp_path):
    assert MAEConfig().target == "pixel" and MAEConfig(norm_pix_loss=True).target == "norm_pixel"
    assert MAEConfig(target="norm_pixel").norm_pix_loss is True
    config = MAEConfig(target="hog")
    assert config.norm_pix_loss is False
    config.norm_pix_loss = True  # as scripts did before `target` existed
    assert config.target == "norm_pixel"
    config.norm_pix_loss = False
    assert config.target == "pixel"
    config.target = "norm_pixel"
    assert config.norm_pix_loss is True
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["target"] == "norm_pixel" and saved["norm_pix_loss"] is True
    overridden = MAEConfig.from_pretrained(tmp_path, norm_pix_loss=False)  # from_pretrained's keyword override
    assert (overridden.target, overridden.norm_pix_loss) == ("pixel", False)
    assert MAEConfig.from_pretrained(tmp_path, target="hog").norm_pix_loss is False
    # a changed target reaches the model: its head has the target's size
    assert MAEForPreTraining(MAEConfig(**TINY, target="hog")).decoder.pred.out_features == 2 * 2 * 3 * 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm_pix_loss": True, "target": "pixel"}, "norm_pix_loss=True means target='norm_pixel'"),
        ({"norm_pix_loss": True, "target": "hog"}, "norm_pix_loss=True means"),
        ({"target": "pca"}, "target must be one of"),
        ({"target": "hog", "patch_size": (8, 5), "image_size": (32, 30)}, "patch_size must be even"),
        ({"mask_strategy": "spiral"}, "mask_strategy must be one of"),
        ({"encoder_mask_token": 1}, "encoder_mask_token must be True or False"),
    ],
)
def test_invalid_new_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAEConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize("target", ["pixel", "norm_pixel", "hog"])
def test_loss_is_mse_against_the_named_target(target):
    model = MAEForPreTraining(MAEConfig(**TINY, target=target)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(x, noise=noise)
    expected_target = {
        "pixel": patchify(x, 8),
        "norm_pixel": (patchify(x, 8) - patchify(x, 8).mean(-1, keepdim=True))
        / (patchify(x, 8).var(-1, keepdim=True) + 1e-6) ** 0.5,
        "hog": hog_targets(x, 8),
    }[target]
    assert out.logits.shape == expected_target.shape == (2, 16, target_dim(model.config))
    torch.testing.assert_close(model.targets(x), expected_target)
    per_patch = ((out.logits - expected_target) ** 2).mean(-1)
    torch.testing.assert_close(out.loss, per_patch[out.mask.bool()].mean())
    out.loss.backward()


def reference_hog(image: np.ndarray, patch: int) -> np.ndarray:
    """MaskFeat's HOG written out with loops in numpy (float64): (C, H, W) -> (L, 2*2*C*9)."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    smooth = (1.0, 2.0, 1.0)
    cell = patch // 2
    hist = np.zeros((c, h // cell, w // cell, 9))
    centre, std = (patch - 1) / 2, patch / 2
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                window = padded[ch, i : i + 3, j : j + 3]  # Sobel as a cross-correlation, one term per row/column
                gx = sum(smooth[a] * (window[a, 0] - window[a, 2]) for a in range(3))
                gy = sum(smooth[a] * (window[0, a] - window[2, a]) for a in range(3))
                weight = math.exp(-0.5 * ((i % patch - centre) / std) ** 2) * math.exp(
                    -0.5 * ((j % patch - centre) / std) ** 2
                )
                orientation = math.floor(math.atan2(gx, gy) / math.pi * 9) % 9
                hist[ch, i // cell, j // cell, orientation] += math.hypot(gx, gy) * weight
    hist /= np.maximum(np.linalg.norm(hist, axis=-1, keepdims=True), 1e-12)
    rows = []
    for pr in range(h // patch):
        for pc in range(w // patch):
            cells = hist[:, 2 * pr : 2 * pr + 2, 2 * pc : 2 * pc + 2]  # (C, 2, 2, 9)
            rows.append(cells.transpose(1, 2, 0, 3).reshape(-1))  # (cell row, cell col, channel, bin)
    return np.stack(rows)


def test_hog_matches_a_loop_reference():
    images = torch.rand(2, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = hog_targets(images, 8)
    assert ours.shape == (2, 6, 2 * 2 * 3 * 9) and ours.dtype == torch.float64
    for b in range(2):
        np.testing.assert_allclose(ours[b].numpy(), reference_hog(images[b].numpy(), 8), rtol=1e-10, atol=1e-12)


def test_hog_bins_of_edges():
    vertical = torch.zeros(1, 1, 16, 16)
    vertical[..., 8:] = 1.0  # a vertical edge: horizontal gradient
    horizontal = vertical.transpose(2, 3).contiguous()
    for image, expected_bin in ((vertical, 4), (horizontal, 0)):
        cells = hog_targets(image, 8).view(4, 2, 2, 1, 9)  # patches, cell rows, cell cols, channel, bins
        hist = cells.reshape(-1, 9)
        edge_cells = hist[hist.sum(-1) > 0]
        assert len(edge_cells) > 0
        torch.testing.assert_close(edge_cells, torch.eye(9)[expected_bin].expand_as(edge_cells))
    # a flat image has no gradient: all-zero targets (not NaN)
    assert torch.equal(hog_targets(torch.ones(1, 2, 16, 16), 8), torch.zeros(1, 4, 2 * 2 * 2 * 9))


def test_hog_under_low_precision_is_float32():
    model = MAEForPreTraining(MAEConfig(**TINY, target="hog")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, noise=torch.rand(2, 16))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert model.targets(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("kwargs", [{"target": "hog"}, {"encoder_mask_token": True}])
def test_no_transformers_conversion_for_what_vit_mae_cannot_express(kwargs):
    from maekit.convert import to_transformers

    with pytest.raises(ValueError, match="transformers' ViTMAE has neither"):
        to_transformers(MAEForPreTraining(MAEConfig(**TINY, **kwargs)))
