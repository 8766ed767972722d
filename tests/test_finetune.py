"""ClassificationTrainer (fine-tuning, linear probing) and examples/finetune.py, examples/linear_probe.py."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from maekit import MAEConfig, MAEForImageClassification, MAEForPreTraining
from maekit.augment import MixupCollator, one_hot_targets
from maekit.evaluation import LinearProbeHead, accuracy
from maekit.training import (
    LARS,
    ClassificationTrainer,
    ClassificationTrainingArguments,
    fold_linear_probe_head,
)

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
ENCODER = {k: v for k, v in TINY.items() if not k.startswith("decoder")}


class LabeledTensors(torch.utils.data.Dataset):
    """`n` random images whose class (of 3) sets the sign of their mean: learnable in a few steps."""

    def __init__(self, n=24, seed=0, num_classes=3):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.images = torch.randn(n, 3, 32, 32, generator=generator) + (self.labels.view(-1, 1, 1, 1) - 1.0)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": int(self.labels[i])}


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=5,
        max_steps=4,
        warmup_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    return ClassificationTrainingArguments(**{**values, **overrides})


def make_model(num_labels=3, **overrides):
    return MAEForImageClassification(MAEConfig(**{**ENCODER, "num_labels": num_labels, **overrides}))


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning mechanics


def test_layer_decay_groups_drive_the_optimizer_at_the_scheduled_rates(tmp_path):
    trainer = ClassificationTrainer(
        make_model(), make_args(tmp_path, layer_decay=0.5, mixup=0.0, cutmix=0.0), LabeledTensors()
    )
    trainer.train()
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    # 2 blocks: embeddings layer 0, blocks layers 1-2, fc_norm + head the top layer 3.
    by_name = {name: group for group in optimizer.param_groups for name in group["param_names"]}
    assert set(by_name) == {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    expected = {"mae.cls_token": 0.125, "mae.patch_embed.proj.weight": 0.125,
                "mae.blocks.0.attn.qkv.weight": 0.25, "mae.blocks.1.mlp.fc2.bias": 0.5,
                "fc_norm.weight": 1.0, "head.weight": 1.0}  # fmt: skip
    last_lr = trainer.lr_at(3)  # the rate of the last of the 4 steps
    assert 0 < last_lr < 1e-3
    for name, scale in expected.items():
        assert by_name[name]["lr_scale"] == pytest.approx(scale)
        assert by_name[name]["lr"] == pytest.approx(last_lr * scale)
    assert by_name["head.weight"]["weight_decay"] == 0.05 and by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["mae.cls_token"]["weight_decay"] == 0.0


def test_label_smoothing_and_mixup(tmp_path):
    dataset = LabeledTensors()
    smooth = ClassificationTrainer(make_model(), make_args(tmp_path / "a", mixup=0.0, cutmix=0.0), dataset)
    assert smooth.task.mixup is None
    batch = smooth.data_collator([dataset[i] for i in range(6)])
    with torch.no_grad():
        smooth.model.head.weight.normal_()  # confident logits: smoothing then changes the loss
    loss = smooth.compute_loss(smooth.model, batch)
    logits = smooth.model(batch["pixel_values"]).logits
    targets = one_hot_targets(batch["labels"], 3, 0.1)
    assert loss.item() == pytest.approx(torch.sum(-targets * logits.log_softmax(-1), -1).mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)

    mixing = ClassificationTrainer(make_model(), make_args(tmp_path / "b"), dataset)
    mixup = mixing.task.mixup  # the task mixes each micro-batch (reproducibly from the seed and the step)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    mixed = MixupCollator(mixup)([dataset[i] for i in range(6)])  # the same mixing as a collate function
    assert mixed["labels"].shape == (6, 3) and torch.allclose(mixed["labels"].sum(1), torch.ones(6))
    mixing.train()  # soft targets through the whole loop
    assert mixing.state["global_step"] == 4


def test_evaluate_top1_top5_match_a_direct_computation(tmp_path):
    model = make_model(num_labels=6)
    eval_set = LabeledTensors(n=13, seed=3, num_classes=6)  # 13 = 2 batches of 5 + 3: a partial last batch
    trainer = ClassificationTrainer(model, make_args(tmp_path), LabeledTensors(num_classes=6), eval_dataset=eval_set)
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = model(eval_set.images).logits
    top1, top5 = accuracy(logits, eval_set.labels, topk=(1, 5))
    assert metrics["eval_acc1"] == pytest.approx(top1) and metrics["eval_acc5"] == pytest.approx(top5)
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, eval_set.labels).item())
    # Under 5 classes there is no top-5.
    small = ClassificationTrainer(make_model(), make_args(tmp_path / "s"), LabeledTensors(), LabeledTensors(7))
    assert set(small.evaluate()) == {"eval_loss", "eval_acc1"}


def test_best_model_is_the_one_with_the_best_top1(tmp_path):
    model = make_model()
    trainer = ClassificationTrainer(model, make_args(tmp_path), LabeledTensors(), eval_dataset=LabeledTensors(6))
    scores = iter([40.0, 70.0, 55.0])
    trainer.evaluate = lambda: {"eval_loss": 1.0, "eval_acc1": next(scores)}
    heads = []
    for step in (1, 2, 3):
        with torch.no_grad():
            model.head.bias.fill_(float(step))
        heads.append(model.head.bias.clone())
        trainer._evaluate_and_log(step)
    assert (trainer.state["best_metric"], trainer.state["best_step"]) == (70.0, 2)
    saved = json.loads((tmp_path / "best" / "eval_results.json").read_text())
    assert saved["step"] == 2 and saved["eval_acc1"] == 70.0
    best = MAEForImageClassification.from_pretrained(tmp_path / "best")
    torch.testing.assert_close(best.head.bias, heads[1])
    assert [e["best_eval_acc1"] for e in trainer.state["log_history"]] == [40.0, 70.0, 70.0]


def test_best_metric_survives_resume(tmp_path):
    args = make_args(tmp_path, max_steps=4, eval_steps=2, save_steps=2, mixup=0.0, cutmix=0.0)
    first = ClassificationTrainer(make_model(), args, LabeledTensors(), eval_dataset=LabeledTensors(6))
    first.train()
    resumed_args = make_args(tmp_path, max_steps=6, eval_steps=2, save_steps=2, mixup=0.0, cutmix=0.0,
                             resume_from_checkpoint=str(tmp_path / "checkpoint-4"))  # fmt: skip
    resumed = ClassificationTrainer(make_model(), resumed_args, LabeledTensors(), eval_dataset=LabeledTensors(6))
    resumed._load_checkpoint(resumed_args.resume_from_checkpoint)  # before training: only what the checkpoint holds
    assert (resumed.state["best_metric"], resumed.state["best_step"]) == (
        first.state["best_metric"], first.state["best_step"],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Linear probing


def test_linear_probe_freezes_the_encoder_and_trains_a_lars_head(tmp_path):
    model = make_model(pooling="cls", drop_path_rate=0.5)
    encoder_before = {k: v.clone() for k, v in model.mae.state_dict().items()}
    args = make_args(tmp_path, linear_probe=True, learning_rate=0.5, weight_decay=0.0, mixup=0.0, cutmix=0.0,
                     label_smoothing=0.0)  # fmt: skip
    trainer = ClassificationTrainer(model, args, LabeledTensors(), eval_dataset=LabeledTensors(6))
    assert isinstance(model.head, LinearProbeHead)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainer.train()
    assert isinstance(trainer.optimizer, LARS)
    assert [p for group in trainer.optimizer.param_groups for p in group["params"]] == list(model.head.parameters())
    for key, value in model.mae.state_dict().items():
        torch.testing.assert_close(value, encoder_before[key], rtol=0, atol=0)
    assert not torch.equal(model.head[1].weight, head_before["1.weight"])
    assert not torch.equal(model.head[0].running_mean, head_before["0.running_mean"])
    assert all(not p.requires_grad for p in model.mae.parameters())

    # The saved model is a plain classifier whose folded head gives the probe's eval-mode logits.
    reloaded = MAEForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.head, torch.nn.Linear)
    images = LabeledTensors(4, seed=5).images
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images).logits, model(images).logits, rtol=1e-4, atol=1e-5)


def test_fold_linear_probe_head_matches_eval_mode():
    head = LinearProbeHead(16, 4)
    head.train()
    for _ in range(3):
        head(torch.randn(32, 16) * 3 + 1)  # running statistics away from (0, 1)
    head.eval()
    x = torch.randn(8, 16)
    torch.testing.assert_close(fold_linear_probe_head(head)(x), head(x), rtol=1e-5, atol=1e-5)


def test_argument_and_model_checks(tmp_path):
    with pytest.raises(ValueError, match="layer_decay"):
        make_args(tmp_path, layer_decay=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_args(tmp_path, label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixup_prob"):
        make_args(tmp_path, mixup_prob=2.0)
    with pytest.raises(TypeError, match="ClassificationTrainingArguments"):
        from maekit import MAETrainingArguments

        ClassificationTrainer(make_model(), MAETrainingArguments(output_dir=str(tmp_path)), LabeledTensors())
    with pytest.raises(TypeError, match="MAEForImageClassification"):
        ClassificationTrainer(MAEForPreTraining(MAEConfig(**TINY)), make_args(tmp_path), LabeledTensors())
    assert not make_args(tmp_path, mixup=0.0, cutmix=0.0).mixes and make_args(tmp_path).mixes


# ----------------------------------------------------------------------------------------------------------------------
# The examples, end to end on a small labeled image folder


@pytest.fixture(scope="module")
def pretrained_and_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    for label, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / "images" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / label / f"{i}.png")
    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(root / "pretrained")
    return root / "pretrained", root / "images"


def example_argv(pretrained, images, output_dir, *extra):
    return ["--model_name_or_path", str(pretrained), "--data_dir", str(images), "--train_val_split", "0.25",
            "--output_dir", str(output_dir), "--per_device_train_batch_size", "6", "--max_steps", "3",
            "--eval_steps", "3", "--report_to", "none", "--disable_tqdm", "true", *extra]  # fmt: skip


def test_finetune_example_end_to_end(pretrained_and_folder, tmp_path):
    finetune = load_example("finetune")
    pretrained, images = pretrained_and_folder
    metrics = finetune.main(example_argv(pretrained, images, tmp_path))
    assert {"eval_acc1", "best_eval_acc1", "train_loss"} <= set(metrics)
    best = MAEForImageClassification.from_pretrained(tmp_path / "best")
    assert best.config.id2label == {0: "blue", 1: "red"} and best.config.drop_path_rate == 0.1
    # The encoder came from the pretrained MAE (the decoder was dropped).
    source = MAEForPreTraining.from_pretrained(pretrained)
    assert not torch.equal(best.mae.blocks[0].attn.qkv.weight, source.mae.blocks[0].attn.qkv.weight)  # fine-tuned
    started = MAEForImageClassification.from_pretrained(pretrained, num_labels=2)
    torch.testing.assert_close(started.mae.patch_embed.proj.weight, source.mae.patch_embed.proj.weight)


def test_linear_probe_example_end_to_end(pretrained_and_folder, tmp_path):
    probe = load_example("linear_probe")
    pretrained, images = pretrained_and_folder
    model_args, data_args, args = probe.parse_arguments(
        example_argv(pretrained, images, tmp_path), probe.DEMO_DEFAULTS, probe.PROBE_DEFAULTS
    )
    assert args.linear_probe and model_args.pooling == "cls" and not args.mixes and not data_args.rand_augment
    assert (args.base_learning_rate, args.weight_decay, args.num_train_epochs) == (0.1, 0.0, 90)
    probe.main(example_argv(pretrained, images, tmp_path))
    source = MAEForPreTraining.from_pretrained(pretrained)
    final = MAEForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(final.mae.blocks[1].mlp.fc1.weight, source.mae.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(final.mae.norm.weight, source.mae.norm.weight)
    assert (tmp_path / "best" / "eval_results.json").is_file()


def test_per_size_recipes_and_demo_defaults():
    finetune = load_example("finetune")
    _, _, args = finetune.parse_arguments([])
    assert args.output_dir == "outputs/mae-finetune-default" and args.learning_rate == 2e-3  # the demo
    for preset, (blr, decay, drop, epochs) in {"vit-base-patch16": (5e-4, 0.65, 0.1, 100),
                                               "vit-large-patch16": (1e-3, 0.75, 0.2, 50),
                                               "vit-huge-patch14": (1e-3, 0.75, 0.3, 50)}.items():  # fmt: skip
        model_args, _, args = finetune.parse_arguments(["--preset", preset, "--dataset_name", "imagenet-1k"])
        assert (args.base_learning_rate, args.layer_decay, model_args.drop_path_rate, args.num_train_epochs) == (
            blr, decay, drop, epochs,
        )  # fmt: skip
        assert args.learning_rate is None and args.mixes and args.label_smoothing == 0.1
    model_args, _, args = finetune.parse_arguments(
        ["--preset", "vit-large-patch16", "--dataset_name", "x", "--layer_decay", "0.8"]
    )
    assert args.layer_decay == 0.8 and model_args.drop_path_rate == 0.2  # what is passed wins


_DISTRIBUTED_EVAL = """
import json, sys, torch
sys.path.insert(0, {root!r})
from tests.test_finetune import LabeledTensors, make_args, make_model
from maekit.training import ClassificationTrainer
from pathlib import Path

torch.manual_seed(0)
trainer = ClassificationTrainer(make_model(num_labels=6), make_args(Path(sys.argv[1])), LabeledTensors(num_classes=6),
                                eval_dataset=LabeledTensors(n=13, seed=3, num_classes=6))
metrics = trainer.evaluate()
if trainer.accelerator.is_main_process:
    Path(sys.argv[1]).mkdir(parents=True)
    Path(sys.argv[1], "metrics.json").write_text(json.dumps(metrics))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()  # tears the process group down before exit
"""


@pytest.mark.slow
def test_two_process_evaluation_gathers_every_sample_once(tmp_path):
    script = tmp_path / "eval_script.py"
    script.write_text(textwrap.dedent(_DISTRIBUTED_EVAL.format(root=str(ROOT))))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    two = subprocess.run([*launch, str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    # 13 images over 2 processes in batches of 5: the padding duplicates are dropped by gather_for_metrics.
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics_two == pytest.approx(metrics_one, abs=1e-5)


@pytest.mark.slow
def test_digits_results_benchmark_runs_the_whole_pipeline(tmp_path, capsys):
    # The real-data comparison (docs/results.md), shortened to a few steps per stage: the mechanics, not the gain.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("digits_results", ROOT / "benchmarks" / "digits_results.py")
    digits_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits_results)
    out = tmp_path / "digits.json"
    result = digits_results.main(
        ["--work-dir", str(tmp_path / "work"), "--pretrain-epochs", "0.1", "--probe-epochs", "0.2",
         "--finetune-epochs", "0.05", "--output", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    metrics = [row["evaluation (top-1 %, 270 held-out digits)"] for row in result["rows"]]
    assert metrics[:4] == ["kNN (cls)", "kNN (mean)", "linear probe", "fine-tuning"]
    for row in result["rows"]:
        assert 0 <= row["pretrained MAE"] <= 100 and 0 <= row["random init"] <= 100
    assert set(result["commands"]) == {"pretrain", "linear_probe_pretrained", "finetune_pretrained",
                                       "linear_probe_random", "finetune_random"}  # fmt: skip
    assert (tmp_path / "work" / "finetune-random" / "best" / "config.json").is_file()
    # Raw-pixel baselines measured in the same run, and the verdict against the best of them.
    pixels = {row["raw-pixel baseline (top-1 %, 270 held-out digits)"]: row["top-1"] for row in result["pixel_rows"]}
    assert set(pixels) == {digits_results.PIXEL_KNN_COSINE, digits_results.PIXEL_KNN, digits_results.PIXEL_LOGISTIC}
    assert all(90 < value <= 100 for value in pixels.values())  # the digits are easy for raw pixels
    summary = result["summary"]
    assert summary["best raw-pixel baseline"] == max(pixels.values()) and summary["recipe"] == "demo"
    assert summary["beats the best raw-pixel baseline"] == (
        summary["fine-tuned pretrained MAE"] > max(pixels.values())
    )
    assert "kNN (cls)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def photo_classes(tmp_path_factory):
    """3 classes of 16 random crops each from three scikit-image photos, and a random-init tiny encoder."""
    from skimage import data

    root = tmp_path_factory.mktemp("photo-classes")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea"):
        photo = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))
        (root / "images" / name).mkdir(parents=True)
        for i in range(16):
            size = rng.integers(96, 200)
            top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
            crop = Image.fromarray(photo[top : top + size, left : left + size]).resize((40, 40))
            crop.save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    MAEForPreTraining(MAEConfig(**TINY)).save_pretrained(root / "pretrained")
    return root / "pretrained", root / "images"


def test_linear_probe_defaults_learn_on_a_small_folder(photo_classes, tmp_path, caplog):
    # The official rate scaled down to a batch of 8 (0.1 * 8 / 256) left the head at chance on this folder (16.7%,
    # loss ln 3); linear probing keeps the official batch's rate (LARS normalizes each update): 91.7%.
    probe = load_example("linear_probe")
    pretrained, images = photo_classes
    common = ["--model_name_or_path", str(pretrained), "--data_dir", str(images), "--train_val_split", "0.25",
              "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true"]  # fmt: skip
    argv = [*common, "--output_dir", str(tmp_path / "default")]
    _, _, args = probe.parse_arguments(argv)
    assert args.resolved_learning_rate() == pytest.approx(0.1 * 16384 / 256)
    metrics = probe.main(argv)
    assert metrics["best_eval_acc1"] > 75.0 and metrics["loss"] < 0.5 * math.log(3)
    # A rate too small for the run is not silent: the loss did not move, and the run says so.
    with caplog.at_level("WARNING"):
        probe.main([*common, "--learning_rate", "0.0001", "--max_steps", "12", "--logging_steps", "1",
                    "--warmup_steps", "0", "--output_dir", str(tmp_path / "low")])  # fmt: skip
    assert "The training loss has not moved" in caplog.text


def test_fine_tuning_with_mixup_and_workers_resumes_exactly(tmp_path):
    # The mixing drawn in DataLoader workers from their own seeds differed after a resume (9.6e-4 in the weights).
    def run(folder, **overrides):
        torch.manual_seed(0)
        args = make_args(
            folder, max_steps=6, save_steps=3, dataloader_num_workers=2, save_total_limit=None, **overrides
        )
        ClassificationTrainer(make_model(drop_path_rate=0.1), args, LabeledTensors()).train()

    run(tmp_path / "full")
    run(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    full, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "resumed"))
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6


def test_class_names_come_from_the_label_column_the_datasets_use():
    import datasets

    from maekit.training.scripts import class_names

    images = ["a.png", "b.png", "c.png"]
    named = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 2, 1]},
        features=datasets.Features(
            {"image": datasets.Value("string"), "label": datasets.ClassLabel(names=list("xyz"))}
        ),
    )
    assert class_names(named) == ["x", "y", "z"]
    # An integer column under a conventional name other than "label": the one MAEImageDataset reads.
    assert class_names(datasets.Dataset.from_dict({"image": images, "target": [0, 3, 1]})) == ["0", "1", "2", "3"]
    assert class_names(datasets.Dataset.from_dict({"image": images, "y": [1, 0, 0], "z": [4, 4, 4]}), "y") == [
        "0",
        "1",
    ]
    with pytest.raises(ValueError, match="No label column found among \\['image', 'y'\\]"):
        class_names(datasets.Dataset.from_dict({"image": images, "y": [1, 0, 0]}))
    with pytest.raises(ValueError, match="label_column='w' is not a column"):
        class_names(named, "w")
