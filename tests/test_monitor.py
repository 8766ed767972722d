"""KNNMonitor: online kNN / linear-probe accuracy of the encoder during MAETrainer pretraining."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maekit import MAEConfig, MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.evaluation import extract_features, knn_accuracy
from maekit.training import KNNMonitor

from .conftest import TINY
from .test_finetune import LabeledTensors


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=5,
        warmup_steps=1,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        num_reconstruction_images=0,
    )
    return MAETrainingArguments(**{**values, **overrides})


def test_monitor_logs_knn_accuracy_to_the_trackers_at_its_steps(tmp_path):
    monitor = KNNMonitor(LabeledTensors(18), LabeledTensors(9, seed=1), every_n_steps=2, batch_size=4)
    args = make_args(tmp_path, report_to=["tensorboard"])
    trainer = MAETrainer(MAEForPreTraining(MAEConfig(**TINY)), args, LabeledTensors(16), monitor=monitor)
    trainer.train()
    logged = [(entry["step"], entry["knn_acc1"]) for entry in trainer.state["log_history"] if "knn_acc1" in entry]
    assert [step for step, _ in logged] == [2, 4, 5]  # every 2 steps and at the end
    assert all(0.0 <= value <= 100.0 for _, value in logged)
    assert "knn_acc1" in trainer._postfix  # shown on the progress bar

    runs = [EventAccumulator(str(path)).Reload() for path in (tmp_path / "runs").rglob("events.out.tfevents.*")]
    (scalars,) = [run.Scalars("knn_acc1") for run in runs if "knn_acc1" in run.Tags()["scalars"]]
    assert [event.step for event in scalars] == [2, 4, 5]
    assert [event.value for event in scalars] == pytest.approx([value for _, value in logged])


def test_monitor_value_is_the_knn_accuracy_of_the_current_encoder(tmp_path):
    reference, queries = LabeledTensors(18), LabeledTensors(9, seed=1)
    model = MAEForPreTraining(MAEConfig(**TINY))
    trainer = MAETrainer(model, make_args(tmp_path), LabeledTensors(16))
    monitor = KNNMonitor(reference, queries, every_n_steps=1, k=5, temperature=0.1, pool="mean", batch_size=4)
    metrics = monitor(trainer, step=0)

    def features(dataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=6)
        batches = [(batch["pixel_values"], batch["labels"]) for batch in loader]
        return extract_features(model, batches, pool="mean")

    (train_features, train_labels), (test_features, test_labels) = features(reference), features(queries)
    expected = knn_accuracy(train_features, train_labels, test_features, test_labels, k=5, temperature=0.1)
    assert metrics == {"knn_acc1": pytest.approx(expected)}


def test_online_linear_probe_persists_and_learns_separable_features(tmp_path):
    # An encoder that already separates the classes: the probe must reach 100% and keep its head between calls.
    reference, queries = LabeledTensors(30, num_classes=3), LabeledTensors(12, seed=2, num_classes=3)
    model = MAEForPreTraining(MAEConfig(**TINY))
    trainer = MAETrainer(model, make_args(tmp_path), LabeledTensors(16))
    monitor = KNNMonitor(reference, queries, linear_probe=True, probe_epochs=20, probe_learning_rate=0.05,
                         probe_batch_size=10, batch_size=8)  # fmt: skip
    rng_before = torch.random.get_rng_state()
    first = monitor(trainer, step=1)
    probe = monitor.probe
    weights = probe[1].weight.detach().clone()
    second = monitor(trainer, step=2)
    assert monitor.probe is probe and not torch.equal(probe[1].weight, weights)  # trained further, not re-created
    assert set(first) == {"knn_acc1", "linear_probe_acc1"} and second["linear_probe_acc1"] >= 90.0
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the trainer's random stream is untouched
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # features were detached


def test_monitor_argument_checks():
    data = LabeledTensors(4)
    with pytest.raises(ValueError, match="every_n_steps"):
        KNNMonitor(data, data, every_n_steps=0)
    with pytest.raises(ValueError, match="pool"):
        KNNMonitor(data, data, pool="max")
    with pytest.raises(ValueError, match="temperature"):
        KNNMonitor(data, data, temperature=0.0)
    with pytest.raises(ValueError, match="eval_dataset"):
        KNNMonitor(data, [])
