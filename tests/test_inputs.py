"""Model inputs: pixel dtypes, empty batches and mask ratios that leave no visible patch get clear errors (or a
documented conversion), decided from shapes and dtypes only (no host sync)."""

import pytest
import torch

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining, MAEModel

from .conftest import TINY

MODELS = [MAEModel, MAEForPreTraining, MAEForImageClassification]


def _first_output(model, pixel_values, **kwargs):
    out = model(pixel_values, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32, torch.bool])
def test_integer_pixel_values_are_refused_naming_the_dtype(tiny_config, cls, dtype):
    model = cls(tiny_config(num_labels=3)).eval()
    pixels = torch.randint(0, 2 if dtype is torch.bool else 255, (2, 3, 32, 32)).to(dtype)
    with pytest.raises(TypeError) as error:
        model(pixels)
    message = str(error.value)
    assert "pixel_values" in message and str(dtype) in message
    assert "floating-point" in message and "MAEImageProcessor" in message  # what is accepted, and how to get it


@pytest.mark.parametrize("cls", MODELS)
def test_float_pixels_of_another_precision_run_in_the_model_dtype(tiny_config, cls):
    """float64 pixels (e.g. from NumPy) run a float32 model in float32, as transformers' ViT casts them; a float64
    model (model.double()) takes float64 and float32 pixels."""
    model = cls(tiny_config(num_labels=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    noise = {"noise": torch.rand(2, 16)} if cls is MAEForPreTraining else {}
    with torch.no_grad():
        reference = _first_output(model, x, **noise)
        from_float64 = _first_output(model, x.double(), **noise)
        assert from_float64.dtype == torch.float32
        torch.testing.assert_close(from_float64, reference, rtol=0, atol=0)  # x.double().float() == x exactly
        if cls is MAEForPreTraining:
            assert model(x.double(), **noise).loss.dtype == torch.float32
        model.double()
        for pixels in (x.double(), x):  # float32 pixels are cast up to the model's float64
            out = _first_output(model, pixels, **noise)
            assert out.dtype == torch.float64
            torch.testing.assert_close(out.float(), reference, rtol=1e-4, atol=1e-5)


def test_low_precision_inputs_keep_working(tiny_config):
    model = MAEForPreTraining(tiny_config()).eval()
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        reference = model(x, noise=noise).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for pixels in (x, x.bfloat16()):
                assert abs(model(pixels, noise=noise).loss.item() - reference.item()) < 0.05 * reference.item()
        model.bfloat16()
        for pixels in (x, x.bfloat16(), x.half()):
            loss = model(pixels, noise=noise).loss
            assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05 * reference.item()


@pytest.mark.parametrize("cls", MODELS)
def test_empty_batch_is_refused(tiny_config, cls):
    model = cls(tiny_config(num_labels=3))
    with pytest.raises(ValueError, match=r"pixel_values is an empty batch \(shape \(0, 3, 32, 32\)\)"):
        model(torch.randn(0, 3, 32, 32))


def test_mask_ratio_keeping_no_patch_is_refused_on_the_config():
    with pytest.raises(ValueError) as error:
        MAEConfig(**TINY, mask_ratio=0.99)  # 16 patches: int(16 * 0.01) = 0 visible
    message = str(error.value)
    assert "mask_ratio=0.99 keeps 0 of 16 patches" in message and "mask_ratio <= 0.9375" in message
    assert MAEConfig(**TINY, mask_ratio=0.9375).mask_ratio == 0.9375  # keeps exactly one


@pytest.mark.parametrize("num_patches", [16, 49, 196, 256, 576, 1000])
def test_largest_mask_ratio_in_the_message_keeps_one_patch(num_patches):
    from maekit.configuration_mae import largest_mask_ratio

    ratio = largest_mask_ratio(num_patches)
    assert int(num_patches * (1 - ratio)) == 1
    assert int(num_patches * (1 - (ratio + 1e-9))) == 0 or ratio + 1e-9 >= 1


@pytest.mark.parametrize("cls", [MAEModel, MAEForPreTraining])
def test_mask_ratio_keeping_no_patch_is_refused_in_forward(tiny_config, cls):
    model = cls(tiny_config())
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"mask_ratio=0\.99 keeps 0 of 16 patches.*mask_ratio <= 0\.9375"):
        model(x, mask_ratio=0.99)
    # At a higher resolution there are more patches, and the same ratio keeps some.
    out = model(torch.randn(2, 3, 96, 96), mask_ratio=0.99, interpolate_pos_encoding=True)
    assert out.mask.shape == (2, 144) and int(out.mask[0].sum()) == 144 - 1
    assert model(x, mask_ratio=0.9375).mask.sum(dim=1).tolist() == [15, 15]


@pytest.mark.parametrize("cls", MODELS)
def test_input_checks_need_no_tensor_values(tiny_config, cls):
    """Every check runs on shapes and dtypes: the whole forward runs on the meta device, where reading a value
    (`.item()`, `bool(tensor)`, a host sync on a GPU) raises."""
    with torch.device("meta"):
        model = cls(tiny_config(num_labels=3))
    pixels = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.float64)
    out = model(pixels, **({"mask_ratio": 0.5} if cls is MAEForPreTraining else {}))
    assert (out.logits if hasattr(out, "logits") else out.last_hidden_state).device.type == "meta"
    with pytest.raises(TypeError, match="pixel_values"):
        model(torch.empty(2, 3, 32, 32, device="meta", dtype=torch.uint8))
