"""Fine-tuning augmentations: Mixup / CutMix, RandAugment, RandomErasing and the fine-tuning transforms."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from maekit.augment import (
    RAND_AUGMENT_INCREASING_OPS,
    RAND_AUGMENT_OPS,
    FineTuneEvalTransform,
    FineTuneTrainTransform,
    Mixup,
    MixupCollator,
    RandAugment,
    RandomErasing,
    cutmix_box,
    one_hot_targets,
)
from maekit.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MAEImageDataset, build_dataloader


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _low_contrast_image(width=40, height=32, mode="RGB", seed=0):
    """Smooth noise in [60, 180]: every RandAugment op visibly changes it (no op is a no-op on it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 181, (height // 4, width // 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    return image.convert(mode)


# ----------------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def test_one_hot_targets_with_smoothing():
    targets = one_hot_targets(torch.tensor([2, 0]), num_classes=4, smoothing=0.1)
    expected = torch.full((2, 4), 0.025)
    expected[0, 2] = expected[1, 0] = 0.925
    torch.testing.assert_close(targets, expected)
    with pytest.raises(ValueError, match="num_classes"):
        one_hot_targets(torch.tensor([4]), num_classes=4)


def test_cutmix_box_is_inside_the_image_and_corrects_lambda():
    generator = _seeded(0)
    for lam in np.linspace(0.0, 1.0, 41):
        for height, width in ((32, 32), (17, 45)):
            (top, bottom, left, right), corrected = cutmix_box(height, width, float(lam), generator)
            assert 0 <= top <= bottom <= height and 0 <= left <= right <= width
            assert corrected == pytest.approx(1 - (bottom - top) * (right - left) / (height * width))
            # before clipping the box is int(side * sqrt(1 - lam)) on each side
            assert bottom - top <= int(height * math.sqrt(1 - lam)) and right - left <= int(width * math.sqrt(1 - lam))
            if 0 < top and bottom < height:
                assert bottom - top == int(height * math.sqrt(1 - lam))


def test_mixup_blends_images_and_targets_with_the_same_lambda():
    mixup = Mixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    original = images.clone()
    mixed, targets = mixup(images, labels, _seeded(3))
    torch.testing.assert_close(images, original)  # inputs untouched
    lam = float(targets[1, 1])  # labels[1] = 1 and its partner labels[4] = 4 differ
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    torch.testing.assert_close(targets[1, 4], torch.tensor(1 - lam))


def test_cutmix_pastes_one_box_and_lambda_matches_its_area():
    mixup = Mixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    # image i is constant i, so the pasted box is visible exactly
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 24, 20).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    seen_partial = False
    for seed in range(30):
        mixed, targets = mixup(images, labels, _seeded(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        pasted = mixed[0, 0] != 0  # image 0 receives pixels of image 3
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):
            # a single axis-aligned rectangle, inside the image, the same in every image and channel
            assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            assert int(pasted.sum()) == len(rows) * len(cols)
            assert torch.all(mixed[:, :, pasted] == images.flip(0)[:, :, pasted])
            seen_partial = True
        area = float(pasted.float().mean())
        assert float(targets[0, 0]) == pytest.approx(1 - area, abs=1e-6)
        assert float(targets[0, 3]) == pytest.approx(area, abs=1e-6)
    assert seen_partial


def test_mixup_with_smoothing_switch_and_prob():
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    mixup = Mixup(num_classes=10)  # official: mixup 0.8, cutmix 1.0, switch 0.5, smoothing 0.1
    kinds = set()
    for seed in range(40):
        mixed, targets = mixup(images, labels, _seeded(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        assert float(targets.min()) == pytest.approx(0.01)  # smoothing / num_classes on never-seen classes
        changed = (mixed != images).flatten(1).float().mean(1)
        kinds.add("cutmix" if float(changed[0]) < 1 else "mixup")
    assert kinds == {"cutmix", "mixup"}
    never = Mixup(num_classes=10, prob=0.0)
    mixed, targets = never(images, labels, _seeded(0))
    torch.testing.assert_close(mixed, images)
    torch.testing.assert_close(targets, one_hot_targets(labels, 10, 0.1))


def test_mixup_lambda_follows_beta_distribution():
    mixup = Mixup(num_classes=2, mixup_alpha=0.8, cutmix_alpha=0.0)
    generator = _seeded(0)
    lams = np.array([mixup.sample(generator)[0] for _ in range(3000)])
    # Beta(0.8, 0.8): mean 1/2, variance 1 / (4 (2 * 0.8 + 1)) = 0.0962
    assert lams.mean() == pytest.approx(0.5, abs=0.02)
    assert lams.var() == pytest.approx(1 / (4 * 2.6), abs=0.008)


def test_mixup_is_deterministic_with_a_generator():
    mixup = Mixup(num_classes=3)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    first, again = mixup(images, labels, _seeded(7)), mixup(images, labels, _seeded(7))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [mixup(images, labels, _seeded(seed))[1] for seed in range(8, 12)]
    assert any(not torch.equal(first[1], other) for other in others)


def test_mixup_collator_and_errors():
    collator = MixupCollator(Mixup(num_classes=3))
    examples = [{"pixel_values": torch.randn(3, 8, 8), "labels": i % 3, "num_skipped": 0} for i in range(4)]
    batch = collator(examples)
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["labels"].shape == (4, 3)
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(4))
    assert int(batch["num_skipped"]) == 0
    with pytest.raises(ValueError, match="labels"):
        collator([{"pixel_values": torch.randn(3, 8, 8)}])
    with pytest.raises(ValueError, match="mixup_alpha"):
        Mixup(num_classes=3, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        Mixup(num_classes=3)(torch.randn(4, 3, 8, 8), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# RandAugment


def test_rand_augment_op_sets():
    assert len(RAND_AUGMENT_OPS) == len(RAND_AUGMENT_INCREASING_OPS) == 15
    assert RandAugment().ops == RAND_AUGMENT_INCREASING_OPS  # timm "rand-m9-mstd0.5-inc1"
    assert RandAugment(increasing=False).ops == RAND_AUGMENT_OPS
    with pytest.raises(ValueError, match="ops"):
        RandAugment(ops=["Cutout"])


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("name", sorted(set(RAND_AUGMENT_OPS) | set(RAND_AUGMENT_INCREASING_OPS)))
def test_every_rand_augment_op_keeps_size_and_mode_and_changes_the_image(name, mode):
    image = _low_contrast_image(mode=mode)
    # the non-"Increasing" Posterize / Solarize / enhance ops are weakest at high magnitude (timm's scales)
    magnitude = 9 if name in RAND_AUGMENT_INCREASING_OPS else 3
    op = RandAugment(num_ops=1, magnitude=magnitude, magnitude_std=0.0, prob=1.0, ops=[name])
    out = op(image, _seeded(0))
    assert out.size == image.size and out.mode == image.mode
    # saturation is the one thing a grayscale image does not have
    unchanged = mode == "L" and name.startswith("Color")
    assert np.array_equal(np.asarray(out), np.asarray(image)) == unchanged


def test_rand_augment_magnitudes():
    image = _low_contrast_image(width=100, height=20)
    pixels = np.asarray(image).astype(int)

    def apply(name, magnitude, seed=0, **kwargs):
        op = RandAugment(num_ops=1, magnitude=magnitude, magnitude_std=0.0, prob=1.0, ops=[name], **kwargs)
        return np.asarray(op(image, _seeded(seed))).astype(int)

    np.testing.assert_array_equal(apply("Invert", 5), 255 - pixels)
    np.testing.assert_array_equal(
        apply("SolarizeAdd", 10), np.where(pixels < 128, np.minimum(pixels + 110, 255), pixels)
    )
    np.testing.assert_array_equal(apply("PosterizeIncreasing", 10), 0 * pixels)  # 0 bits kept: black
    np.testing.assert_array_equal(apply("PosterizeIncreasing", 5), pixels & 0b11000000)  # 4 - int(2) = 2 bits kept
    np.testing.assert_array_equal(apply("SolarizeIncreasing", 5), np.where(pixels >= 128, 255 - pixels, pixels))
    # TranslateXRel at magnitude 10: 45% of the width, direction at random, uncovered area filled
    shifts = set()
    for seed in range(6):
        out = apply("TranslateXRel", 10, seed, fill=(1, 2, 3), interpolation=Image.Resampling.NEAREST)
        if np.array_equal(out[:, :55], pixels[:, 45:]):
            shifts.add(45)
            assert np.all(out[:, 55:] == [1, 2, 3])
        else:
            np.testing.assert_array_equal(out[:, 45:], pixels[:, :55])
            assert np.all(out[:, :45] == [1, 2, 3])
            shifts.add(-45)
    assert shifts == {45, -45}


def test_rand_augment_is_deterministic_and_random_across_seeds():
    image = _low_contrast_image()
    augment = RandAugment()
    first = np.asarray(augment(image, _seeded(1)))
    np.testing.assert_array_equal(first, np.asarray(augment(image, _seeded(1))))
    outputs = [np.asarray(augment(image, _seeded(seed))) for seed in range(2, 12)]
    assert any(not np.array_equal(first, out) for out in outputs)
    # each of the 2 ops is skipped with probability 0.5: some images come back untouched, most do not
    untouched = sum(np.array_equal(out, np.asarray(image)) for out in outputs)
    assert 0 < untouched < 8
    with pytest.raises(ValueError, match="mode"):
        augment(image.convert("CMYK"))


# ----------------------------------------------------------------------------------------------------------------------
# RandomErasing


def test_random_erasing_erases_one_rectangle_of_noise():
    image = torch.full((3, 40, 50), 7.0)
    erase = RandomErasing(probability=1.0)
    for seed in range(20):
        out = erase(image, _seeded(seed))
        assert out.shape == image.shape and out.dtype == image.dtype
        assert torch.all(image == 7.0)  # not in place
        erased = (out != 7.0).any(0)
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(erased.sum()) == h * w  # one full rectangle
        assert 0.02 * 2000 - h - w <= h * w <= 2000 / 3 + h + w  # area fraction in [0.02, 1/3] up to rounding
        noise = out[:, erased]
        assert abs(float(noise.mean())) < 0.5 and 0.6 < float(noise.std()) < 1.4  # per-pixel N(0, 1)


def test_random_erasing_modes_probability_and_batches():
    image = torch.full((3, 32, 32), 7.0)
    const = RandomErasing(probability=1.0, mode="const")(image, _seeded(0))
    assert set(const.unique().tolist()) == {0.0, 7.0}
    rand = RandomErasing(probability=1.0, mode="rand")(image, _seeded(0))
    erased = (rand != 7.0).any(0)
    assert all(len(rand[c, erased].unique()) == 1 for c in range(3))  # one colour per channel
    assert torch.equal(RandomErasing(probability=0.0)(image, _seeded(0)), image)
    batch = torch.full((400, 1, 16, 16), 7.0, dtype=torch.float64)
    out = RandomErasing(probability=0.25)(batch, _seeded(0))
    assert out.dtype == torch.float64
    fraction = float((out != 7.0).flatten(1).any(1).float().mean())
    assert fraction == pytest.approx(0.25, abs=0.07)
    first = RandomErasing(probability=0.5)(batch[:20], _seeded(5))
    assert torch.equal(first, RandomErasing(probability=0.5)(batch[:20], _seeded(5)))
    with pytest.raises(ValueError, match="mode"):
        RandomErasing(mode="zeros")
    with pytest.raises(ValueError, match="float"):
        RandomErasing()(torch.zeros(3, 8, 8, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


def test_fine_tune_train_transform():
    image = _low_contrast_image(width=64, height=48)
    transform = FineTuneTrainTransform(size=32)
    out = transform(image, _seeded(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(image, _seeded(0)))
    assert not torch.equal(out, transform(image, _seeded(1)))
    gray = FineTuneTrainTransform(size=(16, 24), num_channels=1, mean=(0.5,), std=(0.5,))(image, _seeded(0))
    assert gray.shape == (1, 16, 24)


def test_fine_tune_train_transform_without_randomness_is_resize_and_normalize():
    image = _low_contrast_image(width=48, height=48)
    transform = FineTuneTrainTransform(
        size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0, auto_augment=False, reprob=0.0
    )
    expected = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (expected - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    out = transform(image, _seeded(0))
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        FineTuneTrainTransform(scale=(0.5, 1.5))
    with pytest.raises(TypeError, match="auto_augment"):
        FineTuneTrainTransform(auto_augment="rand-m9")


def test_fine_tune_eval_transform():
    image = _low_contrast_image(width=64, height=48)
    out = FineTuneEvalTransform(size=32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_fine_tune_pipeline_with_dataset_and_mixup_collator():
    images = [_low_contrast_image(width=40, height=40, seed=i) for i in range(8)]
    dataset = MAEImageDataset(images, FineTuneTrainTransform(size=32), seed=3)
    first = dataset[2]["pixel_values"]
    assert torch.equal(first, dataset[2]["pixel_values"])  # per-sample generator: reproducible augmentation
    labeled = [{**dataset[i], "labels": i % 4} for i in range(8)]
    loader = build_dataloader(labeled, batch_size=4, collate_fn=MixupCollator(Mixup(num_classes=4)))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, 4)
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(4))
