"""Checkpoint interop: official MAE files, timm, transformers and the `maekit-convert` CLI.

Official-layout files are built here with the key names and shapes of the release and checked against independent
references: transformers' ViTMAE (loaded through a renaming written out below, not maekit's) for the encoder, decoder
and loss, and timm's `VisionTransformer` when timm is installed.
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from maekit.convert import (
    config_from_official,
    load_official_checkpoint,
    load_official_state_dict,
    main,
    save_timm,
    set_layer_norm_eps,
    timm_model_args,
    to_official_state_dict,
    to_timm_state_dict,
    to_transformers,
)

from .conftest import TINY, official_sincos

# Head counts follow the published models' head widths (64-d encoder, 32-d decoder), so they can be inferred.
SIZES = dict(hidden=128, depth=2, heads=2, mlp=256, dec=64, dec_depth=1, dec_heads=2, dec_mlp=128, image=32, patch=8)
GRID = SIZES["image"] // SIZES["patch"]
NUM_PATCHES = GRID * GRID


def _block(prefix: str, dim: int, mlp: int) -> dict:
    return {
        f"{prefix}.norm1.weight": 1 + 0.1 * torch.randn(dim),
        f"{prefix}.norm1.bias": 0.1 * torch.randn(dim),
        f"{prefix}.attn.qkv.weight": 0.1 * torch.randn(3 * dim, dim),
        f"{prefix}.attn.qkv.bias": 0.1 * torch.randn(3 * dim),
        f"{prefix}.attn.proj.weight": 0.1 * torch.randn(dim, dim),
        f"{prefix}.attn.proj.bias": 0.1 * torch.randn(dim),
        f"{prefix}.norm2.weight": 1 + 0.1 * torch.randn(dim),
        f"{prefix}.norm2.bias": 0.1 * torch.randn(dim),
        f"{prefix}.mlp.fc1.weight": 0.1 * torch.randn(mlp, dim),
        f"{prefix}.mlp.fc1.bias": 0.1 * torch.randn(mlp),
        f"{prefix}.mlp.fc2.weight": 0.1 * torch.randn(dim, mlp),
        f"{prefix}.mlp.fc2.bias": 0.1 * torch.randn(dim),
    }


def _sincos(dim: int) -> torch.Tensor:
    return torch.from_numpy(official_sincos(dim, GRID, GRID)).float().unsqueeze(0)


def official_state_dict(kind: str = "full", num_labels: int = 5) -> dict:
    """Random weights under the release's names: kind "encoder" (mae_pretrain_vit_*), "full" (*_full / visualize /
    models_mae training checkpoints) or "finetuned" (models_vit with global pool: fc_norm + head, no norm)."""
    d, p = SIZES["hidden"], SIZES["patch"]
    sd = {
        "cls_token": 0.02 * torch.randn(1, 1, d),
        "pos_embed": _sincos(d),
        "patch_embed.proj.weight": 0.05 * torch.randn(d, 3, p, p),
        "patch_embed.proj.bias": 0.1 * torch.randn(d),
    }
    for i in range(SIZES["depth"]):
        sd.update(_block(f"blocks.{i}", d, SIZES["mlp"]))
    if kind == "finetuned":
        sd["pos_embed"] = sd["pos_embed"] + 0.05 * torch.randn_like(sd["pos_embed"])  # learned while fine-tuning
        sd.update({"fc_norm.weight": 1 + 0.1 * torch.randn(d), "fc_norm.bias": 0.1 * torch.randn(d)})
        sd.update({"head.weight": 0.1 * torch.randn(num_labels, d), "head.bias": 0.1 * torch.randn(num_labels)})
        return sd
    sd.update({"norm.weight": 1 + 0.1 * torch.randn(d), "norm.bias": 0.1 * torch.randn(d)})
    if kind == "full":
        dd = SIZES["dec"]
        sd.update(
            {
                "mask_token": 0.02 * torch.randn(1, 1, dd),
                "decoder_embed.weight": 0.1 * torch.randn(dd, d),
                "decoder_embed.bias": 0.1 * torch.randn(dd),
                "decoder_pos_embed": _sincos(dd),
                "decoder_norm.weight": 1 + 0.1 * torch.randn(dd),
                "decoder_norm.bias": 0.1 * torch.randn(dd),
                "decoder_pred.weight": 0.1 * torch.randn(p * p * 3, dd),
                "decoder_pred.bias": 0.1 * torch.randn(p * p * 3),
            }
        )
        for i in range(SIZES["dec_depth"]):
            sd.update(_block(f"decoder_blocks.{i}", dd, SIZES["dec_mlp"]))
    return sd


def save_official(path, state_dict, **extra):
    torch.save({"model": state_dict, **extra}, path)
    return path


# --- independent reference: official names -> transformers 5.x ViTMAE, written out here --------------------------


def _official_block_to_transformers(sd: dict, src: str, dst: str) -> dict:
    out = {}
    for name, chunk in zip("qkv", sd[f"{src}.attn.qkv.weight"].chunk(3)):
        out[f"{dst}.attention.{name}_proj.weight"] = chunk
    for name, chunk in zip("qkv", sd[f"{src}.attn.qkv.bias"].chunk(3)):
        out[f"{dst}.attention.{name}_proj.bias"] = chunk
    for official, theirs in [
        ("attn.proj", "attention.o_proj"),
        ("norm1", "layernorm_before"),
        ("norm2", "layernorm_after"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ]:
        for kind in ("weight", "bias"):
            out[f"{dst}.{theirs}.{kind}"] = sd[f"{src}.{official}.{kind}"]
    return out


def transformers_reference(sd: dict, norm_pix_loss: bool = False, mask_ratio: float = 0.75):
    config = ViTMAEConfig(
        hidden_size=SIZES["hidden"],
        num_hidden_layers=SIZES["depth"],
        num_attention_heads=SIZES["heads"],
        intermediate_size=SIZES["mlp"],
        decoder_hidden_size=SIZES["dec"],
        decoder_num_hidden_layers=SIZES["dec_depth"],
        decoder_num_attention_heads=SIZES["dec_heads"],
        decoder_intermediate_size=SIZES["dec_mlp"],
        image_size=SIZES["image"],
        patch_size=SIZES["patch"],
        layer_norm_eps=1e-6,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
    )
    ref = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
    }
    if "norm.weight" in sd:
        ref.update({"vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"]})
    else:  # fine-tuned files have no final norm; it is not used by the pooled reference below
        ref.update(
            {"vit.layernorm.weight": torch.ones(SIZES["hidden"]), "vit.layernorm.bias": torch.zeros(SIZES["hidden"])}
        )
    for i in range(SIZES["depth"]):
        ref.update(_official_block_to_transformers(sd, f"blocks.{i}", f"vit.layers.{i}"))
    if "decoder_embed.weight" not in sd:
        model = ViTMAEModel(config)
        model.load_state_dict({k.removeprefix("vit."): v for k, v in ref.items()}, strict=True)
        return model.eval()
    ref.update(
        {
            "decoder.mask_token": sd["mask_token"],
            "decoder.decoder_pos_embed": sd["decoder_pos_embed"],
            "decoder.decoder_embed.weight": sd["decoder_embed.weight"],
            "decoder.decoder_embed.bias": sd["decoder_embed.bias"],
            "decoder.decoder_norm.weight": sd["decoder_norm.weight"],
            "decoder.decoder_norm.bias": sd["decoder_norm.bias"],
            "decoder.decoder_pred.weight": sd["decoder_pred.weight"],
            "decoder.decoder_pred.bias": sd["decoder_pred.bias"],
        }
    )
    for i in range(SIZES["dec_depth"]):
        ref.update(_official_block_to_transformers(sd, f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}"))
    model = ViTMAEForPreTraining(config)
    model.load_state_dict(ref, strict=True)
    return model.eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZES["image"], SIZES["image"])


def in_order() -> torch.Tensor:
    """Noise that keeps the patch order, so transformers' (always masking) ViTMAEModel with mask_ratio 0 sees all
    patches in place."""
    return torch.arange(NUM_PATCHES, dtype=torch.float32).expand(2, -1)


# --- loading official files -------------------------------------------------------------------------------------


def test_config_is_inferred_from_shapes():
    config = config_from_official(official_state_dict("full"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        128,
        2,
        2,
        256,
    )
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        64,
        1,
        2,
    )
    assert (config.decoder_intermediate_size, config.image_size, config.patch_size) == (128, 32, 8)
    assert config.layer_norm_eps == 1e-6 and config.qkv_bias
    finetuned = config_from_official(official_state_dict("finetuned", num_labels=7))
    assert finetuned.num_labels == 7 and finetuned.pooling == "mean"
    assert config_from_official(official_state_dict("encoder"), norm_pix_loss=True).norm_pix_loss


def test_published_vit_huge_head_count_is_known():
    sd = {
        "cls_token": torch.zeros(1, 1, 1280),
        "pos_embed": torch.zeros(1, 1 + 4, 1280),
        "patch_embed.proj.weight": torch.zeros(1280, 3, 14, 14),
        "blocks.0.mlp.fc1.weight": torch.zeros(5120, 1280),
    }
    config = config_from_official(sd)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (16, 14, 28)


def test_head_count_that_cannot_be_inferred_asks_for_a_config():
    sd = official_state_dict("encoder")
    sd["cls_token"] = torch.zeros(1, 1, 96)
    sd["patch_embed.proj.weight"] = torch.zeros(96, 3, 8, 8)
    with pytest.raises(ValueError, match="num_attention_heads.*config=MAEConfig"):
        config_from_official(sd)
    assert config_from_official(sd, num_attention_heads=3).num_attention_heads == 3


def test_fc_norm_without_head_gives_a_headless_classifier(tmp_path):
    """timm with global_pool="avg" and num_classes=0: fc_norm, no head."""
    sd = official_state_dict("finetuned")
    del sd["head.weight"], sd["head.bias"]
    model = load_official_checkpoint(save_official(tmp_path / "f.pth", sd))
    assert type(model) is MAEForImageClassification and model.config.num_labels == 0
    assert model(images()).logits.shape == (2, 128)


def test_encoder_file_gives_mae_model_matching_transformers(tmp_path):
    sd = official_state_dict("encoder")
    model = load_official_checkpoint(save_official(tmp_path / "mae_pretrain_vit_tiny.pth", sd))
    assert type(model) is MAEModel and not model.training
    x = images()
    reference = transformers_reference(sd, mask_ratio=0.0)
    with torch.no_grad():
        ours = model(x).last_hidden_state
        theirs = reference(x, noise=in_order()).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_full_file_matches_transformers_decoder_and_loss(tmp_path, norm_pix_loss):
    sd = official_state_dict("full")
    path = save_official(tmp_path / "mae_pretrain_vit_tiny_full.pth", sd)
    config = config_from_official(load_official_state_dict(path), norm_pix_loss=norm_pix_loss)
    model = load_official_checkpoint(path, config=config)
    assert type(model) is MAEForPreTraining
    reference = transformers_reference(sd, norm_pix_loss=norm_pix_loss)
    x, noise = images(), torch.rand(2, NUM_PATCHES)
    with torch.no_grad():
        ours, theirs = model(x, noise=noise), reference(x, noise=noise)
    torch.testing.assert_close(ours.mask, theirs.mask, rtol=0, atol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


def test_finetuned_file_gives_classifier_with_learned_pos_embed(tmp_path):
    sd = official_state_dict("finetuned")
    model = load_official_checkpoint(save_official(tmp_path / "mae_finetuned_vit_tiny.pth", sd))
    assert type(model) is MAEForImageClassification and model.config.pooling == "mean"
    torch.testing.assert_close(model.mae.pos_embed, sd["pos_embed"], rtol=0, atol=0)
    # Reference: transformers' encoder blocks, then the official global pool: mean of patch tokens, fc_norm, head.
    reference = transformers_reference(sd, mask_ratio=0.0)
    x = images()
    with torch.no_grad():
        last_block = reference(x, noise=in_order(), output_hidden_states=True).hidden_states[-1]
        pooled = F.layer_norm(last_block[:, 1:].mean(dim=1), (128,), sd["fc_norm.weight"], sd["fc_norm.bias"], 1e-6)
        expected = F.linear(pooled, sd["head.weight"], sd["head.bias"])
        logits = model(x).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["encoder", "full", "finetuned"])
def test_official_round_trip_is_exact(tmp_path, kind):
    sd = official_state_dict(kind)
    model = load_official_checkpoint(save_official(tmp_path / "f.pth", sd))
    back = to_official_state_dict(model)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_url_is_downloaded_once_into_torch_hub_cache(tmp_path, monkeypatch):
    """Network boundary only: torch.hub's downloader is replaced by a copy of a local file."""
    sd = official_state_dict("encoder")
    served = save_official(tmp_path / "served.pth", sd)
    downloads = []

    def fake_download(url, dst, *args, **kwargs):
        downloads.append(url)
        shutil.copy(served, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_tiny.pth"
    model = load_official_checkpoint(url)
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert (tmp_path / "hub" / "checkpoints" / "mae_pretrain_vit_tiny.pth").is_file()
    assert main([url, str(tmp_path / "maekit"), "--to", "maekit"]) == 0
    assert downloads == [url]


def test_training_checkpoint_with_args_namespace_loads(tmp_path):
    """models_mae training checkpoints (util/misc.py save_model) also hold optimizer state, epoch and argparse args."""
    sd = official_state_dict("full")
    extra = dict(
        optimizer={"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
        epoch=799,
        scaler={"scale": 65536.0},
        args=argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, blr=1.5e-4, output_dir="./out"),
    )
    model = load_official_checkpoint(save_official(tmp_path / "checkpoint-799.pth", sd, **extra))
    assert torch.equal(model.decoder.pred.weight, sd["decoder_pred.weight"])


class NotATensor:
    """A custom class: unpickling it would import and call user code."""


def test_pickle_needing_more_than_tensors_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": official_state_dict("encoder"), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"not a plain tensor checkpoint.*weights_only=True"):
        load_official_checkpoint(path)


def test_non_state_dict_contents_are_refused(tmp_path):
    torch.save({"model": {"cls_token": torch.zeros(1), "note": "hello"}}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"not tensors: \['note'\]"):
        load_official_state_dict(tmp_path / "a.pth")
    torch.save({"model": {"weight": torch.zeros(2, 2)}}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="Not an official MAE / timm ViT state dict"):
        load_official_checkpoint(tmp_path / "b.pth")
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth")


def test_wrong_architecture_names_the_keys(tmp_path):
    path = save_official(tmp_path / "f.pth", official_state_dict("full"))
    config = config_from_official(load_official_state_dict(path))
    deeper = MAEConfig(**{**config.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ValueError, match=r"missing keys \['mae\.blocks\.2\."):
        load_official_checkpoint(path, config=deeper)
    shallower = MAEConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"Unexpected keys: \['mae\.blocks\.1\."):
        load_official_checkpoint(path, config=shallower)
    wider_mlp = MAEConfig(**{**config.to_dict(), "intermediate_size": 512})
    with pytest.raises(ValueError, match=r"mae\.blocks\.0\.mlp\.fc1\.weight: \(256, 128\) in the file, \(512, 128\)"):
        load_official_checkpoint(path, config=wider_mlp)


def test_encoder_file_into_pretraining_warns_about_random_decoder(tmp_path, caplog):
    path = save_official(tmp_path / "mae_pretrain_vit_tiny.pth", official_state_dict("encoder"))
    with caplog.at_level(logging.WARNING, logger="maekit.convert"):
        model = load_official_checkpoint(path, model_class=MAEForPreTraining)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert model.decoder.mask_token.abs().sum() > 0  # maekit's own init, not zeros
    assert torch.isfinite(model(images()).loss)


def test_full_file_into_encoder_and_classifier(tmp_path, caplog):
    sd = official_state_dict("full")
    path = save_official(tmp_path / "f.pth", sd)
    with caplog.at_level(logging.WARNING, logger="maekit.convert"):
        encoder = load_official_checkpoint(path, model_class=MAEModel)
    assert not caplog.text
    assert torch.equal(encoder.norm.weight, sd["norm.weight"])
    with caplog.at_level(logging.WARNING, logger="maekit.convert"):
        classifier = load_official_checkpoint(path, model_class=MAEForImageClassification)
    assert "no classification head" in caplog.text
    assert torch.equal(classifier.mae.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_finetuned_file_into_encoder_warns_about_final_norm(tmp_path, caplog):
    path = save_official(tmp_path / "f.pth", official_state_dict("finetuned"))
    with caplog.at_level(logging.WARNING, logger="maekit.convert"):
        load_official_checkpoint(path, model_class=MAEModel)
    assert "no final encoder norm" in caplog.text and "fc_norm/head are not used" in caplog.text


def test_pos_embed_that_is_not_sincos_is_warned_and_kept(tmp_path, caplog):
    sd = official_state_dict("full")
    sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.01
    path = save_official(tmp_path / "f.pth", sd)
    with caplog.at_level(logging.WARNING, logger="maekit.convert"):
        model = load_official_checkpoint(path)
    assert "decoder.pos_embed" in caplog.text and "sin-cos" in caplog.text and "mae.pos_embed" not in caplog.text
    assert torch.equal(model.decoder.pos_embed, sd["decoder_pos_embed"])


def test_model_class_and_config_are_validated(tmp_path):
    path = save_official(tmp_path / "f.pth", official_state_dict("encoder"))
    with pytest.raises(TypeError, match="model_class"):
        load_official_checkpoint(path, model_class=torch.nn.Linear)
    with pytest.raises(TypeError, match="config must be a MAEConfig"):
        load_official_checkpoint(path, config={"hidden_size": 128})


# --- timm export ---------------------------------------------------------------------------------------------------


def tiny_maekit(cls, **overrides):
    config = MAEConfig(**{**TINY, **overrides})
    model = cls(config).eval()
    with torch.no_grad():  # move every weight off its (often constant) init so the comparisons mean something
        for tensor in model.state_dict().values():
            tensor.add_(0.05 * torch.randn_like(tensor))
    return model


def test_timm_state_dict_names():
    encoder = to_timm_state_dict(tiny_maekit(MAEForPreTraining))
    assert "norm.weight" in encoder and "blocks.1.attn.qkv.weight" in encoder
    assert not any(k.startswith(("decoder", "mask_token", "mae.", "head", "fc_norm")) for k in encoder)
    mean = to_timm_state_dict(tiny_maekit(MAEForImageClassification, num_labels=3))
    assert {"fc_norm.weight", "head.weight"} <= set(mean) and "norm.weight" not in mean
    cls = to_timm_state_dict(tiny_maekit(MAEForImageClassification, num_labels=3, pooling="cls"))
    assert {"norm.weight", "head.weight"} <= set(cls) and "fc_norm.weight" not in cls
    assert timm_model_args(tiny_maekit(MAEForImageClassification, num_labels=3))["global_pool"] == "avg"


def test_timm_args_refuse_what_timm_cannot_express():
    with pytest.raises(ValueError, match="layer_norm_eps"):
        timm_model_args(tiny_maekit(MAEModel, layer_norm_eps=1e-12))
    with pytest.raises(ValueError, match="hidden_act"):
        timm_model_args(tiny_maekit(MAEModel, hidden_act="relu"))


@pytest.mark.parametrize(
    "cls, overrides",
    [
        (MAEModel, {}),
        (MAEForPreTraining, {}),
        (MAEForImageClassification, {"num_labels": 3}),
        (MAEForImageClassification, {"num_labels": 3, "pooling": "cls"}),
    ],
)
def test_timm_loads_export_strictly_and_matches(cls, overrides):
    timm = pytest.importorskip("timm")
    model = tiny_maekit(cls, **overrides)
    vit = timm.models.vision_transformer.VisionTransformer(**timm_model_args(model)).eval()
    vit.load_state_dict(to_timm_state_dict(model), strict=True)
    x = images()
    with torch.no_grad():
        if cls is MAEForImageClassification:
            torch.testing.assert_close(vit(x), model(x).logits, rtol=0, atol=1e-5)
        else:
            encoder = model.mae if cls is MAEForPreTraining else model
            torch.testing.assert_close(vit.forward_features(x), encoder(x).last_hidden_state, rtol=0, atol=1e-5)


def test_timm_encoder_matches_official_encoder_file(tmp_path):
    timm = pytest.importorskip("timm")
    sd = official_state_dict("encoder")
    model = load_official_checkpoint(save_official(tmp_path / "f.pth", sd))
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0
    ).eval()
    vit.load_state_dict(sd, strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, vit.forward_features(x), rtol=0, atol=1e-5)


def test_timm_classifier_matches_official_finetuned_file(tmp_path):
    timm = pytest.importorskip("timm")
    sd = official_state_dict("finetuned")
    model = load_official_checkpoint(save_official(tmp_path / "f.pth", sd))
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5, global_pool="avg"
    ).eval()
    vit.load_state_dict(sd, strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, vit(x), rtol=0, atol=1e-5)


def test_saved_timm_folder_loads_in_timm_create_model(tmp_path):
    timm = pytest.importorskip("timm")
    model = tiny_maekit(MAEForImageClassification, num_labels=3)
    save_timm(model, tmp_path)
    vit = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(vit(x), model(x).logits, rtol=0, atol=1e-5)


# --- CLI ------------------------------------------------------------------------------------------------------------


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_cli_official_to_maekit_and_back(tmp_path, capsys):
    sd = official_state_dict("full")
    source = save_official(tmp_path / "mae_visualize_vit_tiny.pth", sd)
    assert main([str(source), str(tmp_path / "maekit"), "--to", "maekit"]) == 0
    assert "MAEForPreTraining (official -> maekit)" in capsys.readouterr().out
    model = MAEForPreTraining.from_pretrained(tmp_path / "maekit")
    assert torch.equal(model.mae.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert main([str(tmp_path / "maekit"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    back = load_official_state_dict(tmp_path / "back.pth")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_cli_maekit_transformers_round_trip(tmp_path):
    model = tiny_maekit(MAEForPreTraining)
    model.save_pretrained(tmp_path / "maekit")
    assert main([str(tmp_path / "maekit"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "vit_mae"
    reference = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    x, noise = images(), torch.rand(2, 16)
    with torch.no_grad():
        ours, theirs = model(x, noise=noise), reference(x, noise=noise)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    assert main([str(tmp_path / "hf"), str(tmp_path / "again"), "--to", "maekit"]) == 0
    assert_same_weights(MAEForPreTraining.from_pretrained(tmp_path / "again"), model)


def test_cli_encoder_keeps_its_class(tmp_path):
    tiny_maekit(MAEModel).save_pretrained(tmp_path / "maekit")
    main([str(tmp_path / "maekit"), str(tmp_path / "hf"), "--to", "transformers"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    main([str(tmp_path / "hf"), str(tmp_path / "again"), "--to", "maekit"])
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["MAEModel"]


def test_cli_maekit_to_timm_and_back(tmp_path):
    model = tiny_maekit(MAEForImageClassification, num_labels=3)
    model.save_pretrained(tmp_path / "maekit")
    assert main([str(tmp_path / "maekit"), str(tmp_path / "timm"), "--to", "timm"]) == 0
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_config["model_args"]["global_pool"] == "avg" and timm_config["num_classes"] == 3
    assert main([str(tmp_path / "timm"), str(tmp_path / "again"), "--to", "maekit"]) == 0
    again = MAEForImageClassification.from_pretrained(tmp_path / "again").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)


def test_cli_timm_hub_repo_goes_through_hf_hub_download(tmp_path):
    """Network boundary only: hf_hub_download is served from a local timm folder."""
    model = tiny_maekit(MAEModel)
    save_timm(model, tmp_path / "timm")
    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(tmp_path / "timm" / filename)

    with mock.patch("maekit.convert.hf_hub_download", fake_download):
        main(["someone/vit-mae-tiny", str(tmp_path / "maekit"), "--from", "timm", "--to", "maekit"])
    assert sorted(fetched) == [("someone/vit-mae-tiny", "config.json"), ("someone/vit-mae-tiny", "model.safetensors")]
    assert_same_weights(MAEModel.from_pretrained(tmp_path / "maekit"), model)


def test_cli_model_class_choice(tmp_path):
    source = save_official(tmp_path / "f.pth", official_state_dict("full"))
    main([str(source), str(tmp_path / "enc"), "--to", "maekit", "--model-class", "encoder"])
    assert type(MAEModel.from_pretrained(tmp_path / "enc")) is MAEModel
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["MAEModel"]


def test_cli_usage_error_exits_2_before_loading(tmp_path, capsys):
    source = save_official(tmp_path / "f.pth", official_state_dict("encoder"))
    with mock.patch("maekit.convert._load_source") as load, pytest.raises(SystemExit) as exit_info:
        main([str(source), str(tmp_path / "out"), "--to", "official"])
    assert exit_info.value.code == 2 and ".pth suffix" in capsys.readouterr().err and not load.called


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _corrupt_safetensors(p):
    (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!}")
    return p / "model.safetensors"


def _truncated_pth(p):
    data = save_official(p / "full.pth", official_state_dict("full")).read_bytes()
    (p / "cut.pth").write_bytes(data[: len(data) // 2])
    return p / "cut.pth"


def _with(kind, **changes):
    def make(p):
        sd = official_state_dict(kind)
        sd.update(changes)
        return save_official(p / "f.pth", {k: v for k, v in sd.items() if v is not None})

    return make


def _maekit_folder_with_corrupt_weights(p):
    tiny_maekit(MAEForPreTraining).save_pretrained(p / "model")
    (p / "model" / "model.safetensors").write_bytes(b"garbage")
    return p / "model"


def _weights_without_config(p):
    tiny_maekit(MAEForPreTraining).save_pretrained(p / "model")
    (p / "model" / "config.json").unlink()
    return p / "model"


@pytest.mark.parametrize(
    "make_source, args, message",
    [
        (lambda p: p / "nothing-here", ["--to", "maekit"], "no such file or folder"),
        (lambda p: p / "missing.pth", ["--to", "maekit", "--from", "official"], "no such file"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", ["--to", "maekit"], "not a checkpoint"),
        (lambda p: (p / "config.json").write_text('{"model_type": "bert"}') and p, ["--to", "maekit"], "'bert'"),
        (_weights_without_config, ["--to", "timm"], "no config.json"),
        (_corrupt_safetensors, ["--to", "maekit"], "not a readable safetensors file"),
        (_truncated_pth, ["--to", "maekit"], "not a readable PyTorch checkpoint"),
        (lambda p: _write(p / "empty.pth", b""), ["--to", "maekit"], "not a readable"),
        (lambda p: _write(p / "r.pth", bytes(range(256)) * 8), ["--to", "maekit"], "corrupt"),
        (_with("encoder", **{"patch_embed.proj.weight": torch.zeros(128, 3, 8)}), ["--to", "maekit"], "4-D"),
        (
            _with("full", **{"blocks.1.attn.qkv.weight": torch.zeros(100, 128)}),
            ["--to", "timm"],
            "mae.blocks.1.attn.qkv.weight: (100, 128) in the file, (384, 128) in the model",
        ),
        (_with("full", **{"decoder_blocks.0.mlp.fc1.weight": None}), ["--to", "maekit"], "decoder_blocks.0.mlp.fc1"),
        (_maekit_folder_with_corrupt_weights, ["--to", "official"], "weights are not a readable safetensors file"),
        (_with("finetuned"), ["--to", "transformers"], "no classification model"),
        (
            lambda p: (p / "config.json").write_text('{"model_type": "upernet"}') and p,
            ["--to", "timm"],
            "MAE backbone, or a UperNet segmentation model",
        ),
        (
            lambda p: (p / "config.json").write_text('{"model_type": "maekit_mae_backbone"}') and p,
            ["--to", "maekit"],
            "convert the pretraining folder it was built from",
        ),
    ],
    ids=[
        "nothing",
        "missing-file",
        "text-file",
        "bert-folder",
        "no-config",
        "corrupt-safetensors",
        "truncated-pth",
        "empty-pth",
        "random-bytes",
        "3d-patch-embed",
        "qkv-shape",
        "missing-tensor",
        "corrupt-maekit-weights",
        "classifier-to-transformers",
        "upernet-folder",
        "backbone-folder",
    ],
)
def test_cli_errors_name_the_file_on_one_line(tmp_path, capsys, make_source, args, message):
    (tmp_path / "src").mkdir()
    source = make_source(tmp_path / "src")
    capsys.readouterr()  # setup output (progress bars of save_pretrained)
    output = tmp_path / ("out.pth" if "official" in args else "out")
    assert main([str(source), str(output), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"maekit-convert: error: {source}") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err


def test_installed_command_prints_no_traceback(tmp_path):
    (tmp_path / "mae.safetensors").write_bytes(b"\x00" * 16)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maekit.convert",
            str(tmp_path / "mae.safetensors"),
            str(tmp_path / "o"),
            "--to",
            "timm",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"maekit-convert: error: {tmp_path / 'mae.safetensors'}: not a readable safetensors file" in result.stderr


def test_cli_push_failure_says_the_output_is_written(tmp_path, capsys):
    source = save_official(tmp_path / "f.pth", official_state_dict("encoder"))
    api = mock.MagicMock()
    api.create_repo.side_effect = OSError("401 Client Error: Unauthorized")
    with mock.patch("maekit.convert.HfApi", return_value=api):
        status = main([str(source), str(tmp_path / "timm"), "--to", "timm", "--push-to-hub", "me/mae"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("maekit-convert: error: me/mae: push failed (401 Client Error")
    assert f"{tmp_path / 'timm'} is written" in err and (tmp_path / "timm" / "model.safetensors").is_file()


# --- files that declare more than they hold --------------------------------------------------------------------------


def _broadcast_official_encoder(dim: int, depth: int, mlp: int, patch: int = 16, grid: int = 14) -> dict:
    """An official encoder state dict whose every tensor is a stride-0 view of one stored value: a few KB on disk,
    `dim=8192, depth=16` declares 51.6 GB (the size reported in issue 10)."""
    one = torch.zeros(1)

    def view(*shape):
        return one.expand(*shape)

    sd = {
        "cls_token": view(1, 1, dim),
        "pos_embed": view(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": view(dim, 3, patch, patch),
        "patch_embed.proj.bias": view(dim),
        "norm.weight": view(dim),
        "norm.bias": view(dim),
    }
    for i in range(depth):
        for name, shape in [
            ("norm1.weight", (dim,)),
            ("norm1.bias", (dim,)),
            ("attn.qkv.weight", (3 * dim, dim)),
            ("attn.qkv.bias", (3 * dim,)),
            ("attn.proj.weight", (dim, dim)),
            ("attn.proj.bias", (dim,)),
            ("norm2.weight", (dim,)),
            ("norm2.bias", (dim,)),
            ("mlp.fc1.weight", (mlp, dim)),
            ("mlp.fc1.bias", (mlp,)),
            ("mlp.fc2.weight", (dim, mlp)),
            ("mlp.fc2.bias", (dim,)),
        ]:
            sd[f"blocks.{i}.{name}"] = view(*shape)
    return sd


_BOUNDED_LOAD = """
import resource, sys, time
from maekit.convert import load_official_checkpoint
status = open("/proc/self/status").read().split("VmSize:")[1].split()
# However the loader behaves, it cannot take more than 1.5 GB of address space beyond what the imports took.
resource.setrlimit(resource.RLIMIT_AS, (int(status[0]) * 1024 + 1_500_000_000, resource.RLIM_INFINITY))
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        load_official_checkpoint(path)
        print("LOADED", path)
    except Exception as err:
        print(type(err).__name__, f"{time.perf_counter() - start:.2f}s", " ".join(str(err).split()))
"""


def test_files_declaring_more_than_they_hold_are_refused_before_allocating(tmp_path):
    """A 20 KB .pth of stride-0 views declaring a 51.6 GB ViT, and a .safetensors whose block numbers jump to
    100000 (a model of depth 100001 from two blocks), are refused with a clear error before any model is built.
    Checked in a child process whose address space is capped at 1.5 GB above its imports."""
    bomb = tmp_path / "bomb.pth"
    torch.save({"model": _broadcast_official_encoder(dim=8192, depth=16, mlp=32768)}, bomb)
    assert bomb.stat().st_size < 64_000
    sd = official_state_dict("encoder")
    sd.update(
        {k.replace("blocks.1.", "blocks.100000."): v.clone() for k, v in sd.items() if k.startswith("blocks.1.")}
    )
    deep = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, deep)
    result = subprocess.run(
        [sys.executable, "-c", _BOUNDED_LOAD, str(bomb), str(deep)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("ValueError") and f"{bomb}: tensor 'cls_token' declares shape (1, 1, 8192)" in lines[0]
    assert lines[1].startswith("ValueError") and "blocks.N keys go up to blocks.100000" in lines[1], lines[1]


def test_tensors_sharing_one_storage_without_overlap_load(tmp_path):
    """Views into one flat buffer (as some exporters write) hold every value once: accepted."""
    sd = official_state_dict("encoder")
    flat = torch.cat([v.flatten() for v in sd.values()])
    views, offset = {}, 0
    for key, value in sd.items():
        views[key] = flat[offset : offset + value.numel()].view(value.shape)
        offset += value.numel()
    model = load_official_checkpoint(save_official(tmp_path / "flat.pth", views))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    shared = {**sd, "norm.bias": sd["norm.weight"]}  # one tensor stored, declared twice
    with pytest.raises(ValueError, match="tensors declare .* bytes but the file stores"):
        load_official_checkpoint(save_official(tmp_path / "aliased.pth", shared))


# --- LayerNorm eps: transformers' 1e-12 -> the 1e-6 of timm and the official code ---------------------------------


def test_set_layer_norm_eps_measures_the_change():
    model = tiny_maekit(MAEForPreTraining, layer_norm_eps=1e-12).train()
    x = images()
    with torch.no_grad():
        before = model.eval()(x, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(1))).logits
    model.train()
    difference = set_layer_norm_eps(model, 1e-6, x)
    assert model.training and model.config.layer_norm_eps == 1e-6
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    with torch.no_grad():
        after = model.eval()(x, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(1))).logits
    assert 0 < (after - before).abs().max().item() <= difference  # the reported bound covers this output too
    assert set_layer_norm_eps(model, 1e-6) == 0.0  # no change, no difference
    with pytest.raises(TypeError, match="maekit MAE model"):
        set_layer_norm_eps(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("target", ["timm", "official"])
def test_cli_converts_eps_1e12_with_the_measured_difference(tmp_path, capsys, target):
    """transformers -> timm / official with transformers' default eps 1e-12: converted, with a warning that gives the
    measured output difference (it used to be a usage error, exit 2)."""
    model = tiny_maekit(MAEForPreTraining, layer_norm_eps=1e-12)
    to_transformers(model).save_pretrained(tmp_path / "hf")
    output = tmp_path / ("mae.pth" if target == "official" else "timm")
    assert main([str(tmp_path / "hf"), str(output), "--to", target]) == 0
    err = capsys.readouterr().err
    assert f"maekit-convert: warning: {tmp_path / 'hf'}: layer_norm_eps is 1e-12" in err
    reported = float(err.split("change by at most ")[1].split(" ")[0])
    expected = set_layer_norm_eps(MAEForPreTraining.from_pretrained(tmp_path / "hf"), 1e-6)
    assert reported == pytest.approx(expected, rel=0.06)  # printed with 2 significant digits
    weights = output if target == "official" else output / "model.safetensors"
    converted = load_official_checkpoint(weights, config=MAEConfig(**TINY), model_class=MAEModel)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, model.mae.state_dict()[key]), key


def test_cli_push_to_hub_uploads_the_output_folder(tmp_path):
    """Network boundary only: the Hub client is asked to create the repo and upload the written folder."""
    source = save_official(tmp_path / "f.pth", official_state_dict("encoder"))
    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="me/mae-tiny")
    with mock.patch("maekit.convert.HfApi", return_value=api):
        main([str(source), str(tmp_path / "timm"), "--to", "timm", "--push-to-hub", "me/mae-tiny", "--private"])
    api.create_repo.assert_called_once_with("me/mae-tiny", private=True, exist_ok=True)
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/mae-tiny" and upload["folder_path"] == tmp_path / "timm"
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "timm").iterdir()}


def test_cli_push_to_hub_uploads_an_official_file(tmp_path):
    source = save_official(tmp_path / "f.pth", official_state_dict("full"))
    api = mock.MagicMock()
    api.create_repo.return_value = mock.MagicMock(repo_id="me/mae-official")
    with mock.patch("maekit.convert.HfApi", return_value=api):
        main([str(source), str(tmp_path / "out" / "mae.pth"), "--to", "official", "--push-to-hub", "me/mae-official"])
    upload = api.upload_file.call_args.kwargs
    assert upload["path_in_repo"] == "mae.pth" and upload["path_or_fileobj"] == tmp_path / "out" / "mae.pth"
    assert "decoder_pred.weight" in load_official_state_dict(tmp_path / "out" / "mae.pth")


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "maekit.convert", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "maekit-convert" in result.stdout and "--push-to-hub" in result.stdout


def test_official_round_trip_keeps_head_counts_the_file_cannot_show(tmp_path, capsys):
    # 4 heads of width 32 on a 128-wide encoder: the published-models guess (64-d heads) would say 2.
    torch.manual_seed(0)
    model = MAEForPreTraining(MAEConfig(**{**TINY, "hidden_size": 128, "num_attention_heads": 4})).eval()
    model.save_pretrained(tmp_path / "maekit")
    assert main([str(tmp_path / "maekit"), str(tmp_path / "mae.pth"), "--to", "official"]) == 0
    assert main([str(tmp_path / "mae.pth"), str(tmp_path / "back"), "--to", "maekit"]) == 0
    back = MAEForPreTraining.from_pretrained(tmp_path / "back").eval()
    assert back.config.num_attention_heads == 4 and back.config.decoder_num_attention_heads == 2
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(pixels, noise=noise).logits, model(pixels, noise=noise).logits)
    # A file without the stored config (as the official code writes it): the heads are given on the command line.
    plain = torch.load(tmp_path / "mae.pth", weights_only=True)["model"]
    torch.save({"model": plain}, tmp_path / "plain.pth")
    args = [str(tmp_path / "plain.pth"), str(tmp_path / "given"), "--to", "maekit"]
    assert main([*args, "--num-attention-heads", "4", "--decoder-num-attention-heads", "2"]) == 0
    assert MAEForPreTraining.from_pretrained(tmp_path / "given").config.num_attention_heads == 4
    capsys.readouterr()
    # 96 wide: no 64-d heads to guess, so the error names the option that gives them.
    encoder = MAEModel(MAEConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 3, "intermediate_size": 64}))
    torch.save({"model": to_official_state_dict(encoder)}, tmp_path / "w96.pth")
    assert main([str(tmp_path / "w96.pth"), str(tmp_path / "w96"), "--to", "maekit"]) == 1
    assert "--num-attention-heads" in capsys.readouterr().err
