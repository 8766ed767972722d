import json
import math

import numpy as np
import pytest
import torch

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel, patchify, unpatchify
from maekit.modeling_mae import MAEAttention, sincos_pos_embed_2d

from .conftest import official_sincos


@pytest.mark.parametrize("dim, grid", [(32, (4, 4)), (64, (3, 5)), (768, (14, 14))])
def test_sincos_matches_official_layout(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)[0].double().numpy()
    np.testing.assert_allclose(ours, official_sincos(dim, *grid), atol=1e-6)


def test_position_tables_are_fixed_buffers_not_parameters(tiny_config):
    model = MAEForPreTraining(tiny_config())
    names = {n for n, _ in model.named_parameters()}
    assert "mae.pos_embed" not in names and "decoder.pos_embed" not in names
    assert {"mae.pos_embed", "decoder.pos_embed"} <= set(model.state_dict())
    torch.testing.assert_close(model.mae.pos_embed, sincos_pos_embed_2d(32, (4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.pos_embed, sincos_pos_embed_2d(32, (4, 4)), rtol=0, atol=0)


def test_official_initialisation(tiny_config):
    model = MAEForPreTraining(tiny_config(hidden_size=64, num_attention_heads=4, intermediate_size=256))
    qkv = model.mae.blocks[0].attn.qkv
    bound = math.sqrt(6 / (qkv.in_features + qkv.out_features))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(qkv.bias) == 0
    proj = model.mae.patch_embed.proj.weight  # xavier on the flattened (D, C*p*q) view
    bound = math.sqrt(6 / (proj.shape[0] + proj[0].numel()))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.8 * bound
    assert torch.all(model.mae.norm.weight == 1) and torch.all(model.mae.norm.bias == 0)
    for token in (model.mae.cls_token, model.decoder.mask_token):
        assert 0.005 < token.std().item() < 0.05 and token.abs().max() < 0.2


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 4, 16, 24)
    patches = patchify(x, (8, 4))
    assert patches.shape == (2, 2 * 6, 8 * 4 * 4)
    # patch (row 1, col 2) starts at pixel (8, 8); vector index (p, q, c) = (p * 4 + q) * C + c
    assert patches[0, 1 * 6 + 2, (3 * 4 + 1) * 4 + 2] == x[0, 2, 8 + 3, 8 + 1]
    torch.testing.assert_close(unpatchify(patches, (8, 4), (16, 24)), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch"):
        unpatchify(patches, (8, 4), (16, 16))


def test_masking_semantics(tiny_config):
    model = MAEForPreTraining(tiny_config(mask_ratio=0.75)).eval()
    noise = torch.rand(3, 16)
    out = model(torch.randn(3, 3, 32, 32), noise=noise)
    keep = int(16 * 0.25)
    assert out.mask.shape == (3, 16) and torch.all(out.mask.sum(1) == 16 - keep)
    # the kept patches are those with the smallest noise; ids_restore undoes the shuffle
    kept = noise.argsort(1)[:, :keep]
    assert torch.all(out.mask.gather(1, kept) == 0)
    shuffle = noise.argsort(1)
    assert torch.equal(shuffle.gather(1, out.ids_restore), torch.arange(16).expand(3, -1))
    # different samples get different masks without noise
    masks = model(torch.randn(8, 3, 32, 32)).mask
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_model_defaults_to_no_masking(tiny_config):
    model = MAEModel(tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.last_hidden_state.shape == (2, 17, 32) and out.mask is None and out.ids_restore is None
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    masked = model(x, mask_ratio=0.5)
    assert masked.last_hidden_state.shape == (2, 9, 32) and masked.mask.sum() == 16
    assert model(x, noise=torch.rand(2, 16)).last_hidden_state.shape == (2, 1 + 4, 32)  # config.mask_ratio
    # mask_ratio=0 with noise keeps every patch (shuffled) and is equivalent up to order
    full = model(x, noise=torch.rand(2, 16), mask_ratio=0.0)
    assert full.last_hidden_state.shape == (2, 17, 32) and full.mask.sum() == 0


def test_unmasked_forward_equals_masked_forward_on_kept_patches(tiny_config):
    """Embedding only the kept patches must give the same tokens as embedding all and gathering."""
    model = MAEModel(tiny_config(num_hidden_layers=1)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    tokens = model(x, noise=noise, mask_ratio=0.5).hidden_states
    assert tokens is None
    masked = model(x, noise=noise, mask_ratio=0.5, output_hidden_states=True).hidden_states[0]
    full = model(x, output_hidden_states=True).hidden_states[0]
    kept = noise.argsort(1)[:, :8]
    torch.testing.assert_close(masked[:, 1:], full[:, 1:].gather(1, kept[..., None].expand(-1, -1, 32)))


def test_loss_is_mse_on_masked_patches(tiny_config):
    for norm_pix in (False, True):
        model = MAEForPreTraining(tiny_config(norm_pix_loss=norm_pix)).eval()
        x = torch.randn(2, 3, 32, 32)
        out = model(x, noise=torch.rand(2, 16))
        target = patchify(x, 8)
        if norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((out.logits - target) ** 2).mean(-1)
        expected = per_patch[out.mask.bool()].mean()
        torch.testing.assert_close(out.loss, expected)


def test_loss_without_masking_is_plain_autoencoding(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, mask_ratio=0.0)
    assert out.mask.sum() == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ((out.logits - patchify(x, 8)) ** 2).mean())


@pytest.mark.parametrize("channels", [1, 4])
def test_any_channel_count_and_non_square(tiny_config, channels):
    config = tiny_config(num_channels=channels, image_size=(32, 48), patch_size=(8, 4))
    model = MAEForPreTraining(config)
    x = torch.randn(2, channels, 32, 48)
    out = model(x)
    assert out.logits.shape == (2, 48, 8 * 4 * channels)
    assert model.unpatchify(model.patchify(x)).equal(x)
    out.loss.backward()
    assert model.mae.patch_embed.proj.weight.grad is not None


def test_eager_and_sdpa_agree_and_attentions(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    sdpa = model(x, noise=noise)
    assert model.config._attn_implementation == "sdpa"
    with_attn = model(x, noise=noise, output_attentions=True)
    assert len(with_attn.attentions) == 2 and with_attn.attentions[0].shape == (2, 2, 5, 5)
    torch.testing.assert_close(with_attn.attentions[0].sum(-1), torch.ones(2, 2, 5))
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.profiler.profile() as prof:
        eager = model(x, noise=noise)
    assert not any("scaled_dot_product" in event.key for event in prof.key_averages())
    torch.testing.assert_close(eager.logits, sdpa.logits, atol=1e-5, rtol=1e-5)


def test_eager_selectable_at_load(tiny_config, tmp_path):
    MAEModel(tiny_config()).save_pretrained(tmp_path)
    model = MAEModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_hidden_states_and_tuple_outputs(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(x, noise=noise, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 5, 32)
    tup = model(x, noise=noise, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)
    enc = MAEModel(tiny_config()).eval()(x, return_dict=False)
    assert isinstance(enc, tuple) and len(enc) == 2 and enc[0].shape == (2, 17, 32)


def test_interpolate_pos_encoding(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x = torch.randn(2, 3, 48, 64)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(x)
    out = model(x, interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 6 * 8, 192) and torch.isfinite(out.loss)
    enc = MAEModel(tiny_config()).eval()
    assert enc(x, interpolate_pos_encoding=True).last_hidden_state.shape == (2, 1 + 48, 32)
    # same size with interpolation requested is the plain forward
    y, noise = torch.randn(1, 3, 32, 32), torch.rand(1, 16)
    torch.testing.assert_close(model(y, noise=noise, interpolate_pos_encoding=True).loss, model(y, noise=noise).loss)


@pytest.mark.parametrize(
    "kwargs, pixels, match",
    [
        ({}, torch.randn(2, 1, 32, 32), "channels"),
        ({}, torch.randn(2, 3, 40, 32), "image_size"),
        ({"interpolate_pos_encoding": True}, torch.randn(2, 3, 36, 32), "divisible"),
        ({"noise": torch.rand(2, 15)}, torch.randn(2, 3, 32, 32), "noise"),
        ({"mask_ratio": 1.0}, torch.randn(2, 3, 32, 32), "mask_ratio"),
        ({}, torch.randn(3, 32, 32), "batch, channels, height, width"),
    ],
)
def test_bad_inputs(tiny_config, kwargs, pixels, match):
    model = MAEForPreTraining(tiny_config())
    with pytest.raises(ValueError, match=match):
        model(pixels, **kwargs)


def test_bf16_autocast_close_to_fp32(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    ref = model(x, noise=noise).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, noise=noise).loss
    assert torch.isfinite(low) and abs(low.item() - ref.item()) < 0.05 * ref.item()


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(1)
    model = MAEForPreTraining(tiny_config())
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    model(x, noise=noise).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    calls = []
    model.mae.blocks[0].norm1.register_forward_hook(lambda *args: calls.append(1))
    model(x, noise=noise).loss.backward()
    assert len(calls) == 2  # the block ran again during backward: activations were not kept
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_drop_path_only_in_training(tiny_config):
    model = MAEModel(tiny_config(drop_path_rate=0.5))
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.0, 0.5]
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x).last_hidden_state, model(x).last_hidden_state)
    model.train()
    assert not torch.allclose(model(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classification_head(tiny_config, pooling):
    model = MAEForImageClassification(tiny_config(pooling=pooling, num_labels=5)).eval()
    assert model.head.weight.std() < 1e-4  # trunc_normal(std 2e-5)
    x = torch.randn(3, 3, 32, 32)
    out = model(x, labels=torch.tensor([0, 1, 4]))
    assert out.logits.shape == (3, 5) and torch.isfinite(out.loss)
    soft = torch.full((3, 5), 0.2)
    torch.testing.assert_close(model(x, labels=soft).loss, -(soft * out.logits.log_softmax(-1)).sum(-1).mean())
    hidden = model.mae(x, output_hidden_states=True)
    if pooling == "mean":
        expected = model.fc_norm(hidden.hidden_states[-1][:, 1:].mean(1))
    else:
        expected = hidden.last_hidden_state[:, 0]
    torch.testing.assert_close(out.pooled_output, expected)
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=torch.zeros(3, 5, 2))
    model.train()
    model(x, labels=torch.tensor([0, 1, 4])).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # every parameter gets a gradient: DDP needs no find_unused_parameters


def test_cpu_low_precision_training_attention_runs_as_gemms_with_sdpa_numerics():
    torch.manual_seed(0)
    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    attn = MAEAttention(32, 2, True, 0.0, 0.0, config)
    x = torch.randn(2, 17, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.profiler.profile() as prof:
            out = attn(x)[0]
        with torch.no_grad():
            ref = attn(x)[0]  # inference keeps SDPA
    assert not any("scaled_dot_product" in event.key for event in prof.key_averages())
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().pow(2).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    attn(x)[0].pow(2).sum().backward()  # fp32 SDPA reference
    torch.testing.assert_close(grad, x.grad, atol=5e-2, rtol=5e-2)


def test_loss_is_computed_in_float32_for_low_precision_models(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(64, 3, 32, 32), torch.rand(64, 16)
    reference = model(x, noise=noise).loss
    half = model.to(torch.bfloat16)(x.bfloat16(), noise=noise)
    assert half.loss.dtype == torch.float32 and half.mask.dtype == torch.float32
    assert abs(half.loss.item() - reference.item()) < 0.02 * reference.item()


def test_classifier_trains_its_position_table_as_official_fine_tuning(tiny_config):
    model = MAEForImageClassification(tiny_config(num_labels=3))
    assert isinstance(model.mae.pos_embed, torch.nn.Parameter) and model.mae.pos_embed.requires_grad
    torch.testing.assert_close(model.mae.pos_embed.detach(), sincos_pos_embed_2d(32, (4, 4)), rtol=0, atol=0)
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2])).loss.backward()
    assert model.mae.pos_embed.grad is not None


def test_per_image_loss_equals_the_loss_of_each_image(tiny_config):
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True)).eval()
    x, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    out = model(x, noise=noise)
    per_image = model.forward_loss(x, out.logits, out.mask, reduction="none")
    assert per_image.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(
            per_image[i], model.forward_loss(x[i : i + 1], out.logits[i : i + 1], out.mask[i : i + 1])
        )
    torch.testing.assert_close(per_image.mean(), out.loss)  # same number of removed patches per image
    with pytest.raises(ValueError, match="reduction"):
        model.forward_loss(x, out.logits, out.mask, reduction="sum")


# ----------------------------------------------------------------------------------------------------------------------
# Mask tokens in the encoder (config.encoder_mask_token, paper Table 1(c))


@pytest.mark.parametrize("encoder_mask_token", [False, True])
def test_prediction_never_sees_removed_pixels(tiny_config, encoder_mask_token):
    """The logits must not depend on the pixels of removed patches, whether or not the encoder sees mask tokens."""
    model = MAEForPreTraining(tiny_config(encoder_mask_token=encoder_mask_token)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(x, noise=noise)
    removed = unpatchify(out.mask[..., None].expand(-1, -1, 192), 8, 32).bool()
    changed = torch.where(removed, torch.randn_like(x) * 5, x)
    torch.testing.assert_close(model(changed, noise=noise).logits, out.logits, rtol=0, atol=1e-6)
    visible_changed = torch.where(removed, x, x + 1)
    assert not torch.allclose(model(visible_changed, noise=noise).logits, out.logits)


def test_encoder_mask_token_encodes_every_patch(tiny_config):
    model = MAEForPreTraining(tiny_config(encoder_mask_token=True))
    assert model.decoder.mask_token is None and model.mae.encoder_mask_token.shape == (1, 1, 32)
    assert 0.005 < model.mae.encoder_mask_token.std() < 0.05  # normal(0.02), as the official mask token
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    out = model(x, noise=noise, output_hidden_states=True)
    encoder = model.mae(x, noise=noise, output_hidden_states=True)
    assert encoder.last_hidden_state.shape == (2, 1 + 16, 32) and out.logits.shape == (2, 16, 192)
    assert out.mask.sum() == 2 * 12 and torch.equal(out.mask, encoder.mask)
    # the encoder input: mask token + position at removed patches, patch embedding + position elsewhere
    tokens = out.hidden_states[0][:, 1:]  # (B, L, D)
    pos = model.mae.pos_embed[:, 1:]
    removed = out.mask.bool()
    torch.testing.assert_close(tokens[removed], (model.mae.encoder_mask_token[0] + pos[0]).expand(2, -1, -1)[removed])
    full = model.mae(x, output_hidden_states=True).hidden_states[0][:, 1:]  # no masking: every patch embedded
    torch.testing.assert_close(tokens[~removed], full[~removed])
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP needs no unused parameters
    assert model.mae.encoder_mask_token.grad.abs().sum() > 0


def test_encoder_mask_token_saves_loads_and_is_left_out_by_the_classifier(tiny_config, tmp_path):
    model = MAEForPreTraining(tiny_config(encoder_mask_token=True)).eval()
    model.save_pretrained(tmp_path)
    loaded = MAEForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_mask_token and "encoder_mask_token" in json.loads(
        (tmp_path / "config.json").read_text()
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(loaded(x, noise=noise).loss, model(x, noise=noise).loss, rtol=0, atol=0)
    assert MAEModel.from_pretrained(tmp_path).encoder_mask_token is not None
    classifier = MAEForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert classifier.mae.encoder_mask_token is None  # never masks: no parameter without a gradient
    classifier(x, labels=torch.tensor([0, 1])).loss.backward()
    assert [n for n, p in classifier.named_parameters() if p.grad is None] == []


def test_timm_export_leaves_the_encoder_mask_token_out(tiny_config):
    from maekit.convert import to_official_state_dict, to_timm_state_dict

    model = MAEForPreTraining(tiny_config(encoder_mask_token=True))
    assert "encoder_mask_token" in to_official_state_dict(model)  # no clash with the decoder's `mask_token`
    assert "mask_token" not in to_official_state_dict(model)  # this model's decoder has none
    assert not any("mask_token" in key for key in to_timm_state_dict(model))


def test_encoder_variants_are_constructor_options(tiny_config):
    # The classifier's encoder is built with what it needs (a trained position table, no final norm with mean pooling)
    # rather than edited after construction.
    config = tiny_config()
    fixed = MAEModel(config)
    assert "pos_embed" in dict(fixed.named_buffers()) and "pos_embed" not in dict(fixed.named_parameters())
    trained = MAEModel(config, trainable_pos_embed=True, final_norm=False)
    assert "pos_embed" in dict(trained.named_parameters()) and isinstance(trained.norm, torch.nn.Identity)
    torch.testing.assert_close(trained.pos_embed.detach(), fixed.pos_embed)  # the same sin-cos start
    for pooling, has_norm in (("mean", False), ("cls", True)):
        classifier = MAEForImageClassification(tiny_config(pooling=pooling, num_labels=3))
        assert isinstance(classifier.mae.pos_embed, torch.nn.Parameter)
        assert isinstance(classifier.mae.norm, torch.nn.LayerNorm) == has_norm
