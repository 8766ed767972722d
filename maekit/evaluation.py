"""Evaluation of frozen MAE features: feature extraction, a weighted kNN classifier, top-k accuracy, the linear-probe
head.

The kNN classifier is the one of DINO (Caron et al., 2021) and solo-learn: features are L2-normalized, each test
sample takes its `k` most cosine-similar training samples, and each neighbour votes for its class with weight
`exp(similarity / temperature)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "LinearProbeHead",
    "accuracy",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "knn_scores",
]

_POOLING = ("cls", "mean")


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, 1 + L, D) encoder output -> (B, D) for cls / mean, (B, 1 + L, D) for tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    return hidden


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, list[str | None] | None]:
    """(pixel_values, labels or None, bad-image markers or None) from a `{"pixel_values", ["labels"],
    ["bad_images"]}` mapping (maekit's `collate_fn`) or a `(pixel_values, labels)` pair."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(f"a batch mapping needs 'pixel_values' (and 'labels' if any), got keys {sorted(batch)}.")
        return batch["pixel_values"], batch.get("labels"), batch.get("bad_images")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None
    raise TypeError(
        f"batches must be {{'pixel_values', 'labels'}} mappings or (pixel_values, labels) pairs, got {type(batch)}."
    )


def _dropped_samples(dataloader: Any) -> tuple[int, int]:
    """(samples a `drop_last=True` DataLoader leaves out, samples it has); (0, 0) when it drops none or cannot say."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    while hasattr(batch_sampler, "batch_sampler"):  # accelerate's BatchSamplerShard wraps the original one
        batch_sampler = batch_sampler.batch_sampler
    try:
        total = len(batch_sampler.sampler)
        dropped = total % batch_sampler.batch_size if batch_sampler.drop_last else 0
    except (AttributeError, TypeError):  # an iterable dataset, a custom batch sampler, a plain list of batches
        return 0, 0
    return dropped, total


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader: Iterable[Any],
    pool: str = "cls",
    accelerator: Any | None = None,
    return_bad_images: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, dict[int, str]]:
    """Encode a dataset with a frozen encoder, without masking: one feature row per sample, in loader order.

    The model runs in eval mode (its previous mode is restored afterwards) under `torch.no_grad()`. For an
    `MAEForPreTraining` or `MAEForImageClassification`, the encoder `model.mae` is used (the decoder and the head are
    skipped); any module whose output has a `last_hidden_state` of shape `(batch, 1 + num_patches, hidden)` works.
    Every sample is kept: a DataLoader that would drop its last partial batch (`drop_last=True` with a remainder) is
    refused; `maekit.data.build_dataloader(dataset, batch_size, shuffle=False)` keeps every sample, in order.

    Args:
        model (`nn.Module`): an `MAEModel`, a model holding one as `.mae`, or either wrapped by `accelerator.prepare`.
        dataloader (`Iterable`): batches as `{"pixel_values", "labels"}` mappings (maekit's `collate_fn`; `labels` is
            optional) or `(pixel_values, labels)` pairs.
        pool (`str`): `"cls"` — the cls token after the final norm (the official linear-probe default); `"mean"` —
            the mean of the patch tokens after the final norm (a mean-pooling `MAEForImageClassification` has no
            final encoder norm: its `fc_norm` is not applied here).
        accelerator (`accelerate.Accelerator`, *optional*): when given, inputs are moved to its device, the encoder
            runs under its autocast (mixed precision), and the features of all processes are gathered with
            `gather_for_metrics` (duplicated samples that pad the last batch are dropped), so every process returns
            the whole dataset.
        return_bad_images (`bool`): also return the samples that a `MAEImageDataset(mark_bad_images=True)` could not
            decode. Their rows hold NaN; every other row is unchanged (row i is still sample i). Without it, such a
            sample is a `ValueError` naming the file.

    Returns:
        `(features, labels)`, or `(features, labels, bad_images)` with `return_bad_images`: float32
        `(num_samples, hidden_size)` features; `(num_samples,)` labels, or `None` when the batches have none;
        `bad_images` maps a row to the error that names its file. Tensors are on the device the model runs on.
        When gathered, each step's batches are concatenated process by process (the dataset order for an unshuffled
        loader). docs/evaluation.md shows the extraction of a folder with a broken file.
    """
    if pool not in _POOLING:
        raise ValueError(f"pool must be one of {_POOLING}, got {pool!r}.")
    dropped, total = _dropped_samples(dataloader)
    if dropped:
        raise ValueError(
            f"the dataloader has drop_last=True and would leave out {dropped} of {total} samples; features need "
            "every sample: use drop_last=False (maekit.data.build_dataloader(..., shuffle=False) does)."
        )
    module = accelerator.unwrap_model(model) if accelerator is not None else model
    encoder = getattr(module, "mae", module)
    was_training = encoder.training
    encoder.eval()
    device = accelerator.device if accelerator is not None else next(encoder.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    features, labels, bad_images, num_rows = [], [], {}, 0
    try:
        with autocast:
            for batch in dataloader:
                pixel_values, batch_labels, markers = _split_batch(batch)
                if markers is not None and not return_bad_images and any(markers):
                    bad = [marker for marker in markers if marker]
                    raise ValueError(
                        f"{len(bad)} image(s) of this batch could not be decoded ({bad[0]}); pass "
                        "return_bad_images=True to keep their rows (NaN) and get their names."
                    )
                hidden = encoder(pixel_values.to(device, non_blocking=True)).last_hidden_state  # (B, 1 + L, D)
                feats = _pool(hidden, pool).float()
                if markers is not None:
                    bad_rows = torch.tensor([marker is not None for marker in markers], device=feats.device)
                    feats = feats.masked_fill(bad_rows[:, None], float("nan"))
                if batch_labels is not None:
                    batch_labels = torch.as_tensor(batch_labels).to(device, non_blocking=True)
                if accelerator is not None:
                    feats = accelerator.gather_for_metrics(feats)
                    if batch_labels is not None:
                        batch_labels = accelerator.gather_for_metrics(batch_labels)
                    if markers is not None:
                        markers = accelerator.gather_for_metrics(list(markers), use_gather_object=True)
                for row, marker in enumerate(markers or ()):
                    if marker is not None:
                        bad_images[num_rows + row] = marker
                num_rows += feats.shape[0]
                features.append(feats)
                labels.append(batch_labels)
    finally:
        encoder.train(was_training)
    if not features:
        raise ValueError("the dataloader yielded no batches.")
    if len({batch_labels is None for batch_labels in labels}) > 1:
        raise ValueError("some batches have labels and others do not.")
    labels = None if labels[0] is None else torch.cat(labels)
    features = torch.cat(features)
    return (features, labels, bad_images) if return_bad_images else (features, labels)


def _check_features(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (num_samples, dim), got train {tuple(train_features.shape)} and test "
            f"{tuple(test_features.shape)}."
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test features differ in size: {train_features.shape[1]} vs {test_features.shape[1]}."
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_features.shape[0]},) to match train_features, "
            f"got {tuple(train_labels.shape)}."
        )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty.")


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class votes of the temperature-weighted kNN classifier (DINO / solo-learn).

    Args:
        train_features (`torch.Tensor` of shape `(num_train, dim)`): reference features (normalized here).
        train_labels (`torch.Tensor` of shape `(num_train,)`): their class indices.
        test_features (`torch.Tensor` of shape `(num_test, dim)`): features to classify (normalized here).
        k (`int`): number of neighbours (capped at `num_train`).
        temperature (`float`): a neighbour with cosine similarity `s` votes `exp(s / temperature)`.
        num_classes (`int`, *optional*): defaults to `train_labels.max() + 1`.
        chunk_size (`int`): test samples per similarity matmul (memory: `chunk_size * num_train` floats).

    Returns:
        `torch.Tensor` of shape `(num_test, num_classes)`: summed vote weights per class, on `test_features.device`.
    """
    _check_features(train_features, train_labels, test_features)
    if k < 1:
        raise ValueError(f"k must be a positive int, got {k}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}.")
    device = test_features.device
    train = nn.functional.normalize(train_features.to(device, torch.float32), dim=1)
    train_labels = train_labels.to(device, torch.long)
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if int(train_labels.max()) >= num_classes or int(train_labels.min()) < 0:
        raise ValueError(f"train_labels must lie in [0, num_classes={num_classes}).")
    k = min(k, train.shape[0])
    scores = torch.zeros(test_features.shape[0], num_classes, device=device)
    for start in range(0, test_features.shape[0], chunk_size):
        test = nn.functional.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, neighbours = (test @ train.T).topk(k, dim=1)  # (chunk, k)
        votes = (similarity / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, train_labels[neighbours], votes)
    return scores


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Predicted class of each test sample under the weighted kNN classifier; arguments as `knn_scores`.

    Returns:
        `torch.LongTensor` of shape `(num_test,)`.

    Example:

    ```python
    import torch
    from maekit.evaluation import knn_classify

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    predictions = knn_classify(train, torch.tensor([0, 0, 1, 1]), torch.tensor([[0.8, 0.3], [0.2, 1.0]]), k=2)
    assert predictions.tolist() == [0, 1]
    ```
    """
    return knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size).argmax(1)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    topk: int = 1,
    chunk_size: int = 256,
) -> float:
    """Top-`topk` accuracy (in percent) of the weighted kNN classifier on labeled test features.

    Arguments as `knn_scores`, plus `test_labels` (`(num_test,)` class indices) and `topk` (1 for top-1, 5 for
    top-5: a sample counts as correct when its class is among the `topk` classes with the most votes).
    """
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    scores = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    return accuracy(scores, test_labels, topk=(topk,))[0]


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: Iterable[int] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent, as the official fine-tuning logs (`Acc@1`, `Acc@5`).

    Args:
        logits (`torch.Tensor` of shape `(batch, num_classes)`): class scores.
        labels (`torch.Tensor` of shape `(batch,)`): class indices.
        topk (`Iterable[int]`): the `k` values; each must be at most `num_classes`.

    Returns:
        `list[float]`: one accuracy in [0, 100] per `k`, in the order given.
    """
    topk = tuple(topk)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (batch, num_classes) and labels (batch,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined.")
    if not topk or any(not 1 <= k <= logits.shape[1] for k in topk):
        raise ValueError(f"topk values must lie in [1, num_classes={logits.shape[1]}], got {topk}.")
    top = logits.topk(max(topk), dim=1).indices  # (B, maxk), best first
    hits = top == labels.to(top.device).view(-1, 1)
    return [hits[:, :k].any(dim=1).float().mean().item() * 100.0 for k in topk]


class LinearProbeHead(nn.Sequential):
    """The official linear-probing head: `BatchNorm1d(affine=False, eps=1e-6)` then `Linear`.

    The batch norm without affine parameters normalizes the frozen features, whose magnitudes differ across
    channels (MAE paper, appendix A.2); it keeps the classifier linear and can be folded into the linear layer after
    training. The linear layer is initialised trunc_normal(std 0.01) with zero bias. Its state-dict keys (`0.running_mean`, `1.weight`, ...) follow the
    official `nn.Sequential` layout.

    Args:
        hidden_size (`int`): feature size.
        num_labels (`int`): number of classes.

    Example:

    ```python
    import torch
    from maekit.evaluation import LinearProbeHead

    head = LinearProbeHead(32, 10)
    assert head(torch.randn(4, 32)).shape == (4, 10)
    ```
    """

    def __init__(self, hidden_size: int, num_labels: int):
        if hidden_size < 1 or num_labels < 1:
            raise ValueError(f"hidden_size and num_labels must be positive, got {hidden_size} and {num_labels}.")
        linear = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(nn.BatchNorm1d(hidden_size, affine=False, eps=1e-6), linear)
