"""Semantic segmentation: UperNet on MAEBackbone, metrics, inference helpers, transforms, data, a learning test."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, UperNetConfig, UperNetForSemanticSegmentation, pipeline

from maekit import MAEBackboneConfig, MAEForPreTraining
from maekit.data import sample_rng
from maekit.segmentation import (
    ADE20K_RECIPE,
    TEXTURE_CLASSES,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationMetric,
    SegmentationTrainTransform,
    evaluate_segmentation,
    load_segmentation_dataset,
    load_texture_mosaics,
    photometric_distortion,
    reduce_labels,
    segmentation_collate_fn,
    segmentation_image_processor,
    segmentation_metrics,
    slide_inference,
    upernet_from_pretrained,
    whole_inference,
)
from maekit.training.layer_decay import param_groups_layer_decay
from tests.conftest import TINY

PYRAMID = dict(pyramid_scales=[4, 2, 1, 0.5], pyramid_channels=16)
HEAD = dict(hidden_size=16, auxiliary_channels=8)


def tiny_upernet(num_labels=4, **backbone):
    config = UperNetConfig(
        backbone_config=MAEBackboneConfig(**{**TINY, **PYRAMID, **backbone}), num_labels=num_labels, **HEAD
    )
    return UperNetForSemanticSegmentation(config)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def brute_force_metrics(predictions, labels, num_labels, ignore_index):
    """Per-class loops over every pixel, written from the definitions (mmseg / evaluate's mean_iou)."""
    pairs = [(int(p), int(t)) for p, t in zip(predictions.flatten(), labels.flatten()) if int(t) != ignore_index]
    ious, accs = [], []
    for c in range(num_labels):
        inter = sum(1 for p, t in pairs if p == c and t == c)
        union = sum(1 for p, t in pairs if p == c or t == c)
        in_label = sum(1 for _, t in pairs if t == c)
        ious.append(inter / union if union else float("nan"))
        accs.append(inter / in_label if in_label else float("nan"))
    return {
        "mean_iou": float(np.nanmean(ious)),
        "pixel_accuracy": sum(1 for p, t in pairs if p == t) / len(pairs),
        "mean_accuracy": float(np.nanmean(accs)),
        "per_class_iou": ious,
    }


def test_metrics_match_brute_force_over_several_batches():
    generator = torch.Generator().manual_seed(3)
    num_labels, ignore = 5, 255
    metric = SegmentationMetric(num_labels, ignore)
    all_predictions, all_labels = [], []
    for _ in range(3):
        labels = torch.randint(0, num_labels - 1, (2, 9, 7), generator=generator)  # class 4 never labelled
        labels[torch.rand(labels.shape, generator=generator) < 0.2] = ignore
        predictions = torch.randint(0, num_labels, (2, 9, 7), generator=generator)
        predictions[:, 0] = 3  # class 3 over-predicted
        metric.update(predictions, labels)
        all_predictions.append(predictions)
        all_labels.append(labels)
    got = metric.compute()
    expected = brute_force_metrics(torch.cat(all_predictions), torch.cat(all_labels), num_labels, ignore)
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12)
    assert np.allclose(got["per_class_iou"], expected["per_class_iou"], equal_nan=True)
    # A class seen in neither labels nor predictions is left out of the mean (nan), not counted as 0 or 1.
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    assert np.isnan(metric.compute()["per_class_iou"][2]) and metric.compute()["mean_iou"] == pytest.approx(0.5)


def test_metrics_take_logits_and_reject_bad_input():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    assert segmentation_metrics(logits, torch.full((1, 2, 2), 2), 3)["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"must be in \[0, 3\)"):
        segmentation_metrics(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_labels"):
        SegmentationMetric(0)


# ----------------------------------------------------------------------------------------------------------------------
# Model


def test_upernet_forward_backward_loss_reaches_the_backbone():
    model = tiny_upernet().train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[:, :8] = 255
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (2, 4, 64, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.backbone.mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.pyramid.stages[0][0].weight.grad.abs().sum() > 0


def test_upernet_from_pretrained_carries_the_encoder(tmp_path, tiny_config):
    pretrained = MAEForPreTraining(tiny_config())
    pretrained.save_pretrained(tmp_path / "pre")
    model = upernet_from_pretrained(
        tmp_path / "pre", id2label={0: "sky", 1: "tree", 2: "road"}, pyramid_channels=16, drop_path_rate=0.1, **HEAD
    )
    assert type(model) is UperNetForSemanticSegmentation and model.training
    assert model.config.num_labels == 3 and model.config.id2label[1] == "tree"
    assert model.config.backbone_config.drop_path_rate == 0.1
    encoder = {k: v for k, v in pretrained.mae.state_dict().items() if not k.startswith("norm.")}
    assert all(torch.equal(v, encoder[k]) for k, v in model.backbone.mae.state_dict().items())
    with pytest.raises(ValueError, match="num_labels or id2label"):
        upernet_from_pretrained(tmp_path / "pre")


def test_save_load_auto_and_pipeline_round_trip(tmp_path, tiny_config):
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path / "pre")
    model = upernet_from_pretrained(tmp_path / "pre", id2label={0: "a", 1: "b", 2: "c"}, pyramid_channels=16, **HEAD)
    model.eval()
    model.save_pretrained(tmp_path / "seg")
    segmentation_image_processor(64).save_pretrained(tmp_path / "seg")
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert config["model_type"] == "upernet" and config["backbone_config"]["model_type"] == "maekit_mae_backbone"

    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "seg")
    assert type(loaded) is UperNetForSemanticSegmentation
    # Bit-exact: also the patch projection, which maekit's init used to overwrite inside a transformers model.
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert [k for k in original if not torch.equal(original[k], reloaded[k])] == []
    pixel_values = torch.randn(1, 3, 48, 64)
    assert torch.equal(model(pixel_values).logits, loaded(pixel_values).logits)

    segmenter = pipeline("image-segmentation", model=str(tmp_path / "seg"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    annotation = segmenter(image)
    assert annotation and {a["label"] for a in annotation} <= {"a", "b", "c"}
    assert all(a["mask"].size == (70, 50) for a in annotation)
    union = sum(np.asarray(a["mask"]) > 0 for a in annotation)
    assert (union == 1).all()  # every pixel in exactly one class mask


def test_layer_decay_groups_for_upernet():
    model = tiny_upernet()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65)
    layer_of = {name: g["layer_id"] for g in groups for name in g["param_names"]}
    assert sorted(layer_of) == sorted(n for n, _ in model.named_parameters())
    assert layer_of["backbone.mae.cls_token"] == 0 and layer_of["backbone.mae.patch_embed.proj.weight"] == 0
    assert layer_of["backbone.mae.blocks.1.attn.proj.weight"] == 2
    assert layer_of["decode_head.classifier.weight"] == 3 and layer_of["backbone.pyramid.stages.0.0.weight"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# Inference


class PixelwiseModel(torch.nn.Module):
    """Logits from a 1x1 convolution: translation-equivariant per pixel, so sliding windows must equal the whole."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.config = UperNetConfig(backbone_config=MAEBackboneConfig(**TINY), num_labels=4)

    def forward(self, pixel_values):
        return type("Out", (), {"logits": self.conv(pixel_values)})()


def test_slide_inference_averages_windows_and_covers_every_pixel():
    model = PixelwiseModel()
    pixel_values = torch.randn(2, 3, 50, 75)
    whole = whole_inference(model, pixel_values)
    slide = slide_inference(model, pixel_values, crop_size=32, stride=21)
    assert torch.allclose(slide, whole, atol=1e-6)
    resized = slide_inference(model, pixel_values, crop_size=64, stride=64, output_size=(25, 30))
    assert resized.shape == (2, 4, 25, 30)
    # A model whose output depends on the window position: each pixel gets the mean of its windows' values.
    calls = []

    def positional(pixel_values):
        calls.append(pixel_values.shape[-2:])
        return type("Out", (), {"logits": torch.full((1, 1, *pixel_values.shape[-2:]), float(len(calls)))})()

    out = slide_inference(positional, torch.zeros(1, 3, 10, 16), crop_size=(10, 10), stride=(10, 4))
    assert calls == [(10, 10)] * 3  # windows at x = 0, 4, 6 (the last one aligned with the border)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 5] == pytest.approx(1.5) and out[0, 0, 0, 15] == 3


def test_evaluate_segmentation_whole_and_slide_on_a_perfect_model():
    model = PixelwiseModel()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    samples = [{"pixel_values": torch.randn(3, 20, 24), "labels": torch.full((40, 48), 2)}]
    samples[0]["labels"][0, 0] = 255
    for mode in ("whole", "slide"):
        scores = evaluate_segmentation(model, samples, mode=mode, crop_size=16, stride=8)
        assert scores["pixel_accuracy"] == 1.0 and scores["mean_iou"] == 1.0
    with pytest.raises(ValueError, match="mode must be"):
        evaluate_segmentation(model, samples, mode="tiles")


# ----------------------------------------------------------------------------------------------------------------------
# Transforms


def _striped_pair(height=60, width=90):
    """An image whose colour encodes its label (vertical stripes of 3 classes) and the label map."""
    labels = (np.arange(width)[None, :].repeat(height, 0) * 3 // width).astype(np.uint8)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
    return Image.fromarray(colours[labels]), Image.fromarray(labels)


def test_train_transform_keeps_image_and_labels_aligned_and_pads_with_ignore():
    image, label = _striped_pair()
    transform = SegmentationTrainTransform(
        crop_size=64,
        scale=(120, 40),
        ratio_range=(0.5, 1.0),
        photometric_distortion=False,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    for index in range(8):
        out = transform(image, label, sample_rng(0, 0, index))
        pixels, labels = out["pixel_values"] * 255, out["labels"]
        assert pixels.shape == (3, 64, 64) and labels.shape == (64, 64) and labels.dtype == torch.int64
        valid = labels != 255
        assert valid.any() and (~valid).any()  # the resized image is smaller than the crop: padded
        assert (pixels[:, ~valid] == 0).all()
        # Away from stripe borders (bilinear blends there), the dominant channel of a pixel is its label.
        interior = valid.clone()
        interior[:, 1:] &= labels[:, 1:] == labels[:, :-1]
        interior[:, :-1] &= labels[:, :-1] == labels[:, 1:]
        assert torch.equal(pixels.argmax(dim=0)[interior], labels[interior])
    again = transform(image, label, sample_rng(0, 0, 3))
    assert torch.equal(again["labels"], transform(image, label, sample_rng(0, 0, 3))["labels"])


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[:, 90:] = 1  # class 0 covers 90%
    image = Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8))

    def mixed(cat_max_ratio):
        transform = SegmentationTrainTransform(
            crop_size=20,
            scale=(100, 100),
            ratio_range=(1.0, 1.0),
            cat_max_ratio=cat_max_ratio,
            flip_prob=0.0,
            photometric_distortion=False,
        )
        outs = [transform(image, Image.fromarray(labels), sample_rng(1, 0, i))["labels"] for i in range(40)]
        return sum(len(torch.unique(o)) > 1 for o in outs)

    assert mixed(0.75) > 3 * max(mixed(1.0), 1)


def test_reduce_labels_and_photometric_distortion():
    # As mmseg's LoadAnnotations(reduce_zero_label=True): 0 -> 255, k -> k - 1, and 255 stays 255 (254 is put back).
    assert reduce_labels(np.array([0, 1, 150, 255])).tolist() == [255, 0, 149, 255]
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outs = [photometric_distortion(pixels, sample_rng(0, 0, i)) for i in range(20)]
    assert all(o.dtype == np.uint8 and o.shape == pixels.shape for o in outs)
    assert sum(not np.array_equal(o, pixels) for o in outs) >= 15  # changed with probability 1 - 1/16


def test_eval_transform_resizes_keeping_ratio_and_keeps_labels_at_full_size():
    image = Image.new("RGB", (640, 480))
    label = Image.fromarray(np.ones((480, 640), dtype=np.uint8))
    out = SegmentationEvalTransform(reduce_labels=True)(image, label)
    assert out["pixel_values"].shape == (3, 512, 683)  # mmcv: min(2048/640, 512/480) = 1.0667
    assert out["labels"].shape == (480, 640) and (out["labels"] == 0).all()
    assert SegmentationEvalTransform(size_divisor=16)(image)["pixel_values"].shape == (3, 512, 672)


# ----------------------------------------------------------------------------------------------------------------------
# Data


def test_local_folder_of_image_label_pairs(tmp_path):
    for split in ("training", "validation"):
        for name in ("a", "b"):
            (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / "images" / split / f"{name}.jpg")
            Image.fromarray(np.full((6, 8), 3, dtype=np.uint8)).save(tmp_path / "annotations" / split / f"{name}.png")
    splits = load_segmentation_dataset(str(tmp_path))
    assert sorted(splits) == ["train", "validation"] and len(splits["train"]) == 2
    record = splits["validation"][0]
    assert record["image"].size == (8, 6) and np.asarray(record["annotation"]).max() == 3
    (tmp_path / "images" / "training" / "c.jpg").write_bytes((tmp_path / "images" / "training" / "a.jpg").read_bytes())
    with pytest.raises(ValueError, match="have no label map"):
        load_segmentation_dataset(str(tmp_path))


def test_dataset_columns_are_checked_and_renamed(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "mask": datasets.Image()})
    data = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))], "mask": [Image.fromarray(np.zeros((4, 4), np.uint8))]}, features=features
    )
    data.to_parquet(tmp_path / "train.parquet")
    kwargs = {"data_files": {"train": str(tmp_path / "train.parquet")}, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ValueError, match="image_column= and label_column="):
        load_segmentation_dataset("parquet", **kwargs)
    splits = load_segmentation_dataset("parquet", image_column="img", label_column="mask", **kwargs)
    assert splits["train"].column_names == ["image", "annotation"]


def test_texture_mosaic_labels_are_exact_and_splits_use_disjoint_rows():
    from skimage import data as skdata

    size, eval_rows = 12, 64
    splits = load_texture_mosaics(num_train=3, num_eval=3, image_size=size, eval_rows=eval_rows, seed=5)
    photos = [getattr(skdata, name)() for name in TEXTURE_CLASSES]
    for split, (first, last) in (("train", (0, 512 - eval_rows)), ("validation", (512 - eval_rows, 512))):
        for record in splits[split]:
            image = np.asarray(record["image"])
            labels = np.asarray(record["annotation"])
            assert image.shape == (size, size, 3) and (image[..., 0] == image[..., 2]).all()
            assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) >= 2
            for class_id in np.unique(labels):
                region = labels == class_id
                # Each region is the same-place pixels of one window of its photograph, inside the split's rows.
                windows = np.lib.stride_tricks.sliding_window_view(photos[class_id], (size, size))
                match = (windows[:, :, region] == image[..., 0][region]).all(axis=-1)
                rows = np.nonzero(match)[0]
                assert len(rows) and ((rows >= first) & (rows + size <= last)).any()
    again = load_texture_mosaics(num_train=3, num_eval=3, image_size=size, eval_rows=eval_rows, seed=5)
    assert np.array_equal(np.asarray(again["train"][1]["annotation"]), np.asarray(splits["train"][1]["annotation"]))


def test_recipe_is_the_official_one_and_read_only():
    recipe = ADE20K_RECIPE
    assert (recipe["learning_rate"], recipe["layer_decay"], recipe["weight_decay"]) == (1e-4, 0.65, 0.05)
    assert (recipe["max_steps"], recipe["batch_size"], recipe["crop_size"], recipe["warmup_steps"]) == (
        160_000,
        16,
        512,
        1500,
    )
    with pytest.raises(TypeError):
        recipe["learning_rate"] = 1.0
    transform = SegmentationTrainTransform(
        crop_size=recipe["crop_size"],
        scale=recipe["scale"],
        ratio_range=recipe["ratio_range"],
        cat_max_ratio=recipe["cat_max_ratio"],
        reduce_labels=recipe["reduce_labels"],
    )
    assert transform.crop_size == (512, 512)


# ----------------------------------------------------------------------------------------------------------------------
# Learning


def test_overfitting_real_texture_mosaics_drives_loss_down_and_miou_up():
    """8 mosaics of scikit-image's texture photographs, a tiny randomly initialised UperNet-MAE, 50 AdamW steps."""
    torch.manual_seed(0)
    mosaics = load_texture_mosaics(num_train=8, num_eval=1, image_size=64)["train"]
    data = SegmentationDataset(mosaics, SegmentationEvalTransform(scale=(64, 64)))
    batch = segmentation_collate_fn([data[i] for i in range(len(data))])
    model = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=MAEBackboneConfig(
                **{**TINY, "hidden_size": 64, "intermediate_size": 128, "image_size": 64},
                pyramid_scales=[4, 2, 1, 0.5],
                pyramid_channels=32,
            ),
            num_labels=len(TEXTURE_CLASSES),
            hidden_size=32,
            auxiliary_channels=16,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = evaluate_segmentation(model, [batch])["mean_iou"]
    losses = []
    for _ in range(50):
        loss = model.train()(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    end = evaluate_segmentation(model, [batch])["mean_iou"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert start < 0.4 and end > 0.85


def test_label_maps_with_class_ids_beyond_num_labels_are_refused_naming_them():
    # With 2 classes a label 2 used to reach the loss: IndexError in PyTorch, a device-side assert on CUDA.
    image = Image.new("RGB", (16, 12))
    labels = np.zeros((12, 16), dtype=np.uint8)
    labels[0, 0], labels[1, 1] = 2, 255
    for transform in (
        SegmentationTrainTransform(crop_size=8, scale=(16, 12), num_labels=2),
        SegmentationEvalTransform(scale=(16, 12), num_labels=2),
    ):
        with pytest.raises(ValueError, match=r"class ids \[2\] outside \[0, num_labels=2\)"):
            transform(image, labels, torch.Generator().manual_seed(0))
    labels[0, 0] = 1
    assert SegmentationEvalTransform(scale=(16, 12), num_labels=2)(image, labels)["labels"].max() == 255  # ignored
    # reduce_labels: 0 is ignored and 1..N become 0..N-1, so N is allowed before the reduction.
    labels[0, 0] = 2
    reduced = SegmentationEvalTransform(scale=(16, 12), num_labels=2, reduce_labels=True)(image, labels)
    assert reduced["labels"][0, 0] == 1
    dataset = SegmentationDataset(
        [{"image": image, "annotation": Image.fromarray(np.full((12, 16), 5, np.uint8))}],
        SegmentationEvalTransform(scale=(16, 12), num_labels=2),
    )
    with pytest.raises(ValueError, match="sample 0: label map holds class ids"):
        dataset[0]
