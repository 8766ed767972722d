"""`KNNMonitor`: online evaluation of the encoder during pretraining (kNN accuracy and an optional linear probe).

Pass it to `MAETrainer(..., monitor=KNNMonitor(...))`. Every `every_n_steps` optimizer steps (and at the end) it
encodes a labeled reference set and a labeled query set with the current encoder (no masking, eval mode, features
gathered over all processes), classifies the queries with the weighted kNN of DINO / solo-learn, and returns
`{"knn_acc1": ...}`, which the trainer logs to its trackers and shows on the progress bar. With `linear_probe=True`
a `LinearProbeHead` is also trained on the detached reference features — kept from one call to the next, so it
follows the encoder online — and its query accuracy is returned as `"linear_probe_acc1"`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from ..data import build_dataloader, collate_fn
from ..evaluation import LinearProbeHead, accuracy, extract_features, knn_accuracy

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["KNNMonitor"]


class KNNMonitor:
    """kNN (and optionally linear-probe) top-1 accuracy of the encoder being pretrained, every `every_n_steps` steps.

    Args:
        train_dataset (`torch.utils.data.Dataset`): labeled reference items `{"pixel_values", "labels"}` (e.g. a
            subset of the training images with the evaluation transform: no random crops).
        eval_dataset (`torch.utils.data.Dataset`): labeled query items, scored against the reference set.
        every_n_steps (`int`): run after every this many optimizer steps (and after the last one).
        k (`int`): neighbours of the kNN classifier.
        temperature (`float`): temperature of the neighbours' votes.
        pool (`str`): `"cls"` (cls token after the final norm) or `"mean"` (mean of the patch tokens).
        batch_size (`int`): images per process and forward when extracting features.
        num_labels (`int`, *optional*): number of classes (default: the largest label seen + 1).
        linear_probe (`bool`): also train an online linear probe on the detached reference features.
        probe_epochs (`int`): passes over the reference features per call for the probe.
        probe_learning_rate (`float`): AdamW learning rate of the probe.
        probe_batch_size (`int`): features per probe step.
        seed (`int`): seed of the probe's initialisation and feature order.

    Example:

    ```python
    import tempfile

    import torch
    from maekit import MAEConfig, MAEForPreTraining, MAETrainer, MAETrainingArguments
    from maekit.training import KNNMonitor

    config = MAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                       decoder_intermediate_size=64, image_size=32, patch_size=8)
    labeled = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 2} for i in range(16)]
    monitor = KNNMonitor(labeled[:12], labeled[12:], every_n_steps=2, linear_probe=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = MAETrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=4, warmup_steps=1,
                                    report_to="none", disable_tqdm=True, num_reconstruction_images=0)
        trainer = MAETrainer(MAEForPreTraining(config), args, labeled, monitor=monitor)
        trainer.train()
    knn_steps = [entry["step"] for entry in trainer.state["log_history"] if "knn_acc1" in entry]
    assert knn_steps == [2, 4]
    ```
    """

    def __init__(
        self,
        train_dataset: Dataset,
        eval_dataset: Dataset,
        every_n_steps: int = 500,
        k: int = 20,
        temperature: float = 0.07,
        pool: str = "cls",
        batch_size: int = 256,
        num_labels: int | None = None,
        linear_probe: bool = False,
        probe_epochs: int = 10,
        probe_learning_rate: float = 1e-3,
        probe_batch_size: int = 256,
        seed: int = 0,
    ):
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("k", k),
            ("batch_size", batch_size),
            ("probe_epochs", probe_epochs),
            ("probe_batch_size", probe_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not temperature > 0 or not probe_learning_rate > 0:
            raise ValueError(
                f"temperature and probe_learning_rate must be > 0, got {temperature!r} and {probe_learning_rate!r}."
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}.")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if not hasattr(dataset, "__len__") or len(dataset) == 0:
                raise ValueError(f"{name} must be a non-empty map-style dataset of labeled items.")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.every_n_steps = every_n_steps
        self.k, self.temperature, self.pool = k, temperature, pool
        self.batch_size = batch_size
        self.num_labels = num_labels
        self.linear_probe = linear_probe
        self.probe_epochs, self.probe_learning_rate, self.probe_batch_size = (
            probe_epochs,
            probe_learning_rate,
            probe_batch_size,
        )
        self.seed = seed
        self.probe: LinearProbeHead | None = None
        self._probe_optimizer: torch.optim.Optimizer | None = None
        self._loaders: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_steps={self.every_n_steps}, k={self.k}, temperature={self.temperature}, "
            f"pool={self.pool!r}, linear_probe={self.linear_probe})"
        )

    def __call__(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Evaluate the trainer's current encoder; returns `{"knn_acc1"[, "linear_probe_acc1"]}` in percent.

        Every process must call it (feature extraction gathers across processes); all return the same values. The
        random state of the process (CPU and current GPU) is restored afterwards, so training draws the same random
        numbers with or without the monitor.
        """
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(trainer, step)

    def _evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        accelerator = trainer.accelerator
        if self._loaders is None:
            self._loaders = tuple(
                accelerator.prepare_data_loader(
                    build_dataloader(dataset, self.batch_size, shuffle=False, drop_last=False, collate_fn=collate_fn)
                )
                for dataset in (self.train_dataset, self.eval_dataset)
            )
        model = trainer.model_for_inference()
        train_features, train_labels = extract_features(model, self._loaders[0], self.pool, accelerator)
        eval_features, eval_labels = extract_features(model, self._loaders[1], self.pool, accelerator)
        num_labels = self.num_labels or int(max(train_labels.max(), eval_labels.max())) + 1
        metrics = {
            "knn_acc1": knn_accuracy(
                train_features, train_labels, eval_features, eval_labels, self.k, self.temperature, num_labels
            )
        }
        if self.linear_probe:
            metrics["linear_probe_acc1"] = self._train_probe(
                train_features, train_labels, eval_features, eval_labels, num_labels, step
            )
        return metrics

    def _train_probe(self, train_features, train_labels, eval_features, eval_labels, num_labels, step) -> float:
        # Every process holds all gathered features and the same seeds, so every process trains the same probe.
        device = train_features.device
        if self.probe is None:
            torch.manual_seed(self.seed)  # the head's init (the caller's random state is restored by __call__)
            self.probe = LinearProbeHead(train_features.shape[1], num_labels).to(device)
            self._probe_optimizer = torch.optim.AdamW(self.probe.parameters(), lr=self.probe_learning_rate)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self.probe.train()
        with torch.enable_grad():
            for _ in range(self.probe_epochs):
                order = torch.randperm(train_features.shape[0], generator=generator).to(device)
                for start in range(0, order.numel(), self.probe_batch_size):
                    batch = order[start : start + self.probe_batch_size]
                    if batch.numel() < 2:  # BatchNorm needs two samples
                        continue
                    logits = self.probe(train_features[batch].detach())
                    loss = torch.nn.functional.cross_entropy(logits, train_labels[batch])
                    self._probe_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self._probe_optimizer.step()
        self.probe.eval()
        with torch.no_grad():
            return accuracy(self.probe(eval_features), eval_labels, topk=(1,))[0]
