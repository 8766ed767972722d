"""maekit vs transformers' ViTMAE: same weights + same noise -> same loss, logits, mask and ids_restore (fp32)."""

import json
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForPreTraining, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel
from maekit.convert import to_transformers

from .conftest import TINY, official_sincos

ATOL = 1e-5


def reference_config(**overrides):
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=48,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    return ViTMAEConfig(**{**fields, **overrides})


def reference_model(**overrides) -> ViTMAEForPreTraining:
    """A transformers model with random weights everywhere and the real sin-cos tables (a fresh one has zeros)."""
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(reference_config(**overrides)).eval()
    config = model.config
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
        emb = model.vit.embeddings.position_embeddings
        emb.copy_(torch.from_numpy(official_sincos(emb.shape[-1], grid, grid)).float()[None])
        dec = model.decoder.decoder_pos_embed
        dec.copy_(torch.from_numpy(official_sincos(dec.shape[-1], grid, grid)).float()[None])
    return model


def assert_same(ours, theirs):
    torch.testing.assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.ids_restore, theirs.ids_restore)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("channels", [3, 1, 4])
def test_pretraining_parity_from_transformers_folder(tmp_path, norm_pix_loss, channels):
    reference = reference_model(norm_pix_loss=norm_pix_loss, num_channels=channels)
    reference.save_pretrained(tmp_path)
    ours = MAEForPreTraining.from_pretrained(tmp_path)
    assert isinstance(ours.config, MAEConfig) and ours.config.norm_pix_loss == norm_pix_loss
    x, noise = torch.randn(3, channels, 32, 32), torch.rand(3, 16)
    assert_same(ours(x, noise=noise), reference(x, noise=noise))


def test_encoder_parity_and_hidden_states(tmp_path):
    reference = reference_model()
    reference.vit.save_pretrained(tmp_path)
    ours = MAEModel.from_pretrained(tmp_path)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    reference.vit.config._attn_implementation = "eager"
    theirs = reference.vit(x, noise=noise, output_hidden_states=True, output_attentions=True)
    mine = ours(x, noise=noise, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(mine.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    assert torch.equal(mine.mask, theirs.mask) and torch.equal(mine.ids_restore, theirs.ids_restore)
    assert len(mine.hidden_states) == len(theirs.hidden_states) == 3
    for a, b in zip(mine.hidden_states + mine.attentions, theirs.hidden_states + theirs.attentions):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_second_resolution_encoder_parity(tmp_path):
    reference = reference_model()
    reference.vit.save_pretrained(tmp_path)
    ours = MAEModel.from_pretrained(tmp_path)
    x, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    theirs = reference.vit(x, noise=noise, interpolate_pos_encoding=True)
    mine = ours(x, noise=noise, interpolate_pos_encoding=True)
    torch.testing.assert_close(mine.last_hidden_state, theirs.last_hidden_state, atol=ATOL, rtol=0)
    assert torch.equal(mine.ids_restore, theirs.ids_restore)


def _decoder_interpolation_2d(self, embeddings):
    """2-D bicubic resize of the decoder table (transformers resizes the flattened sequence in 1-D instead)."""
    new = int((embeddings.shape[1] - 1) ** 0.5)
    old = int((self.decoder_pos_embed.shape[1] - 1) ** 0.5)
    table = self.decoder_pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([self.decoder_pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_second_resolution_pretraining_parity(tmp_path, norm_pix_loss):
    reference = reference_model(norm_pix_loss=norm_pix_loss)
    reference.save_pretrained(tmp_path)
    ours = MAEForPreTraining.from_pretrained(tmp_path)
    x, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 36)
    with mock.patch.object(type(reference.decoder), "interpolate_pos_encoding", _decoder_interpolation_2d):
        theirs = reference(x, noise=noise, interpolate_pos_encoding=True)
    assert_same(ours(x, noise=noise, interpolate_pos_encoding=True), theirs)


def test_maekit_to_transformers_and_back(tmp_path, tiny_config):
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True, qkv_bias=False)).eval()
    exported = to_transformers(model)
    assert isinstance(exported, ViTMAEForPreTraining)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert_same(model(x, noise=noise), exported(x, noise=noise))
    exported.save_pretrained(tmp_path)
    reloaded = MAEForPreTraining.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    encoder = to_transformers(model.mae)
    assert isinstance(encoder, ViTMAEModel)
    torch.testing.assert_close(
        encoder(x, noise=noise).last_hidden_state, model.mae(x, noise=noise).last_hidden_state, atol=ATOL, rtol=0
    )


def test_transformers_folder_round_trip(tmp_path):
    """transformers folder -> maekit -> to_transformers -> same outputs as the original."""
    reference = reference_model()
    reference.save_pretrained(tmp_path)
    again = to_transformers(MAEForPreTraining.from_pretrained(tmp_path)).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert_same(again(x, noise=noise), reference(x, noise=noise))


LEGACY = [
    (r"vit\.layers\.(\d+)\.attention\.q_proj", r"vit.encoder.layer.\1.attention.attention.query"),
    (r"vit\.layers\.(\d+)\.attention\.k_proj", r"vit.encoder.layer.\1.attention.attention.key"),
    (r"vit\.layers\.(\d+)\.attention\.v_proj", r"vit.encoder.layer.\1.attention.attention.value"),
    (r"vit\.layers\.(\d+)\.attention\.o_proj", r"vit.encoder.layer.\1.attention.output.dense"),
    (r"vit\.layers\.(\d+)\.mlp\.fc1", r"vit.encoder.layer.\1.intermediate.dense"),
    (r"vit\.layers\.(\d+)\.mlp\.fc2", r"vit.encoder.layer.\1.output.dense"),
    (r"vit\.layers\.", "vit.encoder.layer."),
    (r"decoder_layers\.(\d+)\.attention\.q_proj", r"decoder_layers.\1.attention.attention.query"),
    (r"decoder_layers\.(\d+)\.attention\.k_proj", r"decoder_layers.\1.attention.attention.key"),
    (r"decoder_layers\.(\d+)\.attention\.v_proj", r"decoder_layers.\1.attention.attention.value"),
    (r"decoder_layers\.(\d+)\.attention\.o_proj", r"decoder_layers.\1.attention.output.dense"),
    (r"decoder_layers\.(\d+)\.mlp\.fc1", r"decoder_layers.\1.intermediate.dense"),
    (r"decoder_layers\.(\d+)\.mlp\.fc2", r"decoder_layers.\1.output.dense"),
]


def test_legacy_hub_key_names(tmp_path):
    """The facebook/vit-mae-* repos use the transformers 4.x names (`vit.encoder.layer.N.attention.attention.query`)."""
    reference = reference_model()
    state = {}
    for key, value in reference.state_dict().items():
        for pattern, replacement in LEGACY:
            key = re.sub(pattern, replacement, key)
        state[key] = value.contiguous()
    assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    assert "decoder.decoder_layers.1.output.dense.bias" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = reference.config.to_dict()
    config["architectures"] = ["ViTMAEForPreTraining"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = MAEForPreTraining.from_pretrained(tmp_path)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert_same(ours(x, noise=noise), reference(x, noise=noise))


def test_encoder_only_folder_into_pretraining_warns_and_keeps_official_decoder_init(tmp_path, caplog):
    reference = reference_model()
    reference.vit.save_pretrained(tmp_path)
    ours = MAEForPreTraining.from_pretrained(tmp_path)
    torch.testing.assert_close(
        ours.mae.blocks[0].attn.proj.weight, reference.vit.layers[0].attention.o_proj.weight, rtol=0, atol=0
    )
    assert ours.decoder.mask_token.abs().sum() > 0  # not transformers' zeros
    assert ours.decoder.pos_embed.abs().sum() > 0


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_config):
    model = MAEForPreTraining(tiny_config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MAEForPreTraining.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    assert torch.equal(model.eval()(x, noise=noise).logits, loaded.eval()(x, noise=noise).logits)
    assert all(p.requires_grad for p in loaded.parameters())


def test_bfloat16_load(tmp_path, tiny_config):
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path)
    model = MAEForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert torch.isfinite(out.loss)
    from_transformers = MAEForPreTraining.from_pretrained(_save_reference(tmp_path / "hf"), dtype=torch.bfloat16)
    assert next(from_transformers.parameters()).dtype == torch.bfloat16


def _save_reference(path):
    reference_model().save_pretrained(path)
    return path


def test_auto_classes(tmp_path, tiny_config):
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path)
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is MAEForPreTraining
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is MAEModel
    classifier = MAEForImageClassification.from_pretrained(tmp_path, num_labels=3)
    torch.testing.assert_close(
        classifier.mae.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight, rtol=0, atol=0
    )


def test_push_to_hub_uploads_a_complete_folder(tiny_config):
    """Network boundary only: the commit transformers would send holds the config and the weights."""
    model = MAEForPreTraining(tiny_config())
    uploaded = {}

    def fake_commit(self, repo_id, operations, **kwargs):
        uploaded.update({op.path_in_repo: op for op in operations})
        return mock.MagicMock(commit_url="https://hub/commit", oid="0" * 40, pr_url=None)

    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.MagicMock(repo_id="me/mae")),
        mock.patch("huggingface_hub.HfApi.create_commit", fake_commit),
    ):
        model.push_to_hub("me/mae")
    assert {"config.json", "model.safetensors"} <= set(uploaded)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_from_transformers_folder_takes_config_overrides(tmp_path, pooling):
    reference = reference_model()
    reference.save_pretrained(tmp_path)
    model = MAEForImageClassification.from_pretrained(tmp_path, num_labels=7, pooling=pooling, drop_path_rate=0.1)
    assert model.config.num_labels == 7 and model.config.pooling == pooling and model.config.drop_path_rate == 0.1
    assert model.head.out_features == 7
    torch.testing.assert_close(
        model.mae.blocks[0].attn.proj.weight, reference.vit.layers[0].attention.o_proj.weight, rtol=0, atol=0
    )
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 7)


def test_classifier_from_maekit_pretraining_folder_is_quiet(tmp_path, tiny_config):
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path)
    model, info = MAEForImageClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    # nothing for transformers' load report: the decoder is dropped and the head is new on purpose
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.head.weight.abs().max() < 1e-3  # the new head has the official trunc_normal(2e-5) init


def test_transformers_folder_with_eager_attention(tmp_path):
    reference_model().save_pretrained(tmp_path)
    assert MAEModel.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"


def test_loading_a_vit_mae_folder_with_a_loss_override(tmp_path):
    # norm_pix_loss=True on a transformers folder was refused: the stored target="pixel" contradicted it.
    from maekit.convert import to_transformers

    to_transformers(MAEForPreTraining(MAEConfig(**TINY))).save_pretrained(tmp_path)
    model = MAEForPreTraining.from_pretrained(tmp_path, norm_pix_loss=True, mask_ratio=0.5)
    assert model.config.norm_pix_loss and model.config.target == "norm_pixel" and model.config.mask_ratio == 0.5
