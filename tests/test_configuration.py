import json

import pytest

from maekit import PRESETS, MAEConfig


def test_defaults_are_official_vit_base():
    assert MAEConfig().to_diff_dict() == MAEConfig.from_preset("vit-base-patch16").to_diff_dict()


@pytest.mark.parametrize(
    "name, width, depth, heads, patch",
    [
        ("vit-tiny-patch16", 192, 12, 3, 16),
        ("vit-small-patch16", 384, 12, 6, 16),
        ("vit-base-patch16", 768, 12, 12, 16),
        ("vit-large-patch16", 1024, 24, 16, 16),
        ("vit-huge-patch14", 1280, 32, 16, 14),
    ],
)
def test_presets(name, width, depth, heads, patch):
    config = MAEConfig.from_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (width, depth, heads)
    assert config.intermediate_size == 4 * width and config.patch_size == patch
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_num_attention_heads) == (
        512,
        8,
        16,
    )
    assert config.decoder_intermediate_size == 2048 and config.layer_norm_eps == 1e-6
    assert config.num_patches == (224 // patch) ** 2


def test_preset_overrides_and_unknown_preset():
    assert MAEConfig.from_preset("vit-tiny-patch16", mask_ratio=0.5, image_size=96).num_patches == 36
    with pytest.raises(ValueError, match="vit-base-patch16"):
        MAEConfig.from_preset("vit-gigantic")


def test_non_square_geometry_and_json_round_trip(tmp_path):
    config = MAEConfig(image_size=(32, 48), patch_size=(8, 4), num_channels=1)
    assert config.grid_size == (4, 12) and config.num_patches == 48 and config.patch_dim == 32
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "maekit_mae"
    loaded = MAEConfig.from_pretrained(tmp_path)
    assert loaded.grid_size == (4, 12) and loaded.patch_hw == (8, 4)


INVALID = [
    ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
    ({"decoder_hidden_size": 30, "decoder_num_attention_heads": 4}, "decoder_hidden_size"),
    ({"image_size": 30, "patch_size": 8}, "image_size"),
    ({"image_size": (32, 30), "patch_size": 8}, "image_size"),
    ({"mask_ratio": 1.0}, "mask_ratio"),
    ({"mask_ratio": -0.1}, "mask_ratio"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"decoder_num_hidden_layers": 0}, "decoder_num_hidden_layers"),
    ({"num_channels": 0}, "num_channels"),
    ({"patch_size": 0}, "patch_size"),
    ({"intermediate_size": 2.5}, "intermediate_size"),
    ({"hidden_act": "swishy"}, "hidden_act"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ({"drop_path_rate": -0.1}, "drop_path_rate"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ({"pooling": "max"}, "pooling"),
    ({"layer_norm_eps": None}, "layer_norm_eps"),
    ({"initializer_range": "x"}, "initializer_range"),
    ({"norm_pix_loss": "no"}, "norm_pix_loss"),
    ({"qkv_bias": None}, "qkv_bias"),
    ({"hidden_size": 6, "num_attention_heads": 2, "intermediate_size": 8}, "divisible by 4"),
]


@pytest.mark.parametrize("overrides, field", INVALID)
def test_invalid_configs_name_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_models_revalidate_a_mutated_config(tiny_config):
    from maekit import MAEModel

    config = tiny_config()
    config.mask_ratio = 2.0
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEModel(config)


def test_presets_listed():
    assert set(PRESETS) == {
        "vit-tiny-patch16",
        "vit-small-patch16",
        "vit-base-patch16",
        "vit-large-patch16",
        "vit-huge-patch14",
    }
