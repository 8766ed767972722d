"""Export the encoder (or the classifier) to ONNX or a `torch.export` program, and check it against PyTorch.

Both formats take `pixel_values` of shape `(batch, num_channels, height, width)` with a dynamic batch and, by default,
a dynamic image size (any multiple of the patch size of at least two patches per side: the position table is resized
bicubically inside the graph, as `interpolate_pos_encoding=True` does in PyTorch). The encoder returns
`last_hidden_state` `(batch, 1 + num_patches, hidden_size)`; the classifier returns `logits` `(batch, num_labels)`.

ONNX export uses torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), which needs `onnx` and
`onnxscript`; the check runs the file with `onnxruntime`. Install them with `pip install "maekit[export]"`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .modeling_mae import MAEForImageClassification, MAEModel

__all__ = ["EXPORT_FORMATS", "ExportCheck", "check_export", "export_model", "sample_images"]

EXPORT_FORMATS = ("onnx", "torch-export")
_SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
# scikit-image photos used to check an export on real images (shipped with the package: offline).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


class _Exportable(nn.Module):
    """`pixel_values -> last_hidden_state` (encoder) or `-> logits` (classifier): one tensor in, one tensor out."""

    def __init__(self, model: nn.Module, dynamic_size: bool):
        super().__init__()
        self.model = model
        self.dynamic_size = dynamic_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values, interpolate_pos_encoding=self.dynamic_size)
        return out.logits if isinstance(self.model, MAEForImageClassification) else out.last_hidden_state


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what the exporters print about things maekit does not use (torchvision ops, a deprecated pytree API)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _dynamic_shapes(model: nn.Module, dynamic_batch: bool, dynamic_size: bool) -> dict:
    p, q = model.config.patch_hw
    shapes = {}
    if dynamic_batch:
        shapes[0] = torch.export.Dim("batch", min=1, max=65536)
    if dynamic_size:
        # Multiples of the patch size, so that `height % patch` is provably 0; torch specializes sizes 0 and 1, hence
        # at least two patches per side.
        shapes[2] = p * torch.export.Dim("grid_height", min=2, max=1024)
        shapes[3] = q * torch.export.Dim("grid_width", min=2, max=1024)
    return {"pixel_values": shapes or None}


def export_model(
    model: MAEModel | MAEForImageClassification,
    output: str | Path,
    format: str = "onnx",
    *,
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    opset_version: int | None = None,
) -> Path:
    """Export `model` (in eval mode, float32) to `output`.

    Args:
        model (`MAEModel` or `MAEForImageClassification`): the encoder or the classifier.
        output (`str` or `Path`): the file to write (`.onnx` for ONNX, `.pt2` for `torch.export`).
        format (`str`): `"onnx"` or `"torch-export"`.
        dynamic_batch (`bool`): any batch size at run time.
        dynamic_size (`bool`): any image size that is a multiple of the patch size (at least 2 patches per side;
            a `ValueError` for a model whose own `image_size` has fewer); otherwise only `config.image_size`.
        opset_version (`int`, *optional*): ONNX opset (default: the exporter's).

    Returns:
        `Path`: the file written.

    Example:

    ```python
    import tempfile

    import torch
    from maekit import MAEConfig, MAEModel
    from maekit.export import export_model

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    model = MAEModel(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        program = torch.export.load(export_model(model, f"{folder}/encoder.pt2", "torch-export"))
        pixels = torch.randn(3, 3, 48, 40)  # another batch and size than the traced ones
        expected = model(pixels, interpolate_pos_encoding=True).last_hidden_state
        assert torch.allclose(program.module()(pixels), expected, atol=1e-5)
    ```
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}.")
    if not isinstance(model, (MAEModel, MAEForImageClassification)):
        raise TypeError(f"model must be an MAEModel or MAEForImageClassification, got {type(model).__name__}.")
    output = Path(output)
    if output.suffix != _SUFFIXES[format]:
        raise ValueError(f"--format {format} writes a {_SUFFIXES[format]} file, got output {str(output)!r}.")
    config = model.config
    if dynamic_size and min(config.grid_size) < 2:  # torch.export cannot trace a dynamic size from one patch per side
        (gh, gw), (p, q) = config.grid_size, config.patch_hw
        raise ValueError(
            f"a dynamic image size needs at least two patches per side, and {model.name_or_path or 'the model'}'s "
            f"image_size {'x'.join(map(str, config.image_hw))} is {gh}x{gw} patches of {p}x{q}; pass --static-size "
            "(dynamic_size=False) to export it at that size."
        )
    model = model.eval().float()
    height, width = model.config.image_hw
    example = (torch.randn(2 if dynamic_batch else 1, model.config.num_channels, height, width),)
    wrapper = _Exportable(model, dynamic_size).eval()
    dynamic_shapes = _dynamic_shapes(model, dynamic_batch, dynamic_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_exporter():
        if format == "torch-export":
            torch.export.save(torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes), output)
        else:
            _require_onnx()
            program = torch.onnx.export(
                wrapper,
                example,
                input_names=["pixel_values"],
                output_names=["logits" if isinstance(model, MAEForImageClassification) else "last_hidden_state"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset_version,
                dynamo=True,
                verbose=False,
            )
            program.save(output)
    return output


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if _missing(name)]
    if missing:
        raise ImportError(
            f'ONNX export needs {" and ".join(missing)}: pip install "maekit[export]" (onnx, onnxscript, onnxruntime).'
        )


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


@dataclass
class ExportCheck:
    """One comparison of an exported file with the PyTorch model.

    Args:
        batch_size (`int`), height (`int`), width (`int`): the input shape.
        max_abs_diff (`float`): the largest absolute difference between the two outputs.
    """

    batch_size: int
    height: int
    width: int
    max_abs_diff: float


def sample_images() -> list:
    """Real photos that ship with scikit-image (astronaut, coffee, chelsea, rocket) as PIL images."""
    try:
        from skimage import data as skdata
    except ImportError as err:
        raise ImportError(
            'checking an export on real photos needs scikit-image (pip install "maekit[export]"), or pass your '
            "own images."
        ) from err
    from PIL import Image

    return [Image.fromarray(getattr(skdata, name)()) for name in _PHOTOS]


def check_export(
    path: str | Path,
    model: MAEModel | MAEForImageClassification,
    pixel_values: Sequence[torch.Tensor],
    format: str = "onnx",
) -> list[ExportCheck]:
    """Run the exported file and the PyTorch model (float32, eager) on each batch and compare their outputs.

    Args:
        path (`str` or `Path`): the file written by `export_model`.
        model (`MAEModel` or `MAEForImageClassification`): the model it was exported from.
        pixel_values (`Sequence[torch.Tensor]`): batches `(batch, num_channels, height, width)` (normalized images);
            a size other than `config.image_size` runs PyTorch with `interpolate_pos_encoding=True`.
        format (`str`): `"onnx"` (run with onnxruntime on the CPU) or `"torch-export"`.

    Returns:
        `list[ExportCheck]`: one per batch.
    """
    run = _runner(Path(path), format)
    model = model.eval().float()
    checks = []
    for batch in pixel_values:
        batch = batch.float().contiguous()
        resized = tuple(batch.shape[-2:]) != tuple(model.config.image_hw)
        with torch.no_grad():
            out = model(batch, interpolate_pos_encoding=resized)
            expected = out.logits if isinstance(model, MAEForImageClassification) else out.last_hidden_state
        actual = run(batch)
        if tuple(actual.shape) != tuple(expected.shape):
            raise ValueError(f"{path} returned shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}.")
        diff = (actual - expected).abs().max().item()
        checks.append(ExportCheck(batch.shape[0], batch.shape[2], batch.shape[3], diff))
    return checks


def _runner(path: Path, format: str):
    if format == "torch-export":
        module = torch.export.load(path).module()

        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(batch)

        return run
    if format != "onnx":
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}.")
    if _missing("onnxruntime"):
        raise ImportError('checking an ONNX file needs onnxruntime: pip install "maekit[export]".')
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

    return run
