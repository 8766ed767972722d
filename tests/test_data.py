"""Data pipeline: RandomResizedCrop semantics and statistics, the fast paths, bad files, streaming, loaders."""

import io
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from maekit.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    BadImageError,
    MAEEvalTransform,
    MAEImageDataset,
    MAEIterableImageDataset,
    MAETrainTransform,
    SeededRandomSampler,
    build_dataloader,
    collate_fn,
    decode_image,
    load_default_dataset,
    load_image_dataset,
    random_resized_crop_box,
    sample_rng,
)
from maekit.image_processing_mae import MAEImageProcessor

try:
    import simplejpeg  # noqa: F401

    HAS_SIMPLEJPEG = True
except ImportError:
    HAS_SIMPLEJPEG = False

MEAN = np.array(IMAGENET_DEFAULT_MEAN)
STD = np.array(IMAGENET_DEFAULT_STD)


def _photo(width=120, height=90, seed=0, cell=10):
    """A smooth random colour image (bilinear-upsampled noise), so that resampling differences stay small."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // cell + 1, width // cell + 1, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BILINEAR)


def _jpeg_bytes(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --- sample_rng ---------------------------------------------------------------------------------------------------


def test_sample_rng_is_a_function_of_seed_epoch_index():
    draw = lambda *key: torch.rand(4, generator=sample_rng(*key))  # noqa: E731
    torch.testing.assert_close(draw(0, 1, 2), draw(0, 1, 2), rtol=0, atol=0)
    for other in [(1, 1, 2), (0, 2, 2), (0, 1, 3), (0, 2, 1)]:
        assert not torch.equal(draw(0, 1, 2), draw(*other))
    with pytest.raises(ValueError, match="non-negative"):
        sample_rng(0, -1, 0)


# --- RandomResizedCrop --------------------------------------------------------------------------------------------


def test_random_resized_crop_box_statistics():
    width, height, scale, ratio = 500, 375, (0.2, 1.0), (3 / 4, 4 / 3)
    generator = torch.Generator().manual_seed(0)
    boxes = np.array([random_resized_crop_box(width, height, scale, ratio, generator) for _ in range(4000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    area = w * h / (width * height)
    log_ratio = np.log(w / h)
    # Rounding w and h to pixels moves the area and the ratio by well under 1%.
    assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1]
    assert log_ratio.min() >= math.log(ratio[0]) - 0.01 and log_ratio.max() <= math.log(ratio[1]) + 0.01
    # Both ends of both ranges are reached, and the accepted draws are spread out (not a constant crop).
    assert area.min() < 0.22 and area.max() > 0.97
    assert log_ratio.min() < math.log(ratio[0]) + 0.02 and log_ratio.max() > math.log(ratio[1]) - 0.02
    # Area is uniform in [0.2, 1] before rejection; large crops with tall ratios do not fit a 4:3 image, so the
    # accepted areas lean to the small side of 0.6 and the ratios to the wide side (torchvision: mean 0.496 and
    # median log-ratio 0.056 over 20,000 draws).
    assert 0.47 < area.mean() < 0.52
    assert 0.02 < np.median(log_ratio) < 0.09
    # Positions are uniform: crops touch every border.
    assert left.min() == 0 and top.min() == 0 and (left + w).max() == width and (top + h).max() == height


def test_random_resized_crop_box_reproduces_torchvision_draws():
    # torchvision.transforms.RandomResizedCrop.get_params(img, (0.2, 1.0), (3/4, 4/3)) after torch.manual_seed(0),
    # recorded with torchvision 0.29.1 and converted from (top, left, h, w) to (left, top, w, h).
    expected = {
        (500, 375): [(100, 23, 361, 310), (103, 41, 301, 278), (160, 44, 338, 313), (112, 30, 184, 222)],
        (60, 45): [(9, 2, 49, 42), (4, 5, 51, 40), (21, 7, 39, 37), (8, 1, 30, 32)],
        (1000, 10): [(493, 0, 13, 10)] * 4,
    }
    torch.manual_seed(0)
    for (width, height), boxes in expected.items():
        assert [random_resized_crop_box(width, height) for _ in range(4)] == boxes


def test_random_resized_crop_fallback_is_a_center_crop_at_the_clamped_ratio():
    # No crop of area >= 90% with ratio in [3/4, 4/3] fits a 1000x10 strip: torchvision's fallback.
    generator = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), generator) == (0, 493, 10, 13)
    assert random_resized_crop_box(1, 1, (0.2, 1.0), (3 / 4, 4 / 3), generator) == (0, 0, 1, 1)


def _reference_train_output(image, size, key, scale=(0.2, 1.0), hflip_prob=0.5):
    """Same draws as MAETrainTransform, then the straightforward crop -> resize -> flip -> normalize."""
    generator = sample_rng(*key)
    left, top, w, h = random_resized_crop_box(image.width, image.height, scale, (3 / 4, 4 / 3), generator)
    flip = float(torch.rand(1, generator=generator)) < hflip_prob
    out = image.crop((left, top, left + w, top + h)).resize(size[::-1], Image.Resampling.BICUBIC)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ((np.asarray(out) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("size, source_size", [((32, 32), (120, 90)), ((24, 40), (120, 90)), ((64, 64), (50, 40))])
def test_train_transform_matches_crop_then_resize_reference(size, source_size):
    image = _photo(*source_size)
    transform = MAETrainTransform(size=size)
    for index in range(6):
        out = transform(image, sample_rng(0, 0, index))
        assert out.shape == (3, *size) and out.dtype == torch.float32 and out.is_contiguous()
        expected = _reference_train_output(image, size, (0, 0, index))
        # In grey levels. Shrinking and enlarging run on torch's antialiased bicubic (PIL's kernel) over the crop,
        # as crop-then-resize: uint8 rounding only.
        diff = np.abs(out.numpy() - expected) * STD[:, None, None] * 255
        assert diff.max() <= 2.001 and diff.mean() < 0.3


def test_train_transform_output_size_for_tiny_and_extreme_images():
    transform = MAETrainTransform(size=(16, 24))
    for width, height in [(1, 1), (2, 300), (300, 2), (7, 5)]:
        out = transform(Image.new("RGB", (width, height), (255, 0, 0)), sample_rng(0, 0, 0))
        assert out.shape == (3, 16, 24)
        torch.testing.assert_close(out[0], torch.full((16, 24), (1 - MEAN[0]) / STD[0], dtype=torch.float32))


def test_train_transform_is_deterministic_per_seed_epoch_index():
    image = _photo()
    transform = MAETrainTransform(size=32)
    a = transform(image, sample_rng(3, 1, 7))
    torch.testing.assert_close(a, transform(image, sample_rng(3, 1, 7)), rtol=0, atol=0)
    assert not torch.equal(a, transform(image, sample_rng(3, 2, 7)))
    assert not torch.equal(a, transform(image, sample_rng(3, 1, 8)))


def test_flip_rate():
    # Whole-image crops (scale 1, ratio of the image) isolate the flip; a horizontal ramp shows its direction.
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    kwargs = dict(size=(48, 64), scale=(1.0, 1.0), ratio=(64 / 48, 64 / 48))
    flips = [bool(MAETrainTransform(**kwargs)(image, sample_rng(0, 0, i))[0, :, 0].mean() > 0) for i in range(400)]
    assert 0.4 < np.mean(flips) < 0.6  # 200 expected, sd 10: a fixed seed, far from either bound
    assert not any(
        MAETrainTransform(**kwargs, hflip_prob=0.0)(image, sample_rng(0, 0, i))[0, 0, 0] > 0 for i in range(20)
    )
    assert all(MAETrainTransform(**kwargs, hflip_prob=1.0)(image, sample_rng(0, 0, i))[0, 0, 0] > 0 for i in range(20))


DECODERS = ["pillow", pytest.param("simplejpeg", marks=pytest.mark.skipif(not HAS_SIMPLEJPEG, reason="no simplejpeg"))]


@pytest.mark.parametrize("decoder", DECODERS)
def test_jpeg_draft_decodes_at_reduced_scale_with_nearly_the_same_output(decoder):
    from skimage import data as skdata

    photo = Image.fromarray(skdata.astronaut()).resize((1024, 1024), Image.Resampling.BICUBIC)
    data = _jpeg_bytes(photo)
    transform = MAETrainTransform(size=128, scale=(0.8, 1.0), jpeg_decoder=decoder)
    for index in range(4):
        image = Image.open(io.BytesIO(data))
        out = transform(image, sample_rng(0, 0, index))
        if decoder == "pillow":
            assert image.size == (256, 256)  # decoded at 1/4 scale: the crop (>= 916 px) still spans >= 1.5 x 128 px
        # Reference: full-resolution decoding, the same crop snapped to the 4-pixel grid of the decoded image.
        generator = sample_rng(0, 0, index)
        box = [4 * round(v / 4) for v in _xyxy(random_resized_crop_box(1024, 1024, (0.8, 1.0), generator=generator))]
        reference = Image.open(io.BytesIO(data)).crop(box).resize((128, 128), Image.Resampling.BICUBIC)
        if float(torch.rand(1, generator=generator)) < 0.5:
            reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = out.numpy().transpose(1, 2, 0) * STD + MEAN
        grey_levels = np.abs(got * 255 - np.asarray(reference))
        assert grey_levels.mean() < 1.0 and grey_levels.max() < 32  # DCT-domain 1/4 + bicubic vs bicubic
    small = Image.open(io.BytesIO(_jpeg_bytes(_photo(120, 90))))
    transform(small, sample_rng(0, 0, 0))
    assert small.size == (120, 90)  # crops under 3x the output are decoded at full size


@pytest.fixture(scope="module")
def photo_jpegs():
    """Three 1600x1200 JPEGs (quality 90) of scikit-image's photos, as bytes."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    return [_jpeg_bytes(Image.fromarray(p).resize((1600, 1200), Image.Resampling.BICUBIC)) for p in photos]


# Grey levels (0-255) between a route's output and full-resolution decoding + the same crop (snapped to the decoded
# grid) + PIL's bicubic resize, over 3 photos x 8 crops at 224x224: mean per image, and 99.9th percentile per image.
# Measured: mean 0.15-0.4 / p99.9 <= 6 at oversampling 1.5; mean 0.3-1.3 / p99.9 <= 20 at 1.0.
PIXEL_BOUNDS = {1.5: (0.6, 10.0), 1.0: (1.6, 28.0)}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("oversampling", sorted(PIXEL_BOUNDS))
def test_reduced_scale_routes_stay_within_the_stated_pixel_bound(photo_jpegs, decoder, oversampling):
    from maekit.jpeg_decode import draft_scale

    transform = MAETrainTransform(size=224, draft_oversampling=oversampling, jpeg_decoder=decoder)
    mean_bound, tail_bound = PIXEL_BOUNDS[oversampling]
    scales = set()
    for k, data in enumerate(photo_jpegs):
        full = Image.open(io.BytesIO(data)).convert("RGB")
        for index in range(8):
            out = transform(Image.open(io.BytesIO(data)), sample_rng(0, k, index)).numpy().transpose(1, 2, 0)
            generator = sample_rng(0, k, index)
            left, top, w, h = random_resized_crop_box(1600, 1200, generator=generator)  # the same boxes as today
            scale = draft_scale(min(w, h) / 224 / oversampling)
            scales.add(scale)
            # The decoded grid: ceil(1600 / scale) pixels span 1600; snap the box to it, back in full-size pixels.
            sx, sy = -(-1600 // scale) / 1600, -(-1200 // scale) / 1200
            box = (
                round(left * sx) / sx,
                round(top * sy) / sy,
                round((left + w) * sx) / sx,
                round((top + h) * sy) / sy,
            )
            reference = full.resize((224, 224), Image.Resampling.BICUBIC, box=box)
            if float(torch.rand(1, generator=generator)) < 0.5:
                reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            grey_levels = np.abs((out * STD + MEAN) * 255 - np.asarray(reference))
            assert grey_levels.mean() < mean_bound and np.quantile(grey_levels, 0.999) < tail_bound
    assert scales == ({1, 2} if oversampling == 1.5 else {2, 4})  # reduced-scale decodes did happen


@pytest.mark.skipif(not HAS_SIMPLEJPEG, reason="no simplejpeg")
def test_simplejpeg_and_pillow_routes_agree_and_fall_back(photo_jpegs, tmp_path):
    fast = MAETrainTransform(size=64, jpeg_decoder="simplejpeg")
    slow = MAETrainTransform(size=64, jpeg_decoder="pillow")
    for index, data in enumerate(photo_jpegs[:2] + [_jpeg_bytes(_photo(300, 200)), _jpeg_bytes(_photo(50, 40))]):
        a = fast(Image.open(io.BytesIO(data)), sample_rng(0, 0, index))
        b = slow(Image.open(io.BytesIO(data)), sample_rng(0, 0, index))
        assert (a - b).abs().mul(STD.max() * 255).max() <= 1.0  # both libjpeg-turbo: at most rounding apart
    # A CMYK JPEG and a grayscale one go through the same colour conversion as before; a file path works too.
    cmyk = tmp_path / "cmyk.jpg"
    _photo(200, 150).convert("CMYK").save(cmyk, "JPEG")
    gray = tmp_path / "gray.jpg"
    _photo(200, 150).convert("L").save(gray, "JPEG")
    for path in (cmyk, gray):
        for num_channels, kwargs in ((3, {}), (1, {"mean": [0.5], "std": [0.5]})):
            outputs = [
                MAETrainTransform(size=32, jpeg_decoder=d, num_channels=num_channels, **kwargs)(
                    decode_image(str(path)), sample_rng(0, 0, 1)
                )
                for d in ("simplejpeg", "pillow")
            ]
            assert outputs[0].shape == (num_channels, 32, 32)
            torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=2 / 255 / 0.224)
    # A damaged JPEG fails in PIL as before (the loaders turn that into a skipped, counted bad image).
    with pytest.raises(OSError):
        fast(Image.open(io.BytesIO(photo_jpegs[0][:5000])), sample_rng(0, 0, 0))


def test_jpeg_decoder_and_oversampling_arguments(monkeypatch):
    import pickle

    from maekit import jpeg_decode

    assert pickle.loads(pickle.dumps(MAETrainTransform(size=8))).size == (8, 8)  # to DataLoader workers
    with pytest.raises(ValueError, match="jpeg_decoder must be one of"):
        MAETrainTransform(jpeg_decoder="turbo")
    with pytest.raises(ValueError, match="draft_oversampling"):
        MAETrainTransform(draft_oversampling=0.5)
    monkeypatch.setattr(jpeg_decode, "_simplejpeg", lambda: None)
    with pytest.raises(ValueError, match=r"maekit\[fast\]"):
        MAETrainTransform(jpeg_decoder="simplejpeg")
    assert MAETrainTransform()._decoder == "pillow"  # "auto" without simplejpeg: the pure-PIL route


def _xyxy(box):
    left, top, w, h = box
    return left, top, left + w, top + h


def test_train_transform_grayscale_and_argument_checks():
    gray = MAETrainTransform(size=16, num_channels=1, mean=[0.5], std=[0.5], jpeg_decoder="pillow")
    assert gray(_photo(), sample_rng(0, 0, 0)).shape == (1, 16, 16)
    jpeg = Image.open(io.BytesIO(_jpeg_bytes(_photo(400, 300))))
    assert gray(jpeg, sample_rng(0, 0, 0)).shape == (1, 16, 16)
    assert jpeg.mode == "L" and jpeg.size[0] < 400  # only the luma plane, at reduced scale
    with pytest.raises(ValueError, match="scale"):
        MAETrainTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="mean and std"):
        MAETrainTransform(num_channels=1)
    with pytest.raises(ValueError, match="size"):
        MAETrainTransform(size=(0, 3))


def test_eval_transform_equals_the_image_processor():
    image = _photo(120, 90)
    transform = MAEEvalTransform(size=32, crop_pct=0.875)
    processor = MAEImageProcessor(
        size={"shortest_edge": 36}, do_center_crop=True, crop_size=32, resample=Image.Resampling.BICUBIC
    )
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(transform(image), expected, rtol=0, atol=0)
    # Independently: shortest edge 90 -> 36 (width 48), center 32x32 crop, normalize.
    reference = image.resize((48, 36), Image.Resampling.BICUBIC).crop((8, 2, 40, 34))
    np.testing.assert_allclose(
        transform(image).numpy(), ((np.asarray(reference) / 255.0 - MEAN) / STD).transpose(2, 0, 1), atol=1e-5
    )


# --- datasets with bad files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of valid images plus five kinds of bad files; returns (folder, set of bad file names)."""
    root = tmp_path_factory.mktemp("images")
    for label in ("cats", "dogs"):
        (root / label).mkdir()
        for i in range(4):
            (root / label / f"{i}.jpg").write_bytes(_jpeg_bytes(_photo(60, 45, seed=10 * len(label) + i)))
    Image.new("RGB", (1, 1), (0, 128, 255)).save(root / "dogs" / "tiny.png")  # valid, smaller than the crop
    good = (root / "cats" / "0.jpg").read_bytes()
    (root / "cats" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    Image.new("L", (1200, 1000)).save(root / "dogs" / "bomb.png")  # 1.2 Mpx, above the test's limit of 1 Mpx
    return root, {"truncated.jpg", "empty.jpg", "not_an_image.png", "bomb.png"}


def _bad_indices(dataset, bad_names):
    paths = [record["path"] for record in dataset.dataset["image"]]
    return {i for i, path in enumerate(paths) if path.rsplit("/", 1)[-1] in bad_names}


def test_folder_with_bad_files_trains_through_with_the_right_skip_count(image_folder):
    root, bad_names = image_folder
    train, evaluation = load_image_dataset(str(root))
    assert evaluation is None and len(train) == 13
    dataset = MAEImageDataset(train, MAETrainTransform(size=16), max_image_pixels=1_000_000)
    bad = _bad_indices(dataset, bad_names)
    assert len(bad) == 4
    items = [dataset[i] for i in range(len(dataset))]
    # Each bad file is replaced by another sample and counted once for its own slot (replacements may be bad too).
    assert {i for i, item in enumerate(items) if item["num_skipped"] > 0} == bad
    assert all(item["pixel_values"].shape == (3, 16, 16) for item in items)
    assert {item["labels"] for item in items} == {0, 1}
    # Replacement is deterministic.
    for i in bad:
        torch.testing.assert_close(dataset[i]["pixel_values"], items[i]["pixel_values"], rtol=0, atol=0)

    loader = build_dataloader(dataset, batch_size=4, shuffle=True, drop_last=False)
    batches = list(loader)
    assert sum(int(batch["num_skipped"]) for batch in batches) == sum(item["num_skipped"] for item in items)
    assert sum(len(batch["labels"]) for batch in batches) == 13


def test_fail_fast_names_the_file(image_folder):
    root, bad_names = image_folder
    train, _ = load_image_dataset(str(root))
    dataset = MAEImageDataset(train, MAETrainTransform(size=16), skip_bad_images=False, max_image_pixels=1_000_000)
    for index in sorted(_bad_indices(dataset, bad_names)):
        with pytest.raises(BadImageError) as error:
            dataset[index]
        assert any(name in str(error.value) for name in bad_names)
    # PIL's own decompression-bomb guard applies by default: 1.2 Mpx is fine then.
    default = MAEImageDataset(train, MAETrainTransform(size=16), skip_bad_images=False)
    index = next(i for i in _bad_indices(dataset, {"bomb.png"}))
    assert default[index]["pixel_values"].shape == (3, 16, 16)


def test_marked_bad_images_keep_their_place_and_name(image_folder, caplog):
    """For evaluation and feature extraction: a bad file is neither replaced nor raised; its item keeps its index,
    label and a message naming the file, and collate_fn passes the markers on in batch order."""
    root, bad_names = image_folder
    train, _ = load_image_dataset(str(root))
    dataset = MAEImageDataset(train, MAEEvalTransform(size=16), mark_bad_images=True, max_image_pixels=1_000_000)
    bad = _bad_indices(dataset, bad_names)
    with caplog.at_level("WARNING", logger="maekit.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert {i for i, item in enumerate(items) if item["bad_image"] is not None} == bad
    # The items carry the messages and their consumers report them (in any worker process): no line per file here.
    assert not [record for record in caplog.records if record.name == "maekit.data"]
    labels = train.features["label"]
    paths = [record["path"] for record in dataset.dataset["image"]]
    for i, item in enumerate(items):
        assert item["pixel_values"].shape == (3, 16, 16) and item["num_skipped"] == 0
        assert item["labels"] == dataset.dataset[i]["label"] and labels.int2str(item["labels"]) in paths[i]
        if i in bad:
            assert paths[i] in item["bad_image"] and not item["pixel_values"].any()
        else:
            torch.testing.assert_close(item["pixel_values"], MAEEvalTransform(size=16)(Image.open(paths[i])))
    loader = build_dataloader(dataset, batch_size=4, shuffle=False)
    batches = list(loader)
    markers = [marker for batch in batches for marker in batch["bad_images"]]
    assert markers == [item["bad_image"] for item in items]
    assert sum(len(batch["labels"]) for batch in batches) == len(dataset) == 13


def test_loaders_without_shuffle_keep_the_last_partial_batch():
    """Evaluation and extraction loaders (shuffle=False) keep every sample; training loaders drop the last partial
    batch, as the official pretraining DataLoader."""
    dataset = [{"pixel_values": torch.full((3, 2, 2), float(i))} for i in range(10)]
    kept = [
        int(x[0, 0, 0])
        for batch in build_dataloader(dataset, batch_size=4, shuffle=False)
        for x in batch["pixel_values"]
    ]
    assert kept == list(range(10))
    shuffled = build_dataloader(dataset, batch_size=4, shuffle=True)
    assert shuffled.drop_last and sum(len(b["pixel_values"]) for b in shuffled) == 8
    assert not build_dataloader(dataset, batch_size=4, shuffle=True, drop_last=False).drop_last


def test_list_of_paths_and_decoded_datasets(image_folder):
    root, _ = image_folder
    paths = sorted(str(p) for p in root.glob("*/[0-9].jpg"))
    dataset = MAEImageDataset(paths, MAETrainTransform(size=16), seed=1)
    item = dataset[3]
    assert set(item) == {"pixel_values", "num_skipped"} and item["num_skipped"] == 0
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["pixel_values"], item["pixel_values"])


def test_epoch_reaches_persistent_workers(image_folder):
    root, _ = image_folder
    paths = sorted(str(p) for p in root.glob("*/[0-9].jpg"))
    dataset = MAEImageDataset(paths, MAETrainTransform(size=16), seed=5)
    loader = build_dataloader(dataset, batch_size=3, num_workers=2, drop_last=False, shuffle=False)
    assert loader.persistent_workers
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        got = torch.cat([batch["pixel_values"] for batch in loader])
        expected = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_streaming_imagefolder(image_folder):
    root, bad_names = image_folder
    train, _ = load_image_dataset(str(root), streaming=True)
    dataset = MAEIterableImageDataset(train, MAETrainTransform(size=16), max_image_pixels=1_000_000)
    items = list(dataset)
    assert len(items) == 13 - len(bad_names)
    assert sum(item["num_skipped"] for item in items) == len(bad_names)
    assert all(item["pixel_values"].shape == (3, 16, 16) for item in items)
    # Same augmentations on a second pass of the same epoch; different ones in the next epoch.
    again = list(dataset)
    torch.testing.assert_close(items[0]["pixel_values"], again[0]["pixel_values"], rtol=0, atol=0)
    dataset.set_epoch(1)
    assert not torch.equal(items[0]["pixel_values"], next(iter(dataset))["pixel_values"])
    batch = collate_fn(items[:4])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].dtype == torch.long


def test_streaming_to_iterable_dataset_and_fail_fast(image_folder):
    root, bad_names = image_folder
    train, _ = load_image_dataset(str(root))
    stream = train.to_iterable_dataset(num_shards=2)
    batches = list(build_dataloader(MAEIterableImageDataset(stream, MAETrainTransform(size=16)), 3, drop_last=False))
    assert sum(len(b["labels"]) for b in batches) == 13 - len(bad_names) + 1  # the bomb passes PIL's default limit
    with pytest.raises(BadImageError):
        list(MAEIterableImageDataset(stream, MAETrainTransform(size=16), skip_bad_images=False))


def test_validation_split_is_carved_when_missing(image_folder):
    root, _ = image_folder
    train, evaluation = load_image_dataset(str(root), train_val_split=0.25, seed=0)
    assert len(train) + len(evaluation) == 13 and len(evaluation) == 4
    train, evaluation = load_image_dataset(str(root), streaming=True, train_val_split=3)
    undecoded = datasets.Image(decode=False)  # iterating decoded records would fail on the bad files
    assert len(list(evaluation.cast_column("image", undecoded))) == 3
    assert len(list(train.cast_column("image", undecoded))) == 10
    with pytest.raises(ValueError, match="train_val_split"):
        load_image_dataset(str(root), streaming=True, train_val_split=0.1)
    with pytest.raises(ValueError, match="image_column"):
        load_image_dataset(str(root), image_column="pixels")


def test_seeded_sampler_and_collate():
    sampler = SeededRandomSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first == list(SeededRandomSampler(50, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first
    batch = collate_fn([{"pixel_values": torch.zeros(3, 4, 4), "num_skipped": 2}] * 2)
    assert set(batch) == {"pixel_values", "num_skipped"} and int(batch["num_skipped"]) == 4


def test_default_dataset_is_embedded_digits():
    train, evaluation = load_default_dataset(image_size=32)
    assert len(train) + len(evaluation) == 1797
    record = train[0]
    assert record["image"].size == (32, 32) and record["image"].mode == "RGB"
    assert set(evaluation["label"]) == set(range(10))
    item = MAEImageDataset(train, MAETrainTransform(size=32))[0]
    assert item["pixel_values"].shape == (3, 32, 32) and 0 <= item["labels"] <= 9


def test_data_pipeline_benchmark_runs_without_torchvision(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import data_pipeline

    out = tmp_path / "data_pipeline.json"
    result = data_pipeline.main(
        ["--rounds", "1", "--images", "2", "--passes", "1", "--warmup", "0", "--no-torchvision", "--output", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    routes = [f"maekit {decoder} {oversampling}" for decoder, oversampling in data_pipeline.ROUTES]
    if not HAS_SIMPLEJPEG:
        routes = [route for route in routes if "pillow" in route]
    assert [(row["JPEG size"], row["impl"]) for row in result["rows"]] == [
        (size, route) for size in ("imagenet 500x375", "photo 1600x1200") for route in routes
    ]
    assert all(row["img/s"] > 0 for row in result["rows"])
    assert "maekit rows only" in capsys.readouterr().out


def test_train_transform_never_shrinks_the_callers_image(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(path, quality=90)
    image = Image.open(path)
    transform = MAETrainTransform(size=32)
    dataset = MAEImageDataset([image], transform, seed=0)
    first, second = dataset[0]["pixel_values"], dataset[0]["pixel_values"]
    assert image.size == (1600, 1200)  # draft() worked on a fresh handle, not on the caller's image
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_transform_configuration_error_is_not_a_bad_file():
    def broken(image, generator=None):
        raise ValueError("mean must have 1 elements")

    dataset = MAEImageDataset([Image.new("RGB", (40, 40))], broken, seed=0)
    with pytest.raises(ValueError, match="mean must have 1 elements") as info:
        dataset[0]
    assert not isinstance(info.value, BadImageError)


def test_iterable_dataset_over_plain_paths(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), (i * 80, 0, 0)).save(paths[-1])
    samples = list(MAEIterableImageDataset(paths, MAETrainTransform(size=32), seed=0))
    assert len(samples) == 3 and samples[0]["pixel_values"].shape == (3, 32, 32)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoding_a_file_leaves_no_file_open(tmp_path, decoder):
    import gc
    import warnings

    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg_bytes(_photo(300, 200)))
    transform = MAETrainTransform(size=16, jpeg_decoder=decoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(3):
            transform(decode_image(str(path)), sample_rng(0, 0, index))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
