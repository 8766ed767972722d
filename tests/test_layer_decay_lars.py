"""Layer-wise lr decay groups (official / BEiT rule) and the LARS optimizer (official linear-probe step)."""

import pytest
import torch
from torch import nn

from maekit import MAEConfig, MAEForImageClassification, MAEModel
from maekit.training.lars import LARS
from maekit.training.layer_decay import get_layer_id, param_groups_layer_decay


def _expected_assignment(model, depth, layer_decay, weight_decay, prefix):
    """name -> (layer_id, lr_scale, weight_decay), written from the official rule (util/lr_decay.py) by hand."""
    num_layers = depth + 1
    expected = {}
    for name, param in model.named_parameters():
        short = name[len(prefix) :] if name.startswith(prefix) else name
        if short in ("cls_token", "pos_embed") or short.startswith("patch_embed"):
            layer = 0
        elif short.startswith("blocks."):
            layer = int(short.split(".")[1]) + 1
        else:
            layer = num_layers
        decay = 0.0 if param.ndim == 1 or short in ("cls_token", "pos_embed") else weight_decay
        expected[name] = (layer, layer_decay ** (num_layers - layer), decay)
    return expected


def _assignment(groups):
    return {
        name: (group["layer_id"], group["lr_scale"], group["weight_decay"])
        for group in groups
        for name in group["param_names"]
    }


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_layer_decay_matches_official_rule_for_12_blocks(pooling):
    config = MAEConfig(
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=5,
        pooling=pooling,
    )
    model = MAEForImageClassification(config)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65)
    got = _assignment(groups)
    expected = _expected_assignment(model, 12, 0.65, 0.05, "mae.")
    assert {n: (layer, wd) for n, (layer, _, wd) in got.items()} == {
        n: (layer, wd) for n, (layer, _, wd) in expected.items()
    }
    assert {n: scale for n, (_, scale, _) in got.items()} == pytest.approx({n: s for n, (_, s, _) in expected.items()})
    # every trainable parameter exactly once, each group homogeneous
    assert sorted(got) == sorted(name for name, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    params = dict(model.named_parameters())
    for group in groups:
        assert all(params[n] is p for n, p in zip(group["param_names"], group["params"]))
    # spot checks of the rule on real maekit names
    assert got["mae.cls_token"] == (0, pytest.approx(0.65**13), 0.0)
    assert got["mae.patch_embed.proj.weight"] == (0, pytest.approx(0.65**13), 0.05)
    assert got["mae.blocks.0.attn.qkv.weight"] == (1, pytest.approx(0.65**12), 0.05)
    assert got["mae.blocks.11.mlp.fc2.bias"] == (12, pytest.approx(0.65), 0.0)
    assert got["head.weight"] == (13, 1.0, 0.05)
    if pooling == "mean":  # the official global-pool model: fc_norm, no final encoder norm
        assert got["fc_norm.bias"] == (13, 1.0, 0.0) and "mae.norm.weight" not in got
    else:
        assert got["mae.norm.weight"] == (13, 1.0, 0.0)
    assert len(groups) == 2 * 14  # decay and no-decay group for each of the 14 layers
    assert got["mae.pos_embed"] == (0, pytest.approx(0.65**13), 0.0)  # trained in fine-tuning, as official


def test_layer_decay_on_bare_encoder_and_frozen_params(tiny_config):
    model = MAEModel(tiny_config())
    model.patch_embed.requires_grad_(False)
    got = _assignment(param_groups_layer_decay(model, weight_decay=0.1, layer_decay=0.5))
    assert not any(name.startswith("patch_embed") for name in got)
    assert got["cls_token"] == (0, 0.125, 0.0)
    assert got["blocks.1.norm1.weight"] == (2, 0.5, 0.0)
    assert got["norm.weight"] == (3, 1.0, 0.0)
    assert get_layer_id("mae.blocks.7.attn.proj.weight", 13, prefix="mae.") == 8
    assert get_layer_id("decoder.blocks.0.attn.qkv.weight", 13, prefix="mae.") == 13


def test_layer_decay_errors():
    with pytest.raises(TypeError, match="blocks"):
        param_groups_layer_decay(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(nn.Linear(2, 2), layer_decay=0.0)


def test_lars_step_equals_hand_computation():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 4))
    bias = nn.Parameter(torch.randn(3))
    zero = nn.Parameter(torch.zeros(2, 2))  # zero norm: no trust ratio
    lr, wd, momentum, trust = 0.5, 0.1, 0.9, 0.001
    optimizer = LARS([weight, bias, zero], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    gw, gb, gz = torch.randn(3, 4), torch.randn(3), torch.randn(2, 2)

    # step 1 (fresh momentum buffers)
    weight.grad, bias.grad, zero.grad = gw.clone(), gb.clone(), gz.clone()
    optimizer.step()
    u = gw + wd * w0
    mu_w = trust * w0.norm() / u.norm() * u
    mu_b = gb  # 1-D: no weight decay, no trust ratio
    torch.testing.assert_close(weight.detach(), w0 - lr * mu_w)
    torch.testing.assert_close(bias.detach(), b0 - lr * mu_b)
    torch.testing.assert_close(zero.detach(), -lr * gz)  # ||p|| = 0: ratio 1 (weight decay of 0 adds nothing)

    # step 2 uses the momentum buffer
    w1, b1 = weight.detach().clone(), bias.detach().clone()
    weight.grad, bias.grad, zero.grad = gw.clone(), gb.clone(), None
    optimizer.step()
    u = gw + wd * w1
    mu_w = momentum * mu_w + trust * w1.norm() / u.norm() * u
    mu_b = momentum * mu_b + gb
    torch.testing.assert_close(weight.detach(), w1 - lr * mu_w)
    torch.testing.assert_close(bias.detach(), b1 - lr * mu_b)


def test_lars_zero_update_and_errors():
    param = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([param], lr=1.0)
    param.grad = torch.zeros(2, 2)
    optimizer.step()  # ||u|| = 0: ratio 1, no NaN
    torch.testing.assert_close(param.detach(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        LARS([param], momentum=1.0)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([param], trust_coefficient=0.0)
