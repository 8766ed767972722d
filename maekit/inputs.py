"""What a user points the `maekit` command at: a model (preset, folder or Hub id) and images (files, folders, lists).

Every function here raises `ValueError` with a message that names the offending path or id and what is accepted,
so the command line can print it as `maekit <command>: error: ...` instead of a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformers import PretrainedConfig, ViTMAEConfig

from .configuration_mae import PRESETS, MAEConfig
from .image_processing_mae import MAEImageProcessor
from .modeling_mae import MAEForImageClassification, MAEForPreTraining, MAEModel, MAEPreTrainedModel

__all__ = [
    "IMAGE_SUFFIXES",
    "find_images",
    "iter_image_files",
    "load_image_processor",
    "load_model",
    "read_file_list",
    "resolve_config",
]

# Suffixes taken as images when a folder is listed (case-insensitive); other files in a folder are ignored.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Saved architecture name -> maekit class (transformers' ViTMAE classes load through maekit's from_pretrained).
_ARCHITECTURES: dict[str, type[MAEPreTrainedModel]] = {
    "MAEForPreTraining": MAEForPreTraining,
    "ViTMAEForPreTraining": MAEForPreTraining,
    "MAEModel": MAEModel,
    "ViTMAEModel": MAEModel,
    "MAEForImageClassification": MAEForImageClassification,
}
_PROCESSOR_FILE = "preprocessor_config.json"


def resolve_config(name_or_path: str, allow_presets: bool = False) -> tuple[MAEConfig, type[MAEPreTrainedModel]]:
    """The configuration and saved model class of a maekit or transformers `vit_mae` folder or Hub repo id.

    Args:
        name_or_path (`str`): a local folder with a `config.json`, a Hub repo id, or (with `allow_presets`) a preset
            name such as `"vit-base-patch16"` (then the class is `MAEForPreTraining`).
        allow_presets (`bool`): accept preset names (for commands that need no weights, like `maekit info`).

    Returns:
        `(MAEConfig, class)`: a transformers `vit_mae` config is converted field by field; the class is the maekit
        class matching the saved `architectures` (`MAEForPreTraining` when none is recorded).

    Example:

    ```python
    from maekit import MAEForPreTraining
    from maekit.inputs import resolve_config

    config, model_class = resolve_config("vit-base-patch16", allow_presets=True)
    assert model_class is MAEForPreTraining and config.num_patches == 196
    ```
    """
    if allow_presets and name_or_path in PRESETS:
        return MAEConfig.from_preset(name_or_path), MAEForPreTraining
    path = Path(name_or_path)
    if path.is_file():
        raise ValueError(
            f"{name_or_path} is a file; MODEL is a model folder (config.json + model.safetensors) or a Hub repo id. "
            "Convert checkpoint files first with `maekit convert`."
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"{name_or_path} is a folder without a config.json; MODEL must be a folder written by save_pretrained "
            "(maekit or transformers vit_mae) or a Hub repo id."
        )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as err:
        presets = f" or a preset ({', '.join(PRESETS)})" if allow_presets else ""
        raise ValueError(
            f"{name_or_path!r} is not a model folder here{presets}; reading it as a Hub repo failed: "
            f"{_first_line(err)}"
        ) from err
    model_type = config_dict.get("model_type")
    if model_type == "vit_mae":
        from .vit_mae_interop import config_from_transformers

        config = config_from_transformers(ViTMAEConfig.from_dict(config_dict))
    elif model_type == MAEConfig.model_type:
        config = MAEConfig.from_dict(config_dict)
    else:
        raise ValueError(
            f"{name_or_path} holds a model_type={model_type!r} model; accepted: a maekit {MAEConfig.model_type!r} "
            "or a transformers 'vit_mae' model (convert others with `maekit convert`)."
        )
    architecture = (config_dict.get("architectures") or ["MAEForPreTraining"])[0]
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"{name_or_path} holds a {architecture}; accepted architectures: {', '.join(sorted(_ARCHITECTURES))}."
        )
    return config, _ARCHITECTURES[architecture]


def load_model(name_or_path: str, model_class: type[MAEPreTrainedModel] | None = None) -> MAEPreTrainedModel:
    """Load a maekit or transformers `vit_mae` model in eval mode, checking that it holds what `model_class` needs.

    Args:
        name_or_path (`str`): a model folder or Hub repo id (see `resolve_config`).
        model_class (`type`, *optional*): `MAEForPreTraining` (needs a saved decoder), `MAEForImageClassification`
            (needs a saved head) or `MAEModel` (any checkpoint: the encoder). Default: the saved class.

    Returns:
        The model, in eval mode on the CPU.
    """
    _, saved_class = resolve_config(name_or_path)
    if model_class is None:
        model_class = saved_class
    if model_class is MAEForPreTraining and saved_class is not MAEForPreTraining:
        raise ValueError(
            f"{name_or_path} holds a {saved_class.__name__} without the MAE decoder; reconstructions need a "
            "pretraining checkpoint (MAEForPreTraining, e.g. the output folder of examples/pretrain.py)."
        )
    if model_class is MAEForImageClassification and saved_class is not MAEForImageClassification:
        raise ValueError(
            f"{name_or_path} holds a {saved_class.__name__} without a classification head; fine-tune it first "
            "(examples/finetune.py) or export the encoder."
        )
    if model_class is MAEModel and saved_class is MAEForImageClassification:
        # A mean-pooling classifier has no final encoder norm: take its encoder as it was trained.
        return MAEForImageClassification.from_pretrained(name_or_path).mae.eval()
    try:
        return model_class.from_pretrained(name_or_path).eval()
    except OSError as err:
        raise ValueError(f"cannot load the weights of {name_or_path}: {_first_line(err)}") from err


def load_image_processor(name_or_path: str, config: MAEConfig) -> MAEImageProcessor:
    """The image processor saved with the model, or one that resizes to `config.image_size` (ImageNet mean/std).

    The processor's output size is checked against `config.image_size`, so that a mismatched
    `preprocessor_config.json` is reported here rather than as a shape error inside the model.
    """
    processor = None
    path = Path(name_or_path)
    if not path.is_dir() or (path / _PROCESSOR_FILE).is_file():
        try:
            processor = MAEImageProcessor.from_pretrained(name_or_path)
        except OSError:
            processor = None  # a Hub repo without a preprocessor_config.json
    if processor is None:
        height, width = config.image_hw
        processor = MAEImageProcessor(
            size={"height": height, "width": width}, num_channels=config.num_channels, patch_size=config.patch_size
        )
    target = processor.crop_size if processor.do_center_crop else processor.size
    if (target.height, target.width) != tuple(config.image_hw):
        raise ValueError(
            f"{name_or_path}: {_PROCESSOR_FILE} produces {target.height}x{target.width} images but the model "
            f"expects image_size {config.image_hw}; fix or remove {_PROCESSOR_FILE}."
        )
    return processor


def read_file_list(path: str | os.PathLike) -> list[str]:
    """Paths listed in a text file, one per line; relative paths are relative to the list's folder.

    Blank lines and lines starting with `#` are skipped.
    """
    path = Path(path)
    paths = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            paths.append(str(entry if entry.is_absolute() else path.parent / entry))
    if not paths:
        raise ValueError(f"{path} lists no files.")
    return paths


def find_images(paths: Sequence[str | os.PathLike], file_lists: bool = True) -> list[str]:
    """Expand image files, folders (searched recursively, following links to folders: `iter_image_files`; sorted) and
    `.txt` file lists into a list of image paths.

    Args:
        paths: files, folders, or text files listing one image path per line (see `read_file_list`).
        file_lists (`bool`): read `.txt` files as lists of images.

    Returns:
        `list[str]`: the image paths in order: as given, folders sorted by path. Files are not opened here.

    Example:

    ```python
    import tempfile
    from pathlib import Path

    from PIL import Image
    from maekit.inputs import find_images

    with tempfile.TemporaryDirectory() as folder:
        for name in ("b/2.png", "a/1.jpg", "notes.md"):
            (Path(folder) / name).parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(Path(folder) / name, format="PNG")
        found = find_images([folder])
        assert [Path(p).relative_to(folder).as_posix() for p in found] == ["a/1.jpg", "b/2.png"]
    ```
    """
    images: list[str] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(iter_image_files(path))
            if not found:
                raise ValueError(f"{entry} is a folder without image files ({', '.join(IMAGE_SUFFIXES)}).")
            images += found
        elif path.is_file():
            images += read_file_list(path) if file_lists and path.suffix.lower() == ".txt" else [str(path)]
        else:
            raise ValueError(f"{entry}: no such file or folder.")
    return images


def iter_image_files(folder: str | os.PathLike) -> Iterator[str]:
    """The image files under `folder` (by suffix, `IMAGE_SUFFIXES`), in no particular order.

    Links to folders are followed, as `find -L` does; a link to a folder it sits in (a loop) is not, so every image is
    found once per path that leads to it without passing through the same folder twice.
    """
    stack = [(os.fspath(folder), frozenset())]
    while stack:
        root, ancestors = stack.pop()
        try:
            info = os.stat(root)
            entries = list(os.scandir(root))
        except OSError:  # unreadable, or a dangling link: skipped, as os.walk does
            continue
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # a folder, or a link to one
            except OSError:  # a link in a loop of links
                is_dir = False
            if is_dir:
                stack.append((entry.path, ancestors | {key}))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                yield entry.path


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an error message (transformers' OSErrors run to a paragraph)."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
