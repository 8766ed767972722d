"""MAEBackbone: feature maps, the ViTDet simple feature pyramid, loading through AutoBackbone, layer decay."""

import inspect
import json

import pytest
import torch
from torch import nn
from transformers import AutoBackbone, AutoConfig, Dinov2Backbone, Dinov2Config

from maekit import (
    MAEBackbone,
    MAEBackboneConfig,
    MAEConfig,
    MAEForImageClassification,
    MAEForPreTraining,
    MAEModel,
)
from maekit.convert import to_transformers
from maekit.segmentation import SegmentationMetric
from maekit.training.layer_decay import param_groups_layer_decay
from tests.conftest import TINY
from tests.test_docs import BLOCK


def backbone_config(**overrides):
    return MAEBackboneConfig(**{**TINY, **overrides})


def _encoder_state(model):
    """Encoder tensors of any maekit model, by name inside the encoder, without the final norm."""
    encoder = model.mae
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith("norm.")}


def test_feature_maps_equal_mae_hidden_states_reshaped(tiny_config):
    encoder = MAEModel(tiny_config(num_hidden_layers=3)).eval()
    backbone = MAEBackbone(backbone_config(num_hidden_layers=3, out_features=["stem", "stage1", "stage2", "stage3"]))
    backbone.mae.load_state_dict(encoder.state_dict(), strict=False)
    backbone.eval()
    # Another resolution and a non-square input: the position table is resized, as MAEModel does on request.
    pixel_values = torch.randn(2, 3, 48, 64)
    hidden = encoder(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
    maps = backbone(pixel_values).feature_maps
    assert len(maps) == 4
    for h, m in zip(hidden, maps):
        assert m.shape == (2, 32, 6, 8)
        expected = h[:, 1:].transpose(1, 2).reshape(2, 32, 6, 8)
        assert (m - expected).abs().max() <= 1e-6


def test_out_indices_select_stages_and_hidden_states_on_request():
    config = backbone_config(out_indices=[-1, 1][::-1])
    assert config.out_features == ["stage1", "stage2"]
    backbone = MAEBackbone(config).eval()
    out = backbone(torch.randn(1, 3, 32, 32), output_hidden_states=True, output_attentions=True)
    assert len(out.feature_maps) == 2 and backbone.channels == [32, 32]
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (1, 17, 32)
    assert len(out.attentions) == 2
    assert backbone(torch.randn(1, 3, 32, 32)).hidden_states is None
    feature_maps, *_ = backbone(torch.randn(1, 3, 32, 32), return_dict=False)
    assert len(feature_maps) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pyramid_scales": [4, 3]}, "pyramid_scales must be a strictly decreasing"),
        ({"pyramid_scales": [1, 2]}, "pyramid_scales must be a strictly decreasing"),
        ({"pyramid_scales": []}, "pyramid_scales must be a strictly decreasing"),
        ({"pyramid_scales": [4, 2, 1], "out_indices": [1, 2]}, "one out feature or from one per scale"),
        ({"pyramid_channels": 0}, "pyramid_channels must be a positive integer"),
        ({"out_features": ["stage7"]}, "out_features must be a subset of stage_names"),
        ({"hidden_size": 36, "num_attention_heads": 8}, "divisible by num_attention_heads"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        backbone_config(**overrides)


def test_inconsistent_override_after_loading_is_caught_at_model_init():
    config = backbone_config(pyramid_scales=[4, 2, 1, 0.5])
    config.out_indices = [1, 2]  # as `from_pretrained(..., out_indices=[1, 2])` sets it on a loaded config
    with pytest.raises(ValueError, match="one out feature or from one per scale"):
        MAEBackbone(config)


def test_simple_feature_pyramid_shapes_strides_and_vitdet_layers():
    config = backbone_config(hidden_size=64, num_attention_heads=4, pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=16)
    backbone = MAEBackbone(config).eval()
    assert config.feature_strides == [2, 4, 8, 16]
    maps = backbone(torch.randn(2, 3, 64, 96)).feature_maps
    for feature, stride in zip(maps, config.feature_strides):
        assert feature.shape == (2, 16, 64 // stride, 96 // stride)
    assert backbone.channels == [16, 16, 16, 16]
    # detectron2's SimpleFeaturePyramid: scale 4 = deconv(D -> D/2), LN, GELU, deconv(D/2 -> D/4); 2 = deconv(D -> D/2);
    # 1 = nothing; 1/2 = max pool; then a bias-free 1x1 and 3x3 conv, each with a channel LayerNorm.
    kinds = [[type(layer).__name__ for layer in stage] for stage in backbone.pyramid.stages]
    tail = ["Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d"]
    assert kinds == [
        ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d", *tail],
        ["ConvTranspose2d", *tail],
        tail,
        ["MaxPool2d", *tail],
    ]
    four = backbone.pyramid.stages[0]
    assert four[0].weight.shape == (64, 32, 2, 2) and four[3].weight.shape == (32, 16, 2, 2)
    assert four[4].weight.shape == (16, 16, 1, 1) and four[4].bias is None and four[6].weight.shape == (16, 16, 3, 3)


def test_multilevel_pyramid_takes_scale_i_from_out_feature_i():
    config = backbone_config(out_indices=[1, 2], pyramid_scales=[2, 1], pyramid_channels=8)
    backbone = MAEBackbone(config).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    plain = MAEBackbone(backbone_config(out_indices=[1, 2]))
    plain.mae.load_state_dict(backbone.mae.state_dict())
    block1, block2 = plain.eval()(pixel_values).feature_maps
    maps = backbone(pixel_values).feature_maps
    assert torch.allclose(maps[0], backbone.pyramid.stages[0](block1), atol=1e-6)
    assert torch.allclose(maps[1], backbone.pyramid.stages[1](block2), atol=1e-6)


def test_sizes_that_are_not_multiples_of_the_patch_are_zero_padded():
    backbone = MAEBackbone(backbone_config()).eval()
    pixel_values = torch.randn(1, 3, 30, 37)
    padded = torch.nn.functional.pad(pixel_values, (0, 3, 0, 2))
    assert torch.equal(backbone(pixel_values).feature_maps[0], backbone(padded).feature_maps[0])
    assert backbone(pixel_values).feature_maps[0].shape == (1, 32, 4, 5)


@pytest.mark.parametrize("encoder_mask_token", [False, True])
def test_every_parameter_gets_a_gradient_and_drop_path_is_applied(encoder_mask_token):
    # A backbone never masks: an encoder mask token (SimMIM-style pretraining) would get no gradient either.
    config = backbone_config(
        drop_path_rate=0.2, pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=8, encoder_mask_token=encoder_mask_token
    )
    backbone = MAEBackbone(config).train()
    assert [block.drop_path.drop_prob for block in backbone.mae.blocks] == pytest.approx([0.0, 0.2])
    loss = sum(m.square().mean() for m in backbone(torch.randn(2, 3, 32, 32)).feature_maps)
    loss.backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # no unused final norm: DDP needs no find_unused_parameters


def test_auto_backbone_from_pretraining_folder_drops_the_decoder(tmp_path, tiny_config, caplog):
    pretrained = MAEForPreTraining(tiny_config())
    pretrained.save_pretrained(tmp_path / "pre")
    backbone = AutoBackbone.from_pretrained(tmp_path / "pre", out_indices=[1, 2], drop_path_rate=0.1)
    assert type(backbone) is MAEBackbone and backbone.out_features == ["stage1", "stage2"]
    assert backbone.config.drop_path_rate == 0.1 and backbone.config.model_type == "maekit_mae_backbone"
    own = _encoder_state(backbone)
    assert own.keys() == _encoder_state(pretrained).keys()
    assert all(torch.equal(v, _encoder_state(pretrained)[k]) for k, v in own.items())
    # The same through a relative path (transformers 5.x asks the Hub about it: see maekit.compat).
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert type(AutoBackbone.from_pretrained("pre")) is MAEBackbone


@pytest.mark.parametrize("model_class", [MAEModel, MAEForImageClassification])
def test_auto_backbone_from_encoder_and_classifier_folders(tmp_path, tiny_config, model_class):
    model = model_class(tiny_config(num_labels=3))
    model.save_pretrained(tmp_path / "m")
    backbone = AutoBackbone.from_pretrained(str(tmp_path / "m"), pyramid_scales=[2, 1], pyramid_channels=8)
    prefix_free = model if model_class is MAEModel else model.mae
    expected = {k: v for k, v in prefix_free.state_dict().items() if not k.startswith("norm.")}
    assert all(torch.equal(v, expected[k]) for k, v in backbone.mae.state_dict().items())
    assert [m.shape[1] for m in backbone(torch.randn(1, 3, 32, 32)).feature_maps] == [8, 8]


def test_auto_backbone_from_transformers_vit_mae_folder(tmp_path, tiny_config):
    pretrained = MAEForPreTraining(tiny_config()).eval()
    to_transformers(pretrained).save_pretrained(tmp_path / "vit_mae")
    assert json.loads((tmp_path / "vit_mae" / "config.json").read_text())["model_type"] == "vit_mae"
    backbone = AutoBackbone.from_pretrained(tmp_path / "vit_mae", out_indices=[2])
    assert type(backbone) is MAEBackbone and backbone.out_features == ["stage2"]
    pixel_values = torch.randn(1, 3, 32, 32)
    hidden = pretrained.mae(pixel_values, output_hidden_states=True).hidden_states[2]
    expected = hidden[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    assert torch.allclose(backbone(pixel_values).feature_maps[0], expected, atol=1e-5)
    assert MAEBackbone.from_pretrained(tmp_path / "vit_mae", dtype=torch.bfloat16).dtype == torch.bfloat16
    # The config alone, for UperNetConfig(backbone_config=...).
    config = MAEBackboneConfig.from_pretrained(tmp_path / "vit_mae", pyramid_scales=[4, 2, 1, 0.5])
    assert config.hidden_size == 32 and config.pyramid_scales == [4, 2, 1, 0.5]


def test_backbone_save_load_round_trip_is_exact(tmp_path):
    backbone = MAEBackbone(backbone_config(out_indices=[1, 2], pyramid_scales=[2, 1], pyramid_channels=8)).eval()
    backbone.save_pretrained(tmp_path / "bb")
    saved = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert saved["model_type"] == "maekit_mae_backbone" and saved["out_indices"] == [1, 2]
    loaded = AutoBackbone.from_pretrained(tmp_path / "bb")
    assert loaded.config.to_dict() == {**backbone.config.to_dict(), "_name_or_path": str(tmp_path / "bb")}
    pixel_values = torch.randn(2, 3, 40, 24)
    for a, b in zip(backbone(pixel_values).feature_maps, loaded(pixel_values).feature_maps):
        assert torch.equal(a, b)
    assert type(AutoConfig.from_pretrained(tmp_path / "bb")) is MAEBackboneConfig


def test_auto_backbone_local_folder_fix_is_general(tmp_path):
    """transformers 5.24 cannot load any local backbone folder through AutoBackbone; maekit restores it."""
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, out_indices=[1, 2]
    )
    Dinov2Backbone(config).save_pretrained(tmp_path / "dinov2")
    loaded = AutoBackbone.from_pretrained(tmp_path / "dinov2")
    assert type(loaded) is Dinov2Backbone and loaded.out_indices == [1, 2]


def test_from_config_accepts_a_plain_mae_config_and_mae_config_is_unchanged(tiny_config):
    backbone = AutoBackbone.from_config(tiny_config())
    assert type(backbone) is MAEBackbone and backbone.out_features == ["stage2"]
    # MAEConfig itself has no backbone fields: pretraining / classification configs stay as they were.
    saved = tiny_config().to_dict()
    assert not {"out_features", "out_indices", "stage_names", "pyramid_scales"} & set(saved)
    assert MAEConfig.model_type == "maekit_mae"


def test_wrong_folder_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "upernet"}')
    with pytest.raises(ValueError, match="AutoModelForSemanticSegmentation"):
        MAEBackbone.from_pretrained(tmp_path)


def test_layer_decay_groups_of_a_backbone_and_a_model_around_it():
    backbone = MAEBackbone(backbone_config(num_hidden_layers=4, pyramid_scales=[2, 1], pyramid_channels=8))

    class Detector(nn.Module):  # any head around the backbone, as UperNet / DETR hold it
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(8, 3)

    for model, prefix in ((backbone, "mae."), (Detector(), "backbone.mae.")):
        groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
        layer_of = {name: g["layer_id"] for g in groups for name in g["param_names"]}
        scale_of = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
        decay_of = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
        assert sorted(layer_of) == sorted(n for n, _ in model.named_parameters())
        assert layer_of[f"{prefix}cls_token"] == 0 and layer_of[f"{prefix}patch_embed.proj.weight"] == 0
        assert layer_of[f"{prefix}blocks.2.attn.qkv.weight"] == 3
        top = [n for n in layer_of if not n.startswith(prefix)]
        assert top and all(layer_of[n] == 5 and scale_of[n] == 1.0 for n in top)  # pyramid, heads: full rate
        assert scale_of[f"{prefix}blocks.0.mlp.fc1.weight"] == pytest.approx(0.5**4)
        assert decay_of[f"{prefix}cls_token"] == 0.0 and decay_of[f"{prefix}blocks.0.mlp.fc1.weight"] == 0.05
        assert decay_of[f"{prefix}blocks.0.mlp.fc1.bias"] == 0.0


@pytest.mark.parametrize("obj", [MAEBackboneConfig, MAEBackbone, SegmentationMetric], ids=lambda obj: obj.__name__)
def test_docstring_examples_run(obj):
    blocks = [code for flags, code in BLOCK.findall(inspect.cleandoc(obj.__doc__)) if "no-run" not in flags]
    assert blocks
    for code in blocks:
        exec(compile(code, f"{obj.__name__} docstring", "exec"), {"__name__": "__docstring__"})


@pytest.mark.parametrize("model_class", [MAEModel, MAEForPreTraining])
def test_a_folder_trained_with_encoder_mask_tokens_loads_into_a_backbone_without_them(
    model_class, tiny_config, tmp_path, capsys, caplog
):
    torch.manual_seed(0)
    trained = model_class(tiny_config(encoder_mask_token=True))
    trained.save_pretrained(tmp_path)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        backbone = AutoBackbone.from_pretrained(tmp_path, out_indices=[1])
    assert "LOAD REPORT" not in capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert backbone.mae.encoder_mask_token is None
    assert not any("mask_token" in name for name, _ in backbone.named_parameters())
    encoder = trained if model_class is MAEModel else trained.mae
    blocks = {k: v for k, v in encoder.state_dict().items() if k.startswith(("blocks.", "patch_embed.", "cls_token"))}
    assert all(torch.equal(backbone.mae.state_dict()[k], v) for k, v in blocks.items())


def test_an_encoder_folder_loads_into_a_backbone_without_a_load_report(tiny_config, tmp_path, capsys, caplog):
    # An MAEModel folder holds the final norm, which the backbone does not use (its maps are the blocks' outputs).
    torch.manual_seed(0)
    MAEModel(tiny_config()).save_pretrained(tmp_path)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        backbone = AutoBackbone.from_pretrained(tmp_path, out_indices=[1])
    assert "LOAD REPORT" not in capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert isinstance(backbone, MAEBackbone)
