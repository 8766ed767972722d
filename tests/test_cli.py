"""The `maekit` command line, end to end: every subcommand on a tiny model saved to disk and real photos
(scikit-image), in-process through `maekit.cli.main`, plus one subprocess run of `python -m maekit`."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from maekit import MAEForImageClassification, MAEForPreTraining, MAEImageProcessor, MAEModel
from maekit.cli import build_parser, main, reference_markdown
from maekit.export import export_model
from maekit.features import extract_features_to_file, load_feature_file, open_image_source
from maekit.inputs import load_image_processor
from maekit.visualize import HEADER_HEIGHT, visualize_reconstructions

skdata = pytest.importorskip("skimage.data")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # camera is grayscale
COMMANDS = ("visualize", "extract-features", "convert", "export", "info", "write-shards")


def save_model(model, folder: Path) -> Path:
    height, width = model.config.image_hw
    model.save_pretrained(folder)
    MAEImageProcessor(
        size={"shortest_edge": height + height // 8},
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        patch_size=model.config.patch_size,
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def pretrained(tmp_path, tiny_config):
    return save_model(MAEForPreTraining(tiny_config()).eval(), tmp_path / "mae")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image photos as files: PNGs (one grayscale) and a JPEG, reduced to keep the tests fast."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        image = Image.fromarray(getattr(skdata, name)())
        image.thumbnail((96, 96))
        image.save(folder / (f"{name}.jpg" if name == "coffee" else f"{name}.png"))
    return folder


def run(capsys, *argv) -> str:
    assert main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


def usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def encode(model, paths, processor) -> torch.Tensor:
    """Reference: the encoder on each image, one at a time, straight through the library."""
    pixels = processor([Image.open(path) for path in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).last_hidden_state


# ----------------------------------------------------------------------------------------------------------------------
# Parser


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = "usage: maekit " if command is None else f"usage: maekit {command} "  # convert too, not maekit-convert
    assert out.startswith(expected)


def test_reference_lists_every_command():
    text = reference_markdown()
    for command in COMMANDS:
        assert f"### `maekit {command}`" in text and f"usage: maekit {command}" in text
    assert len(re.findall(r"^```text$", text, re.M)) == 1 + len(COMMANDS)


def test_bad_argument_values_name_the_option(capsys):
    assert "--mask-ratio: expected a number in [0, 1)" in usage_error(
        capsys, "visualize", "m", "x.png", "--mask-ratio", "1.5"
    )
    assert "--batch-size: expected an integer >= 1" in usage_error(
        capsys, "extract-features", "m", "d", "--output", "f.parquet", "--batch-size", "0"
    )
    assert "invalid choice" in usage_error(capsys, "export", "m", "--format", "tflite", "--output", "x")
    assert "--image-size: expected a size like 224 or 224x160" in usage_error(
        capsys, "info", "m", "--image-size", "big"
    )


# ----------------------------------------------------------------------------------------------------------------------
# visualize


def test_visualize_writes_the_reconstruction_figure_of_the_library(capsys, pretrained, photos, tmp_path):
    output = tmp_path / "figs" / "reconstruction.png"
    out = run(
        capsys, "visualize", pretrained, photos / "astronaut.png", photos, "--output", output, "--mask-ratio", "0.5"
    )
    images = [photos / "astronaut.png", *sorted(photos.iterdir())]
    assert f"{len(images)} image(s)" in out and "mask ratio 0.5 (random), seed 0" in out
    figure = np.asarray(Image.open(output))
    # The same figure as the library's, for the same images, noise and mask ratio.
    model = MAEForPreTraining.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)
    pixels = processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    noise = torch.rand(len(images), model.config.num_patches, generator=torch.Generator().manual_seed(0))
    expected = visualize_reconstructions(model, pixels, noise=noise, mask_ratio=0.5)
    np.testing.assert_array_equal(figure, np.asarray(expected))
    # Another seed masks other patches.
    run(
        capsys, "visualize", pretrained, photos, "--output", tmp_path / "seed1.png", "--seed", "1", "--max-images", "2"
    )
    run(capsys, "visualize", pretrained, photos, "--output", tmp_path / "seed0.png", "--max-images", "2")
    assert not np.array_equal(
        np.asarray(Image.open(tmp_path / "seed1.png")), np.asarray(Image.open(tmp_path / "seed0.png"))
    )


def test_visualize_mask_strategies_and_unnormalization(capsys, photos, tmp_path, tiny_config):
    # A norm_pix_loss model: the figure says how removed patches are un-normalized, honest by default.
    model = MAEForPreTraining(tiny_config(norm_pix_loss=True))
    folder = save_model(model, tmp_path / "norm-pix")
    out = run(capsys, "visualize", folder, photos, "--output", tmp_path / "block.png", "--mask-strategy", "block")
    assert "(block), seed 0" in out and "visible patches around them" in out
    images = sorted(photos.iterdir())
    processor = load_image_processor(str(folder), model.config)
    pixels = processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    expected = visualize_reconstructions(model.eval(), pixels, mask_strategy="block", seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "block.png")), np.asarray(expected))
    out = run(capsys, "visualize", folder, photos, "--output", tmp_path / "oracle.png", "--unnormalize", "oracle")
    assert "(random), seed 0" in out and "an oracle" in out
    assert "invalid choice" in usage_error(capsys, "visualize", folder, photos, "--mask-strategy", "checkerboard")


def test_visualize_reads_a_transformers_vit_mae_folder(capsys, photos, tmp_path, tiny_config):
    from maekit.convert import to_transformers

    to_transformers(MAEForPreTraining(tiny_config())).save_pretrained(tmp_path / "hf")  # no preprocessor_config.json
    out = run(capsys, "visualize", tmp_path / "hf", photos / "chelsea.png", "--output", tmp_path / "hf.png")
    assert "1 image(s)" in out
    assert Image.open(tmp_path / "hf.png").size == (4 * 96 + 5 * 2, HEADER_HEIGHT + 96 + 2 * 2)


def test_visualize_errors_name_the_problem(capsys, pretrained, photos, tmp_path, tiny_config):
    encoder = save_model(MAEModel(tiny_config()), tmp_path / "encoder")
    assert "without the MAE decoder" in usage_error(capsys, "visualize", encoder, photos)
    assert f"{tmp_path / 'nope.png'}: no such file or folder" in usage_error(
        capsys, "visualize", pretrained, tmp_path / "nope.png"
    )
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert f"cannot read image {tmp_path / 'broken.png'}" in usage_error(
        capsys, "visualize", pretrained, tmp_path / "broken.png"
    )
    # Not an image at all: PIL's message names an in-memory file object (`<_io.BytesIO object at 0x...>`); the
    # command's names the file, once, as maekit.data does.
    (tmp_path / "notes.jpg").write_bytes(b"shopping list")
    err = usage_error(capsys, "visualize", pretrained, tmp_path / "notes.jpg")
    expected = (
        f"error: cannot read image {tmp_path / 'notes.jpg'}: UnidentifiedImageError: cannot identify image file\n"
    )
    assert err.endswith(expected)
    # A decompression bomb (over twice PIL's pixel limit: PIL's own error, not an OSError) is a bad file too.
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        err = usage_error(capsys, "visualize", pretrained, tmp_path / "bomb.png")
    assert f"error: cannot read image {tmp_path / 'bomb.png'}: DecompressionBombError: " in err
    (tmp_path / "empty").mkdir()
    assert "is a folder without a config.json" in usage_error(capsys, "visualize", tmp_path / "empty", photos)
    assert "maekit visualize: error:" in usage_error(capsys, "visualize", pretrained, tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------------
# extract-features


@pytest.fixture
def labeled_folder(photos, tmp_path):
    """DATA/<class>/<image>: 5 photos in two classes, plus one file that is not an image."""
    folder = tmp_path / "data"
    for path in sorted(photos.iterdir()):
        target = folder / ("animals" if path.stem in ("chelsea", "coffee") else "things") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "things" / "broken.png").write_bytes(b"\x89PNG truncated")
    return folder


@pytest.mark.parametrize("suffix", [".safetensors", ".parquet"])
def test_extract_features_keeps_every_input_in_order(capsys, caplog, pretrained, labeled_folder, tmp_path, suffix):
    output = tmp_path / f"features{suffix}"
    # batch 2 over 6 inputs with chunks of 4: a partial last batch, a chunk boundary inside the data, one bad file.
    out = run(
        capsys, "extract-features", pretrained, labeled_folder, "--output", output, "--batch-size", "2",
        "--chunk-size", "4", "--num-workers", "0", "--no-progress",
    )  # fmt: skip
    assert "5 of 6 inputs" in out and "1 bad file(s)" in out and "things/broken.png" in out
    assert not [record for record in caplog.records if record.name == "maekit.data"]  # listed once, at the end
    names = sorted(p.relative_to(labeled_folder).as_posix() for p in labeled_folder.rglob("*.*"))
    good = [name for name in names if name != "things/broken.png"]
    loaded = load_feature_file(output)
    assert loaded.file_names == good
    assert loaded.indices.tolist() == [names.index(name) for name in good]
    assert loaded.label_names == ["animals", "things"]
    assert loaded.labels.tolist() == [0 if name.startswith("animals") else 1 for name in good]
    assert [bad["file"] for bad in loaded.bad_files] == ["things/broken.png"]
    assert loaded.metadata["num_inputs"] == 6 and loaded.metadata["pooling"] == "cls"
    model = MAEModel.from_pretrained(pretrained).eval()
    expected = encode(
        model, [labeled_folder / name for name in good], load_image_processor(str(pretrained), model.config)
    )
    torch.testing.assert_close(loaded.features, expected[:, 0], rtol=0, atol=1e-5)
    assert not output.with_name(output.name + ".parts").exists()


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_extract_features_pooling(capsys, pretrained, photos, tmp_path, pooling):
    output = tmp_path / "features.parquet"
    run(capsys, "extract-features", pretrained, photos, "--output", output, "--pooling", pooling, "--no-progress")
    loaded = load_feature_file(output)
    model = MAEModel.from_pretrained(pretrained).eval()
    paths = sorted(photos.iterdir())
    hidden = encode(model, paths, load_image_processor(str(pretrained), model.config))
    expected = hidden[:, 1:].mean(dim=1) if pooling == "mean" else hidden
    torch.testing.assert_close(loaded.features, expected, rtol=0, atol=1e-5)
    assert loaded.labels is None and loaded.file_names == [p.name for p in paths]


def test_extract_features_restarts_where_an_interrupted_run_stopped(capsys, pretrained, photos, tmp_path):
    output = tmp_path / "features.safetensors"
    model = MAEModel.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)

    def interrupt(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features_to_file(
            model, open_image_source(photos), output, processor, chunk_size=2, batch_size=1, progress=False,
            on_chunk=interrupt,
        )  # fmt: skip
    parts = output.with_name(output.name + ".parts")
    assert sorted(p.name for p in parts.glob("chunk-*")) == ["chunk-000000.safetensors"] and not output.exists()
    # Another extraction cannot reuse these chunks.
    assert "what differs: pooling." in usage_error(
        capsys, "extract-features", pretrained, photos, "--output", output, "--chunk-size", "2", "--pooling", "mean"
    )
    out = run(capsys, "extract-features", pretrained, photos, "--output", output, "--chunk-size", "2", "--no-progress")
    assert "2 inputs resumed from an interrupted run" in out and not parts.exists()
    fresh = tmp_path / "fresh.safetensors"
    run(capsys, "extract-features", pretrained, photos, "--output", fresh, "--no-progress", "--num-workers", "0")
    resumed, reference = load_feature_file(output), load_feature_file(fresh)
    assert resumed.file_names == reference.file_names
    torch.testing.assert_close(resumed.features, reference.features, rtol=0, atol=1e-6)


def interrupt_after_first_chunk(model, source, output, processor, **kwargs) -> None:
    def interrupt(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features_to_file(
            model, source, output, processor, chunk_size=2, batch_size=1, progress=False, on_chunk=interrupt, **kwargs
        )
    assert [p.name for p in output.with_name(output.name + ".parts").glob("chunk-*")] == ["chunk-000000.safetensors"]


def invert_images(folder: Path, names=None) -> None:
    for path in sorted(folder.iterdir()) if names is None else [folder / name for name in names]:
        with Image.open(path) as image:
            inverted = ImageOps.invert(image.convert("RGB") if image.mode != "L" else image)
        inverted.save(path)


def test_extract_features_restart_refuses_other_data_edited_files_and_another_dtype(
    capsys, pretrained, photos, tmp_path
):
    model = MAEModel.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)
    output = tmp_path / "features.safetensors"
    # Another folder with the same file names (a copy, every image inverted): its chunks would be another data set's.
    shutil.copytree(photos, tmp_path / "inverted")
    invert_images(tmp_path / "inverted")
    interrupt_after_first_chunk(model, open_image_source(photos), output, processor)
    command = ("extract-features", pretrained, "--output", output, "--chunk-size", "2", "--no-progress")
    assert "what differs: DATA; inputs (their names, file sizes and modification times" in usage_error(
        capsys, *command, tmp_path / "inverted"
    )
    # The same folder, a file of the finished chunk edited since: refused too (file sizes and modification times).
    shutil.rmtree(output.with_name(output.name + ".parts"))
    shutil.copytree(photos, tmp_path / "edited")
    interrupt_after_first_chunk(model, open_image_source(tmp_path / "edited"), output, processor)
    invert_images(tmp_path / "edited", [sorted(photos.iterdir())[0].name])
    assert "what differs: inputs (" in usage_error(capsys, *command, tmp_path / "edited")
    # An interrupted bfloat16 run is not finished in float32, and the other way round; the same dtype resumes it.
    shutil.rmtree(output.with_name(output.name + ".parts"))
    interrupt_after_first_chunk(model, open_image_source(photos), output, processor, dtype=torch.bfloat16)
    assert "what differs: dtype." in usage_error(capsys, *command, photos)
    out = run(capsys, *command, photos, "--dtype", "bfloat16")
    assert "2 inputs resumed from an interrupted run" in out


def test_extract_features_restart_tells_path_less_datasets_apart(capsys, pretrained, photos, tmp_path):
    """Two datasets of in-memory images with the same length have the same names (train[0], ...): the dataset's
    fingerprint tells them apart."""
    import datasets

    model = MAEModel.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)
    images = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(photos.iterdir())[:3]]

    def save(pixels) -> None:
        shutil.rmtree(tmp_path / "saved", ignore_errors=True)
        features = datasets.Features({"image": datasets.Image()})
        records = [Image.fromarray(array) for array in pixels]
        datasets.Dataset.from_dict({"image": records}, features=features).save_to_disk(tmp_path / "saved")

    save(images)
    output = tmp_path / "features.parquet"
    interrupt_after_first_chunk(model, open_image_source(tmp_path / "saved"), output, processor)
    save([255 - array for array in images])  # the same path, length and names; other images
    command = ("extract-features", pretrained, tmp_path / "saved", "--output", output, "--chunk-size", "2")
    assert "what differs: inputs (" in usage_error(capsys, *command, "--no-progress")
    save(images)  # the first dataset again: its chunks are its own
    assert "2 inputs resumed" in run(capsys, *command, "--no-progress")
    assert load_feature_file(output).file_names == ["train[0]", "train[1]", "train[2]"]


def test_symlinked_folders_are_followed_and_loops_are_not(photos, tmp_path):
    from maekit.inputs import find_images

    # data/cat: a folder; data/dog: a link to a folder elsewhere (its images and its class must not vanish).
    (tmp_path / "data" / "cat").mkdir(parents=True)
    shutil.copy(photos / "chelsea.png", tmp_path / "data" / "cat")
    (tmp_path / "elsewhere").mkdir()
    for name in ("astronaut.png", "camera.png"):
        shutil.copy(photos / name, tmp_path / "elsewhere")
    (tmp_path / "data" / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    expected = ["cat/chelsea.png", "dog/astronaut.png", "dog/camera.png"]

    def check() -> None:
        source = open_image_source(tmp_path / "data")
        assert source.names == expected
        assert source.label_names == ["cat", "dog"] and source.labels == [0, 1, 1]
        assert find_images([tmp_path / "data"]) == [str(tmp_path / "data" / name) for name in expected]

    check()
    # A folder of links only, with images only behind them, holds images.
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert open_image_source(tmp_path / "links").names == ["dog/astronaut.png", "dog/camera.png"]
    # Links back to a folder they sit in (a loop) are not followed: the same images, once, and no endless walk.
    (tmp_path / "elsewhere" / "up").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "data" / "cat" / "itself").symlink_to(tmp_path / "data" / "cat", target_is_directory=True)
    check()


def test_extract_features_from_a_file_list_and_from_datasets(capsys, pretrained, photos, tmp_path):
    import datasets

    shutil.copytree(photos, tmp_path / "copy")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{photos / 'rocket.png'}\n\ncopy/camera.png\n")  # absolute, then relative
    out = run(capsys, "extract-features", pretrained, listing, "--output", tmp_path / "list.parquet", "--no-progress")
    assert "2 of 2 inputs" in out
    names = load_feature_file(tmp_path / "list.parquet").file_names
    assert names == [str(photos / "rocket.png"), str(tmp_path / "copy" / "camera.png")]
    # A datasets folder (save_to_disk) with an Image and a ClassLabel column.
    # In-memory images (no file behind them): named by split and position.
    images = [
        Image.fromarray(np.asarray(Image.open(photos / name)))
        for name in ("astronaut.png", "chelsea.png", "camera.png")
    ]
    features = datasets.Features(
        {"img": datasets.Image(), "kind": datasets.ClassLabel(names=["person", "cat", "man"])}
    )
    # A broken record in the middle (bytes that are no image) keeps its place: left out, named by position.
    records = [images[0], {"bytes": b"\x89PNG broken", "path": None}, images[1], images[2]]
    dataset = datasets.Dataset.from_dict({"img": records, "kind": [0, 1, 1, 2]}, features=features)
    dataset.save_to_disk(tmp_path / "saved")
    out = run(
        capsys, "extract-features", pretrained, tmp_path / "saved", "--output", tmp_path / "ds.safetensors",
        "--no-progress", "--batch-size", "3", "--num-workers", "2",
    )  # fmt: skip
    assert "3 of 4 inputs" in out and "1 bad file(s)" in out and "sample 1: cannot decode" in out
    loaded = load_feature_file(tmp_path / "ds.safetensors")
    assert loaded.file_names == ["train[0]", "train[2]", "train[3]"] and loaded.indices.tolist() == [0, 2, 3]
    assert [(bad["index"], bad["file"]) for bad in loaded.bad_files] == [(1, "train[1]")]
    assert loaded.labels.tolist() == [0, 1, 2] and loaded.label_names == ["person", "cat", "man"]
    model = MAEModel.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)
    with torch.no_grad():
        expected = model(processor(images, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]
    torch.testing.assert_close(loaded.features, expected, rtol=0, atol=1e-5)
    # A folder of parquet files, read as `datasets.load_dataset` reads a Hub repo; image files keep their paths.
    (tmp_path / "hub").mkdir()
    paths = [str(photos / "rocket.png"), str(photos / "coffee.jpg")]
    on_disk = datasets.Dataset.from_dict({"image": paths}, features=datasets.Features({"image": datasets.Image()}))
    on_disk.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    run(
        capsys, "extract-features", pretrained, tmp_path / "hub", "--output", tmp_path / "hub.parquet", "--no-progress"
    )
    assert load_feature_file(tmp_path / "hub.parquet").file_names == paths


def test_extract_features_reads_a_saved_dataset_dict_in_place(capsys, pretrained, photos, tmp_path):
    """A `DatasetDict.save_to_disk` folder is read where it is (memory-mapped), not copied into the datasets cache."""
    import datasets

    paths = sorted(photos.iterdir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(files):
        return datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": [0, 1][: len(files)]}, features)

    datasets.DatasetDict({"train": split(paths[:2]), "test": split(paths[2:3])}).save_to_disk(tmp_path / "saved")
    source = open_image_source(tmp_path / "saved", split="train")
    assert len(source) == 2 and source.description == f"dataset {tmp_path / 'saved'} (train)"
    assert [Path(file["filename"]).parent.parent for file in source.records.cache_files] == [tmp_path / "saved"]
    with pytest.raises(ValueError, match=r"has no split 'validation'; splits: \['train', 'test'\]"):
        open_image_source(tmp_path / "saved", split="validation")
    output = tmp_path / "test.safetensors"
    out = run(capsys, "extract-features", pretrained, tmp_path / "saved", "--split", "test", "--output", output,
              "--no-progress")  # fmt: skip
    assert "1 of 1 inputs" in out
    assert load_feature_file(output).file_names == [paths[2].name]  # save_to_disk stored the image bytes


def test_extract_features_errors(capsys, pretrained, photos, tmp_path):
    (tmp_path / "taken.parquet").write_bytes(b"")
    assert "exists; remove it" in usage_error(
        capsys, "extract-features", pretrained, photos, "--output", tmp_path / "taken.parquet"
    )
    assert "must end in .safetensors or .parquet" in usage_error(
        capsys, "extract-features", pretrained, photos, "--output", tmp_path / "f.npy"
    )
    assert "DATA ./no/such/folder: no such file or folder" in usage_error(
        capsys, "extract-features", pretrained, "./no/such/folder", "--output", tmp_path / "f.parquet"
    )
    # HF_HUB_OFFLINE=1 in the tests: a Hub id cannot be reached.
    assert "DATA 'someone/some-images' is not a file or folder here, and loading it as a Hub dataset failed" in (
        usage_error(capsys, "extract-features", pretrained, "someone/some-images", "--output", tmp_path / "f.parquet")
    )


# ----------------------------------------------------------------------------------------------------------------------
# export


def diffs(out: str) -> list[float]:
    return [float(value) for value in re.findall(r"max abs diff (\S+) ok", out)]


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_export_encoder_matches_pytorch_on_photos(capsys, pretrained, photos, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        ort = pytest.importorskip("onnxruntime")
    output = tmp_path / ("encoder.onnx" if fmt == "onnx" else "encoder.pt2")
    out = run(capsys, "export", pretrained, "--format", fmt, "--output", output)
    assert "scikit-image photos" in out and "input  pixel_values (batch, 3, height, width)" in out
    checked = diffs(out)
    assert len(checked) == 3 and max(checked) <= 1e-4  # batch 1 and 4 at 32x32, batch 4 at 48x40
    # Independently of the command's own check: another batch size and a non-square size of real images.
    model = MAEModel.from_pretrained(pretrained).eval()
    processor = load_image_processor(str(pretrained), model.config)
    images = [Image.open(path) for path in sorted(photos.iterdir())]
    pixels = processor(images, size={"height": 24, "width": 56}, do_center_crop=False, return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        expected = model(pixels, interpolate_pos_encoding=True).last_hidden_state
    if fmt == "onnx":
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["pixel_values"]
        assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
        actual = torch.from_numpy(session.run(None, {"pixel_values": pixels.numpy()})[0])
    else:
        actual = torch.export.load(output).module()(pixels)
    assert actual.shape == (5, 1 + 3 * 7, 32)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


def test_export_classifier_static_batch_and_size(capsys, photos, tmp_path, tiny_config):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = MAEForImageClassification(tiny_config(num_labels=5)).eval()
    torch.nn.init.normal_(model.head.weight)  # a head that is not ~0, so that the comparison means something
    folder = save_model(model, tmp_path / "classifier")
    output = tmp_path / "classifier.onnx"
    out = run(
        capsys, "export", folder, "--classifier", "--format", "onnx", "--output", output, "--static-batch",
        "--static-size", "--check-images", photos / "chelsea.png", photos / "camera.png",
    )  # fmt: skip
    assert "output logits (1, 5)" in out and "2 image(s)" in out and len(diffs(out)) == 1
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32] and session.get_outputs()[0].name == "logits"
    pixels = load_image_processor(str(folder), model.config)(Image.open(photos / "coffee.jpg"), return_tensors="pt")
    with torch.no_grad():
        expected = model(pixels["pixel_values"]).logits
    actual = session.run(None, {"pixel_values": pixels["pixel_values"].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=0, atol=1e-4)


def test_export_errors(capsys, pretrained, tmp_path, tiny_config):
    assert "without a classification head" in usage_error(
        capsys, "export", pretrained, "--classifier", "--format", "torch-export", "--output", tmp_path / "c.pt2"
    )
    assert "writes a .pt2 file" in usage_error(
        capsys, "export", pretrained, "--format", "torch-export", "--output", tmp_path / "c.onnx"
    )
    # A bad check image is named before anything is exported, without PIL's `<_io.BytesIO object at 0x...>`.
    (tmp_path / "notes.png").write_bytes(b"shopping list")
    err = usage_error(
        capsys, "export", pretrained, "--format", "torch-export", "--output", tmp_path / "e.pt2",
        "--check-images", tmp_path / "notes.png",
    )  # fmt: skip
    expected = (
        f"error: cannot read image {tmp_path / 'notes.png'}: UnidentifiedImageError: cannot identify image file\n"
    )
    assert err.endswith(expected) and not (tmp_path / "e.pt2").exists()
    # A dynamic image size needs two patches per side: a model trained on fewer is exported at its own size only.
    small = save_model(MAEModel(tiny_config(image_size=(8, 16), mask_ratio=0.5)), tmp_path / "small")
    for fmt, output in (("torch-export", tmp_path / "small.pt2"), ("onnx", tmp_path / "small.onnx")):
        err = usage_error(capsys, "export", small, "--format", fmt, "--output", output)
        assert "maekit export: error: a dynamic image size needs at least two patches per side" in err
        assert "image_size 8x16 is 1x2 patches of 8x8; pass --static-size" in err and "Traceback" not in err
    from maekit.export import export_model  # the library says the same

    with pytest.raises(ValueError, match="image_size 8x16 is 1x2 patches of 8x8; pass --static-size"):
        export_model(MAEModel.from_pretrained(small), tmp_path / "small.pt2", "torch-export")
    assert not (tmp_path / "small.pt2").exists()
    out = run(capsys, "export", small, "--format", "torch-export", "--output", tmp_path / "small.pt2", "--static-size")
    assert "input  pixel_values (batch, 3, 8, 16)\n" in out and len(diffs(out)) == 2


def test_export_without_onnx_says_what_to_install(capsys, pretrained, tmp_path, monkeypatch):
    import maekit.export

    monkeypatch.setattr(maekit.export, "_missing", lambda module: module == "onnxscript")
    assert 'ONNX export needs onnxscript: pip install "maekit[export]"' in usage_error(
        capsys, "export", pretrained, "--format", "onnx", "--output", tmp_path / "e.onnx"
    )


def test_position_table_is_resized_while_exporting_and_that_changes_nothing(monkeypatch, tiny_config, tmp_path):
    # While exporting, the table is resized even at the trained grid (a same-size test would be a guard that fixes the
    # image size); bicubic to the same grid must be the identity, bit for bit, on a real table and a trained-like one.
    from maekit.modeling_mae import _resize_pos_embed, sincos_pos_embed_2d

    tables = [sincos_pos_embed_2d(64, (6, 5)), torch.randn(1, 1 + 6 * 5, 64)]
    assert all(_resize_pos_embed(table, (6, 5), (6, 5)) is table for table in tables)  # eager: the shortcut
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    for table in tables:
        resized = _resize_pos_embed(table, (6, 5), (6, 5))
        assert resized is not table and torch.equal(resized, table)
    monkeypatch.delattr(torch.compiler, "is_exporting")  # torch < 2.6: is_compiling (true under export) decides
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    resized = _resize_pos_embed(tables[1], (6, 5), (6, 5))
    assert resized is not tables[1] and torch.equal(resized, tables[1])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert _resize_pos_embed(tables[1], (6, 5), (6, 5)) is tables[1]
    monkeypatch.undo()
    # Traced at 32x32, the program runs at other sizes and batches, as PyTorch with interpolate_pos_encoding does.
    model = MAEModel(tiny_config()).eval()
    program = torch.export.load(export_model(model, tmp_path / "encoder.pt2", "torch-export")).module()
    for shape in ((2, 3, 32, 32), (1, 3, 48, 40), (3, 3, 16, 64)):
        pixels = torch.randn(shape)
        with torch.no_grad():
            expected = model(pixels, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(program(pixels), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# info


def test_info_counts_parameters_and_flops_like_torch(capsys, tiny_config, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from common import count_flops

    from maekit.info import flops_per_image

    config = tiny_config(image_size=(32, 48), mask_ratio=0.6)
    model = MAEForPreTraining(config)
    folder = save_model(model, tmp_path / "mae")
    info = json.loads(run(capsys, "info", folder, "--json"))
    assert info["architecture"] == "MAEForPreTraining" and info["grid"] == [4, 6]
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["parameters"]["decoder"] == sum(p.numel() for p in model.decoder.parameters())
    pixels = torch.randn(3, 3, 32, 48)
    flops = flops_per_image(config)
    assert info["flops"]["pretraining_forward"] == flops.pretraining_forward
    assert count_flops(lambda: model(pixels)) == 3 * flops.pretraining_forward
    assert count_flops(lambda: model(pixels).loss.backward()) == 3 * flops.pretraining_step
    encoder = MAEModel(config).eval()
    assert count_flops(lambda: encoder(pixels)) == 3 * flops.inference
    bigger = flops_per_image(config, image_size=64)
    assert (
        count_flops(lambda: encoder(torch.randn(2, 3, 64, 64), interpolate_pos_encoding=True)) == 2 * bigger.inference
    )
    classifier = MAEForImageClassification(tiny_config(num_labels=7)).eval()
    with_head = flops_per_image(classifier.config, num_labels=7).inference
    assert count_flops(lambda: classifier(torch.randn(1, 3, 32, 32))) == with_head


def test_info_reads_presets_and_transformers_folders(capsys, tmp_path, tiny_config):
    from maekit.convert import to_transformers

    out = run(capsys, "info", "vit-base-patch16")
    assert "patch grid     14x14 = 196 patches" in out and "inference, all patches     35.13 GFLOP" in out
    assert "encoder 85,647,360, decoder 26,008,320, total 111,655,680" in out
    model = MAEForPreTraining(tiny_config())
    to_transformers(model).save_pretrained(tmp_path / "hf")
    out = run(capsys, "info", tmp_path / "hf", "--image-size", "48x64", "--mask-ratio", "0.5")
    assert "architecture   MAEForPreTraining" in out and "6x8 = 48 patches" in out and "sees 24 of 48" in out
    assert f"total {sum(p.numel() for p in model.parameters()):,}" in out
    assert "must be a positive multiple of patch_size 8x8" in usage_error(
        capsys, "info", tmp_path / "hf", "--image-size", "30"
    )


# ----------------------------------------------------------------------------------------------------------------------
# write-shards


def test_write_shards_end_to_end(capsys, labeled_folder, tmp_path):
    from maekit.data import load_image_dataset
    from maekit.shards import ShardReader, expand_shard_urls

    out = run(capsys, "write-shards", labeled_folder, tmp_path / "shards", "--max-samples-per-shard", "2")
    pattern = out.strip().rsplit(": ", 1)[1]
    assert out.startswith("Wrote 3 shard(s)") and pattern == f"{tmp_path}/shards/shard-{{000000..000002}}.tar"
    # Every file in path order with its own bytes (the broken one too: the dataset skips it when decoding fails)
    # and its class as the label.
    names = sorted(path.relative_to(labeled_folder).as_posix() for path in labeled_folder.rglob("*.*"))
    records = list(ShardReader(expand_shard_urls(pattern), shuffle_buffer=0, shuffle_shards=False))
    assert [record["image"]["bytes"] for record in records] == [(labeled_folder / name).read_bytes() for name in names]
    assert [record["label"] for record in records] == [0 if name.startswith("animals") else 1 for name in names]
    assert [record["__key__"] for record in records] == [f"{index:09d}" for index in range(len(names))]
    train, _ = load_image_dataset(pattern, shuffle_buffer=0)
    assert train.num_shards == 3 and train.has_labels
    # The same source gives the same bytes.
    run(capsys, "write-shards", labeled_folder, tmp_path / "again", "--max-samples-per-shard", "2")
    for shard in sorted((tmp_path / "shards").iterdir()):
        assert shard.read_bytes() == (tmp_path / "again" / shard.name).read_bytes()


def test_write_shards_stay_within_max_shard_size(capsys, tmp_path):
    from maekit.shards import ShardReader, expand_shard_urls

    # 40 noise PNGs of about 7 kB (noise does not compress): several 100 kB shards, each filled close to the target.
    rng = np.random.default_rng(0)
    (tmp_path / "noise").mkdir()
    for index in range(40):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
            tmp_path / "noise" / f"{index:02d}.png"
        )
    out = run(capsys, "write-shards", tmp_path / "noise", tmp_path / "shards", "--max-shard-size", "100kB")
    shards = sorted((tmp_path / "shards").iterdir())
    sizes = [shard.stat().st_size for shard in shards]
    assert len(shards) > 2 and out.startswith(f"Wrote {len(shards)} shard(s)")
    assert max(sizes) <= 100_000  # tar pads an archive to 10 KiB records: the padding is part of the budget
    assert min(sizes[:-1]) > 100_000 - 2 * 10_240  # and shards are not closed much earlier than needed
    pattern = out.strip().rsplit(": ", 1)[1]
    assert len(list(ShardReader(expand_shard_urls(pattern), shuffle_buffer=0, shuffle_shards=False))) == 40


def test_write_shards_errors(capsys, labeled_folder, tmp_path):
    assert "maekit write-shards: error: SOURCE ./no/such/folder: no such file or folder" in usage_error(
        capsys, "write-shards", "./no/such/folder", tmp_path / "out"
    )
    assert "max_shard_size must be a positive number of bytes or a size like '256MB', got '12XB'" in usage_error(
        capsys, "write-shards", labeled_folder, tmp_path / "out", "--max-shard-size", "12XB"
    )
    assert "--max-samples-per-shard: expected an integer >= 1" in usage_error(
        capsys, "write-shards", labeled_folder, tmp_path / "out", "--max-samples-per-shard", "0"
    )
    run(capsys, "write-shards", labeled_folder, tmp_path / "out")
    assert "already holds shards named shard-*.tar" in usage_error(
        capsys, "write-shards", labeled_folder, tmp_path / "out"
    )
    assert "split='test' not found" in usage_error(
        capsys, "write-shards", labeled_folder, tmp_path / "other", "--split", "test"
    )


# ----------------------------------------------------------------------------------------------------------------------
# convert, and the installed commands


def test_convert_is_the_maekit_convert_command(capsys, pretrained, tmp_path):
    out = run(capsys, "convert", pretrained, tmp_path / "hf", "--to", "transformers")
    assert "MAEForPreTraining (maekit -> transformers)" in out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "vit_mae"


def test_python_dash_m_maekit_runs_in_a_subprocess(pretrained):
    result = subprocess.run(
        [sys.executable, "-m", "maekit", "info", str(pretrained)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "architecture   MAEForPreTraining" in result.stdout


def test_console_scripts_are_declared():
    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"maekit": "maekit.cli:main", "maekit-convert": "maekit.convert:main"}
    installed = shutil.which("maekit")
    if installed is None:
        pytest.skip("the maekit console script is not installed here (pip install -e . installs it)")
    result = subprocess.run([installed, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("maekit ")


def test_parser_commands():
    parser = build_parser()
    assert parser.prog == "maekit"
    args = parser.parse_args(["extract-features", "m", "d", "--output", "f.parquet"])
    assert (args.pooling, args.batch_size, args.chunk_size, args.dtype) == ("cls", 64, 1024, "float32")
