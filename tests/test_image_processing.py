"""MAEImageProcessor: outputs against an independent PIL + numpy computation, modes, save/load, Auto classes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

import maekit
from maekit.image_processing_mae import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MAEImageProcessor
from maekit.modeling_mae import patchify

MEAN = np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float64)
STD = np.array(IMAGENET_DEFAULT_STD, dtype=np.float64)


def _rgb(height=50, width=70, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(image: Image.Image) -> np.ndarray:
    """uint8 RGB image -> normalized (3, H, W), computed directly with numpy."""
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def test_default_matches_pil_resize_and_numpy_normalize():
    image = _rgb()
    out = MAEImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    expected = _reference(image.resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_shortest_edge_resize_and_center_crop_match_reference():
    image = _rgb(50, 70)
    processor = MAEImageProcessor(size={"shortest_edge": 40}, do_center_crop=True, crop_size=32)
    out = processor(image, return_tensors="pt")["pixel_values"][0]
    resized = image.resize((56, 40), Image.Resampling.BICUBIC)  # 70 * 40 / 50 = 56
    expected = _reference(resized.crop((12, 4, 44, 36)))  # ((56 - 32) // 2, (40 - 32) // 2)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_pil_numpy_and_tensor_inputs_agree_single_and_batched():
    image = _rgb(40, 30, seed=1)
    array = np.asarray(image).copy()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    processor = MAEImageProcessor(size=32)
    batch = processor([image, array, tensor], return_tensors="pt")["pixel_values"]
    single = processor(array, return_tensors="pt")["pixel_values"]
    assert batch.shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch[0], batch[1], rtol=0, atol=0)
    torch.testing.assert_close(batch[0], batch[2], rtol=0, atol=0)
    torch.testing.assert_close(single[0], batch[0], rtol=0, atol=0)


def _white():
    return (1.0 - MEAN) / STD


@pytest.mark.parametrize(
    "make, expected_rgb",
    [
        (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
        (lambda: Image.new("LA", (8, 8), (100, 0)), (255, 255, 255)),  # fully transparent: white
        (lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),  # opaque
        (lambda: Image.new("RGBA", (8, 8), (200, 10, 10, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 51)), (204, 204, 204)),  # 20% black over white
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("RGB", (8, 8), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 20, 30)),
        (lambda: Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)), (100, 100, 100)),  # I;16
    ],
)
def test_mode_conversions_to_rgb(make, expected_rgb):
    image = make()
    processor = MAEImageProcessor(size=8, do_normalize=False, do_rescale=False)
    out = processor(image, return_tensors="pt")["pixel_values"][0]
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out.float().mean(dim=(1, 2)).numpy(), expected_rgb, atol=1.0)


def test_i16_mode_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert image.mode.startswith("I;16")
    converted = maekit.image_processing_mae.convert_image_mode(image, 3)
    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (0, 0, 0) and converted.getpixel((1, 0)) == (255, 255, 255)


def test_palette_with_transparency_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    converted = maekit.image_processing_mae.convert_image_mode(image, 3)
    assert converted.getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_model_gets_one_channel():
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    processor = MAEImageProcessor(size=8, num_channels=1, image_mean=[0.5], image_std=[0.5])
    out = processor(image, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 1, 8, 8)
    luma = round(0.299 * 255) / 255.0  # ITU-R 601-2, as PIL's L conversion
    torch.testing.assert_close(out, torch.full_like(out, (luma - 0.5) / 0.5), atol=1e-5, rtol=0)
    # An RGBA array (channels last) is composited on white too.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    out = MAEImageProcessor(size=8, do_normalize=False)(rgba, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, torch.ones(1, 3, 8, 8))


def test_save_load_and_auto_image_processor_round_trip(tmp_path):
    processor = MAEImageProcessor(size=32, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], patch_size=8)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "MAEImageProcessor"
    assert saved["size"] == {"height": 32, "width": 32} and saved["patch_size"] == 8

    image = _rgb()
    expected = processor(image, return_tensors="pt")["pixel_values"]
    for loaded in (MAEImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is MAEImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        torch.testing.assert_close(loaded(image, return_tensors="pt")["pixel_values"], expected, rtol=0, atol=0)


def test_auto_image_processor_from_model_config(tmp_path):
    maekit.MAEConfig(image_size=32, patch_size=8).save_pretrained(tmp_path)
    MAEImageProcessor(size=32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del config["image_processor_type"]  # resolved through the model config instead
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is MAEImageProcessor


@pytest.fixture
def torchvision_installed(monkeypatch):
    """AutoImageProcessor as it behaves where torchvision is installed (it prefers the torchvision backend then)."""
    from transformers.models.auto import image_processing_auto
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    hf_logging.get_logger().warning_once.cache_clear()  # logged once per process: let each load show it
    yield image_processing_auto.logger
    hf_logging.get_logger().warning_once.cache_clear()


@pytest.mark.parametrize("through", ["preprocessor_config", "model_config"])
def test_loading_a_maekit_processor_asks_for_no_torchvision_backend(tmp_path, torchvision_installed, through):
    """transformers prefers the torchvision backend when torchvision is installed and, for a processor registered
    with the PIL backend only, logged "Requested torchvision backend is not available" on every load."""
    from transformers.testing_utils import CaptureLogger

    maekit.MAEConfig(image_size=32, patch_size=8).save_pretrained(tmp_path)
    MAEImageProcessor(size=32).save_pretrained(tmp_path)
    if through == "model_config":
        config = json.loads((tmp_path / "preprocessor_config.json").read_text())
        del config["image_processor_type"]
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with CaptureLogger(torchvision_installed) as captured:
        loaded = AutoImageProcessor.from_pretrained(tmp_path)
        MAEImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MAEImageProcessor and "backend" not in captured.out, captured.out
    with CaptureLogger(torchvision_installed) as captured:  # asked for explicitly: say there is none
        assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision")) is MAEImageProcessor
    assert "Requested torchvision backend is not available" in captured.out


def test_vit_mae_base_style_config_loads(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "ViTFeatureExtractor",
                "image_mean": [0.485, 0.456, 0.406],
                "image_processor_type": "ViTImageProcessor",
                "image_std": [0.229, 0.224, 0.225],
                "resample": 3,
                "size": 224,
            }
        )
    )
    processor = MAEImageProcessor.from_pretrained(tmp_path)
    assert (processor.size.height, processor.size.width) == (224, 224)
    assert processor.resample == Image.Resampling.BICUBIC
    assert tuple(processor.image_mean) == IMAGENET_DEFAULT_MEAN
    out = processor(_rgb(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(out, MAEImageProcessor()(_rgb(), return_tensors="pt")["pixel_values"])


def test_patchify_matches_model_layout_and_round_trips():
    processor = MAEImageProcessor(size=32, patch_size=8)
    pixel_values = processor([_rgb(seed=2), _rgb(seed=3)], return_tensors="pt")["pixel_values"]
    config = maekit.MAEConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    model = maekit.MAEForPreTraining(config)
    patches = processor.patchify(pixel_values)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(patches, model.patchify(pixel_values), rtol=0, atol=0)
    torch.testing.assert_close(patches, patchify(pixel_values, 8), rtol=0, atol=0)
    # (p, q, c) ordering: the second element of the first patch is pixel (0, 0) of channel 1.
    assert patches[0, 0, 1] == pixel_values[0, 1, 0, 0]
    torch.testing.assert_close(processor.unpatchify(patches), pixel_values, rtol=0, atol=0)


def test_invalid_arguments_are_reported():
    with pytest.raises(ValueError, match="num_channels"):
        MAEImageProcessor(num_channels=0)
    with pytest.raises(ValueError, match="num_channels"):
        maekit.image_processing_mae.convert_image_mode(_rgb(), 4)
    with pytest.raises(ValueError, match="channels"):
        MAEImageProcessor(num_channels=1)(np.zeros((8, 8, 2), dtype=np.float32))
