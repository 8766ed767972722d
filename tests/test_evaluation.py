"""kNN classifier, top-k accuracy, feature extraction and the linear-probe head."""

import math

import pytest
import torch
from torch import nn

from maekit import MAEForImageClassification, MAEForPreTraining, MAEModel
from maekit.evaluation import (
    LinearProbeHead,
    accuracy,
    extract_features,
    knn_accuracy,
    knn_classify,
    knn_scores,
)


def _reference_knn_votes(train, train_labels, test, k, temperature, num_classes):
    """Brute force, one test sample at a time, in float64: cosine similarities, k best, exp(s / T) votes."""
    votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    train = train.double()
    for i, x in enumerate(test.double()):
        sims = [(float(x @ t / (x.norm() * t.norm())), j) for j, t in enumerate(train)]
        sims.sort(key=lambda pair: -pair[0])
        for sim, j in sims[:k]:
            votes[i, int(train_labels[j])] += math.exp(sim / temperature)
    return votes


def test_knn_is_perfect_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator) * 5
    train_labels = torch.arange(5).repeat(40)
    test_labels = torch.arange(5).repeat(10).flip(0)
    train = centers[train_labels] + 0.3 * torch.randn(200, 16, generator=generator)
    test = centers[test_labels] + 0.3 * torch.randn(50, 16, generator=generator)
    assert knn_accuracy(train, train_labels, test, test_labels, k=20) == 100.0
    assert torch.equal(knn_classify(train, train_labels, test, k=20, chunk_size=7), test_labels)


@pytest.mark.parametrize("k, temperature, chunk_size", [(20, 0.07, 256), (5, 0.5, 3), (500, 0.07, 16)])
def test_knn_matches_brute_force_reference(k, temperature, chunk_size):
    generator = torch.Generator().manual_seed(1)
    train, test = torch.randn(120, 8, generator=generator), torch.randn(30, 8, generator=generator)
    train_labels = torch.randint(0, 4, (120,), generator=generator)
    reference = _reference_knn_votes(train, train_labels, test, min(k, 120), temperature, num_classes=6)
    scores = knn_scores(train, train_labels, test, k=k, temperature=temperature, num_classes=6, chunk_size=chunk_size)
    assert scores.shape == (30, 6)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-4, atol=1e-6)
    predictions = knn_classify(train, train_labels, test, k=k, temperature=temperature, chunk_size=chunk_size)
    assert torch.equal(predictions, reference.argmax(1))
    # scale invariance: features are L2-normalized
    rescaled = knn_scores(3 * train, train_labels, 0.1 * test, k=k, temperature=temperature)
    torch.testing.assert_close(rescaled, scores[:, :4], rtol=1e-4, atol=0)


def test_knn_accuracy_topk_and_errors():
    train = torch.eye(3)
    train_labels = torch.tensor([0, 1, 2])
    test = torch.tensor([[0.1, 1.0, 0.2], [1.0, 0.0, 0.9]])  # class 2 is the second-nearest of both
    test_labels = torch.tensor([2, 2])
    assert knn_accuracy(train, train_labels, test, test_labels, k=3) == 0.0
    assert knn_accuracy(train, train_labels, test, test_labels, k=3, topk=2) == 100.0
    with pytest.raises(ValueError, match="train_labels must have shape"):
        knn_scores(train, train_labels[:2], test)
    with pytest.raises(ValueError, match="differ in size"):
        knn_scores(train, train_labels, test[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        knn_scores(train, train_labels, test, temperature=0)


def test_accuracy_topk():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.0, 0.3, 0.9],  # classes by score: 5, 1, 4, 2, 0, 3 -> label 5 first
            [0.9, 0.1, 0.0, 0.2, 0.3, 0.4],  # 0, 5, 4, 3, 1, 2 -> label 3 fourth
            [0.0, 0.0, 1.0, 0.3, 0.2, 0.4],  # 2, 5, 3, 4, ... -> label 3 third
            [0.3, 0.2, 0.1, 0.0, 0.5, 0.4],  # 4, 5, 0, 1, 2, 3 -> label 3 last
        ]
    )
    labels = torch.tensor([5, 3, 3, 3])
    assert accuracy(logits, labels, topk=(1, 2, 3, 4, 6)) == pytest.approx([25.0, 25.0, 50.0, 75.0, 100.0])
    assert accuracy(logits, labels, topk=(4,)) == pytest.approx([75.0])
    with pytest.raises(ValueError, match="topk"):
        accuracy(logits, labels, topk=(7,))
    with pytest.raises(ValueError, match="labels"):
        accuracy(logits, labels[:2])


def _loader(images, labels, batch_size, as_dict):
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        yield {"pixel_values": x, "labels": y, "num_skipped": torch.tensor(0)} if as_dict else (x, y)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_extract_features_matches_direct_forward(tiny_config, pool):
    config = tiny_config(num_labels=3)
    pretrain = MAEForPreTraining(config).train()
    images, labels = torch.randn(7, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    features, got_labels = extract_features(pretrain, _loader(images, labels, 3, as_dict=True), pool=pool)
    assert pretrain.training and pretrain.mae.training  # mode restored
    assert features.shape == (7, 32) and features.dtype == torch.float32 and not features.requires_grad
    assert torch.equal(got_labels, labels)
    with torch.no_grad():
        hidden = pretrain.mae.eval()(images).last_hidden_state
    expected = hidden[:, 0] if pool == "cls" else hidden[:, 1:].mean(1)
    torch.testing.assert_close(features, expected)
    # the same encoder inside a classifier or on its own gives the same features; tuple batches work too
    classifier = MAEForImageClassification(tiny_config(num_labels=3, pooling="cls"))  # keeps the final norm
    classifier.mae.load_state_dict(pretrain.mae.state_dict())
    for model in (classifier, classifier.mae):
        again, _ = extract_features(model, _loader(images, labels, 4, as_dict=False), pool=pool)
        torch.testing.assert_close(again, expected)


def test_extract_features_with_accelerator(tiny_config):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator()
    try:
        model = MAEModel(tiny_config())
        dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10))
        loader = torch.utils.data.DataLoader(dataset, batch_size=4)
        prepared_model, prepared_loader = accelerator.prepare(model, loader)
        features, labels = extract_features(prepared_model, prepared_loader, accelerator=accelerator)
        assert features.shape == (10, 32) and torch.equal(labels.cpu(), torch.arange(10))
        with torch.no_grad():
            expected = model.eval()(dataset.tensors[0].to(accelerator.device)).last_hidden_state[:, 0]
        torch.testing.assert_close(features, expected)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_extract_features_errors(tiny_config):
    model = MAEModel(tiny_config())
    with pytest.raises(ValueError, match="pool"):
        extract_features(model, [], pool="max")
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])
    with pytest.raises(TypeError, match="pairs"):
        extract_features(model, [torch.randn(2, 3, 32, 32)])


def test_extract_features_keeps_every_file_and_lists_bad_ones_by_name(tiny_config, tmp_path):
    """Features of a folder with bad files: one row per file, in order; bad files are NaN rows, listed by name."""
    from PIL import Image

    from maekit.data import MAEEvalTransform, MAEImageDataset, build_dataloader

    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(11):  # 11 files, batch 4: the last batch is partial
        path = tmp_path / f"{i:02d}.png"
        if i in (2, 9):
            path.write_bytes(b"not an image")
        else:
            pixels = torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(path)
        paths.append(str(path))
    transform = MAEEvalTransform(size=32)
    dataset = MAEImageDataset(paths, transform, mark_bad_images=True)
    model = MAEModel(tiny_config())
    features, labels, bad_images = extract_features(
        model, build_dataloader(dataset, batch_size=4, shuffle=False), return_bad_images=True
    )
    assert features.shape == (11, 32) and labels is None
    assert sorted(bad_images) == [2, 9] and paths[2] in bad_images[2] and paths[9] in bad_images[9]
    assert features[[2, 9]].isnan().all() and not features[[i for i in range(11) if i not in (2, 9)]].isnan().any()
    with torch.no_grad():
        expected = model.eval()(torch.stack([transform(Image.open(paths[i])) for i in (0, 5, 10)])).last_hidden_state
    torch.testing.assert_close(features[[0, 5, 10]], expected[:, 0])
    # Without return_bad_images a bad file is an error naming it, not a silent NaN row.
    with pytest.raises(ValueError, match=r"02\.png.*return_bad_images=True"):
        extract_features(model, build_dataloader(dataset, batch_size=4, shuffle=False))


def test_extract_features_refuses_a_loader_that_drops_samples(tiny_config):
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10))
    model = MAEModel(tiny_config())
    with pytest.raises(ValueError, match=r"drop_last=True.*2 of 10 samples"):
        extract_features(model, torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True))
    features, labels = extract_features(model, torch.utils.data.DataLoader(dataset, batch_size=5, drop_last=True))
    assert features.shape == (10, 32) and torch.equal(labels, torch.arange(10))  # nothing to drop


def test_linear_probe_head():
    torch.manual_seed(0)
    head = LinearProbeHead(64, 1000)
    batch_norm, linear = head
    assert isinstance(batch_norm, nn.BatchNorm1d) and not batch_norm.affine and batch_norm.eps == 1e-6
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(linear.bias == 0)
    assert set(head.state_dict()) == {"0.running_mean", "0.running_var", "0.num_batches_tracked", "1.weight", "1.bias"}
    features = 5 + 3 * torch.randn(32, 64)
    head.train()(features)
    normalized = head[0](features)  # train mode: batch statistics -> zero mean, unit variance per channel
    torch.testing.assert_close(normalized.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    assert head(features).shape == (32, 1000)
