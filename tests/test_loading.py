"""What `from_pretrained` accepts: a folder without config.json, a foreign model_type and an `auto_map` are refused or
dropped with a clear message, never turned into a default-config model or into code that runs."""

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    BertConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel

from .conftest import TINY

MAE_CLASSES = [MAEModel, MAEForPreTraining, MAEForImageClassification]
AUTO_CLASSES = [AutoModel, AutoModelForPreTraining, AutoModelForImageClassification]


@pytest.fixture
def weights_without_config(tmp_path):
    """What an interrupted run or a hand-copied checkpoint can leave: model.safetensors, no config.json."""
    folder = tmp_path / "checkpoint-100"
    model = MAEForPreTraining(MAEConfig(**TINY)).eval()
    model.save_pretrained(folder)
    (folder / "config.json").unlink()
    return folder, model


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
@pytest.mark.parametrize("cls", MAE_CLASSES)
def test_folder_without_config_is_a_clear_error(weights_without_config, cls, ignore_mismatched_sizes):
    folder, _ = weights_without_config
    with pytest.raises(OSError) as error:
        cls.from_pretrained(folder, ignore_mismatched_sizes=ignore_mismatched_sizes)
    message = str(error.value)
    assert str(folder) in message and "no config.json" in message and "config=" in message


def test_config_from_folder_without_config_is_a_clear_error(weights_without_config):
    folder, _ = weights_without_config
    with pytest.raises(OSError, match=r"checkpoint-100.*no config\.json"):
        MAEConfig.from_pretrained(folder)  # was: the ViT-B defaults, silently


@pytest.mark.parametrize("auto", [AutoConfig, *AUTO_CLASSES])
def test_auto_classes_refuse_a_folder_without_config(weights_without_config, auto):
    folder, _ = weights_without_config
    with pytest.raises((OSError, ValueError), match=str(folder)):
        auto.from_pretrained(folder)


def test_folder_without_config_loads_with_an_explicit_config(weights_without_config):
    """The way out the error message names: pass the config of the run."""
    folder, model = weights_without_config
    loaded = MAEForPreTraining.from_pretrained(folder, config=MAEConfig(**TINY))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _write_config(folder, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "config, shown",
    [
        (BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict(), "'bert'"),
        ({**MAEConfig(**TINY).to_dict(), "model_type": "my_own_mae"}, "'my_own_mae'"),
        ({k: v for k, v in MAEConfig(**TINY).to_dict().items() if k != "model_type"}, "no model_type"),
    ],
    ids=["bert", "unknown", "missing"],
)
@pytest.mark.parametrize("cls", [MAEConfig, *MAE_CLASSES])
def test_foreign_model_type_is_refused(tmp_path, cls, config, shown):
    folder = tmp_path / "foreign"
    _write_config(folder, config)
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(tmp_path / "weights")
    (folder / "model.safetensors").write_bytes((tmp_path / "weights" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError) as error:
        cls.from_pretrained(folder)
    message = str(error.value)
    assert str(folder) in message and shown in message and "'maekit_mae'" in message and "'vit_mae'" in message


def test_vit_mae_config_is_converted(tmp_path):
    """A transformers `vit_mae` config.json reads as the MAEConfig of the same architecture (as the models do)."""
    theirs = ViTMAEConfig(**TINY, layer_norm_eps=1e-12, mask_ratio=0.6)
    ViTMAEForPreTraining(theirs).save_pretrained(tmp_path / "hf")
    config = MAEConfig.from_pretrained(tmp_path / "hf")
    assert config.to_diff_dict() == MAEConfig(**TINY, layer_norm_eps=1e-12, mask_ratio=0.6).to_diff_dict()
    assert not hasattr(config, "auto_map") and config.architectures is None  # ViTMAE class names would mislead


_EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("code_ran").write_text("auto_map code ran")
from maekit import MAEConfig, MAEModel
class EvilConfig(MAEConfig):
    pass
class EvilModel(MAEModel):
    pass
"""


@pytest.fixture
def folder_with_auto_map(tmp_path):
    folder = tmp_path / "with_auto_map"
    MAEModel(MAEConfig(**TINY)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    _write_config(folder, config)
    (folder / "evil.py").write_text(_EVIL_MODULE)
    return folder


@pytest.mark.parametrize("loader", [MAEConfig, MAEModel, MAEForPreTraining, AutoConfig, AutoModel])
def test_auto_map_never_runs_and_is_never_propagated(folder_with_auto_map, tmp_path, loader):
    loaded = loader.from_pretrained(folder_with_auto_map)
    assert not (folder_with_auto_map / "code_ran").exists()
    assert type(loaded).__module__.startswith("maekit.")
    config = loaded if isinstance(loaded, MAEConfig) else loaded.config
    assert getattr(config, "auto_map", None) is None
    config.save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_auto_map_is_dropped_from_a_config_built_from_a_dict():
    config = MAEConfig(**TINY, auto_map={"AutoModel": "evil.EvilModel"})
    assert getattr(config, "auto_map", None) is None and "auto_map" not in config.to_dict()


@pytest.mark.parametrize("loader", ["MAEImageProcessor", "AutoImageProcessor"])
def test_auto_map_of_a_preprocessor_config_is_never_propagated(folder_with_auto_map, tmp_path, loader):
    from transformers import AutoImageProcessor

    from maekit import MAEImageProcessor

    MAEImageProcessor(size=32).save_pretrained(folder_with_auto_map)
    path = folder_with_auto_map / "preprocessor_config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "auto_map": {"AutoImageProcessor": "evil.EvilConfig"}})
    )
    processor = {"MAEImageProcessor": MAEImageProcessor, "AutoImageProcessor": AutoImageProcessor}[loader]
    loaded = processor.from_pretrained(folder_with_auto_map)
    assert type(loaded) is MAEImageProcessor and not (folder_with_auto_map / "code_ran").exists()
    loaded.save_pretrained(tmp_path / "saved")
    assert "auto_map" not in json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
