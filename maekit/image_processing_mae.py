"""MAEImageProcessor: the inference-time preprocessing saved next to a model (resize, center crop, normalize).

A transformers 5.x image processor on the PIL/NumPy backend, so it needs neither torchvision nor a GPU. Its defaults
are those of ``facebook/vit-mae-base``'s preprocessor_config.json: resize to 224x224 with bicubic resampling
(``resample: 3``), rescale by 1/255, normalize with the ImageNet mean and std.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, infer_channel_dimension_format
from transformers.processing_utils import ImagesKwargs

from .patches import patchify, unpatchify

# The ImageNet normalization of the official code (and transformers' IMAGENET_DEFAULT_*), defined once for maekit.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# ITU-R 601-2 luma weights, as PIL's "RGB" -> "L" conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def convert_image_mode(image: Image.Image, num_channels: int = 3) -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB (``num_channels=3``) or 8-bit grayscale (``num_channels=1``).

    - Transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour) is composited on a white
      background, as a browser or an image viewer shows such an image; simply dropping alpha would expose whatever
      colour the transparent pixels happen to store (often black).
    - 16-bit and 32-bit integer images (``I;16``, ``I``) are mapped from the 0-65535 range to 0-255 (``v / 257``);
      PIL's own conversion clips them at 255 instead, which turns most 16-bit photos white.
    - ``CMYK``, ``YCbCr``, ``P``, ``1``, ``F`` and the rest go through PIL's conversion.

    Args:
        image (`PIL.Image.Image`): the image; returned unchanged when it already has the target mode.
        num_channels (`int`): 3 for RGB or 1 for grayscale.

    Returns:
        `PIL.Image.Image` in mode ``"RGB"`` or ``"L"``.
    """
    if num_channels not in (1, 3):
        raise ValueError(
            f"num_channels={num_channels} cannot be produced from a PIL image; accepted: 1 (L) or 3 (RGB)."
        )
    target = "RGB" if num_channels == 3 else "L"
    if image.mode == target:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif (image.mode == "P" and "transparency" in image.info) or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    elif image.mode == "LA":
        image = _composite_la(image)
    return image if image.mode == target else image.convert(target)


def _composite_la(image: Image.Image) -> Image.Image:
    """Composite a grayscale + alpha ("LA") image on white, returning mode "L"."""
    gray, alpha = (np.asarray(band, dtype=np.float32) for band in image.split())
    out = gray * (alpha / 255.0) + 255.0 * (1.0 - alpha / 255.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _convert_array_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
    """(C, H, W) array -> (num_channels, H, W): gray to RGB by repetition, RGB to gray by luma, alpha on white."""
    channels = image.shape[0]
    if channels == num_channels:
        return image
    if channels in (2, 4):  # trailing alpha channel, composited on white
        if image.dtype != np.uint8:
            raise ValueError(
                f"An array with {channels} channels (color + alpha) must be uint8 to be composited; got {image.dtype}."
            )
        color = image[:-1].astype(np.float32)
        alpha = image[-1:].astype(np.float32) / 255.0
        image = np.clip(np.rint(color * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)
        channels -= 1
    if channels == num_channels:
        return image
    if channels == 1 and num_channels == 3:
        return np.repeat(image, 3, axis=0)
    if channels == 3 and num_channels == 1:
        gray = np.tensordot(_LUMA, image.astype(np.float32), axes=1)[None]
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else gray
    raise ValueError(f"Cannot convert an image with {image.shape[0]} channels to num_channels={num_channels}.")


class MAEImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of `MAEImageProcessor` beyond the standard `ImagesKwargs`.

    Attributes:
        num_channels (`int`): channels of the model input; images are converted to this many (1 or 3 for PIL).
        patch_size (`int` or `(int, int)`): patch size used by `patchify` / `unpatchify`.
    """

    num_channels: int | None
    patch_size: int | list[int] | tuple[int, int] | None


class MAEImageProcessor(PilBackend):
    r"""Image processor for maekit's MAE models (PIL/NumPy backend, no torchvision needed).

    Pipeline: mode conversion to `num_channels` → resize (exact `size={"height", "width"}` or
    `size={"shortest_edge"}`) → optional center crop to `crop_size` → rescale (1/255) → normalize.

    Args:
        do_resize (`bool`, defaults to `True`): resize to `size`.
        size (`dict`, defaults to 224x224): the output size `{"height": h, "width": w}`, or `{"shortest_edge": n}`
            to keep the aspect ratio (then usually followed by a center crop).
        resample (`PILImageResampling`, defaults to `BICUBIC`): resampling filter, as vit-mae-base (`resample: 3`).
        do_center_crop (`bool`, defaults to `False`): center crop to `crop_size` after resizing.
        crop_size (`dict`, defaults to 224x224): the center crop `{"height": h, "width": w}`.
        do_rescale (`bool`, defaults to `True`): multiply the pixel values by `rescale_factor`.
        rescale_factor (`float`, defaults to `1/255`): the rescaling factor.
        do_normalize (`bool`, defaults to `True`): subtract `image_mean` and divide by `image_std`.
        image_mean, image_std (`Sequence[float]`): one value per channel; ImageNet statistics by default.
        do_convert_rgb (`bool`, defaults to `True`): convert inputs to `num_channels` (see `convert_image_mode`).
        num_channels (`int`, defaults to 3): channels the model expects.
        patch_size (`int`, defaults to 16): patch size of `patchify` / `unpatchify`.

    Example:

    ```python no-run
    >>> from maekit import MAEImageProcessor
    >>> processor = MAEImageProcessor()
    >>> inputs = processor(images=pil_image, return_tensors="pt")  # inputs.pixel_values: (1, 3, 224, 224)
    ```
    """

    valid_kwargs = MAEImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_resize = True
    size = {"height": 224, "width": 224}
    resample = PILImageResampling.BICUBIC
    do_center_crop = False
    crop_size = {"height": 224, "width": 224}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = True
    num_channels = 3
    patch_size = 16

    def __init__(self, **kwargs):
        # As MAEConfig: an auto_map read from a preprocessor_config.json is dropped, never written on.
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        if not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {self.num_channels!r}.")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name, None)
            if isinstance(value, (list, tuple)) and len(value) != self.num_channels:
                raise ValueError(
                    f"{name} has {len(value)} values but num_channels is {self.num_channels}; give one per channel."
                )
        if isinstance(self.patch_size, list):
            self.patch_size = tuple(self.patch_size)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One PIL image, numpy array or torch tensor -> a channels-first numpy array with `num_channels` channels."""
        num_channels = self.num_channels if num_channels is None else num_channels
        if isinstance(image, Image.Image):
            if do_convert_rgb:
                image = convert_image_mode(image, num_channels)
            array = np.asarray(image)
            return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
        if image.ndim == 2:
            image = image[None]
        elif image.ndim != 3:
            raise ValueError(f"Expected an image of 2 or 3 dimensions, got shape {image.shape}.")
        else:
            if input_data_format is None:
                input_data_format = infer_channel_dimension_format(image, num_channels=(1, 2, 3, 4))
            if input_data_format == ChannelDimension.LAST:
                image = image.transpose(2, 0, 1)
        if do_convert_rgb:
            image = _convert_array_channels(image, num_channels)
        return np.ascontiguousarray(image)

    def patchify(self, pixel_values: torch.Tensor, patch_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*q*C) in the model's patch layout (`maekit.modeling_mae.patchify`)."""
        return patchify(pixel_values, self.patch_size if patch_size is None else patch_size)

    def unpatchify(
        self,
        patches: torch.Tensor,
        image_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """(B, L, p*q*C) -> (B, C, H, W); `image_size` defaults to the processor's output size."""
        if image_size is None:
            target = self.crop_size if self.do_center_crop else self.size
            if target.height is None or target.width is None:
                raise ValueError(f"Pass image_size: the output size is not fixed by size={dict(self.size)}.")
            image_size = (target.height, target.width)
        return unpatchify(
            patches, self.patch_size if patch_size is None else patch_size, image_size, self.num_channels
        )


def _default_to_the_pil_backend() -> None:
    """Make `AutoImageProcessor` pick `MAEImageProcessor` without asking for a torchvision backend first.

    With `backend=None`, transformers asks for the torchvision backend whenever torchvision is installed; a processor
    registered for the PIL backend only (maekit's: it needs neither torchvision nor a GPU) then logged "Requested
    torchvision backend is not available. Falling back to pil backend." on every load. transformers keeps a list of
    processors whose default backend is PIL; `MAEImageProcessor` joins it (`MAEConfig.image_processor_type` names it
    for folders whose preprocessor_config.json does not). An explicit `backend="torchvision"` still says there is none.
    """
    from transformers.models.auto import image_processing_auto

    defaults = getattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None)
    if isinstance(defaults, list) and MAEImageProcessor.__name__ not in defaults:
        defaults.append(MAEImageProcessor.__name__)


_default_to_the_pil_backend()

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "MAEImageProcessor", "convert_image_mode"]
