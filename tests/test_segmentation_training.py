"""SegmentationTrainer / SegmentationTask, the poly schedule, SegmentationTrainingArguments and examples/segmentation.py."""

import json
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
from transformers import AutoModelForSemanticSegmentation, UperNetConfig, UperNetForSemanticSegmentation, pipeline

from maekit import MAEBackboneConfig, MAEConfig, MAEForImageClassification, MAEForPreTraining, MAETrainingArguments
from maekit.segmentation import (
    ADE20K_RECIPE,
    TEXTURE_CLASSES,
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    evaluate_segmentation,
    load_texture_mosaics,
    segmentation_image_processor,
)
from maekit.training import (
    SegmentationTrainer,
    SegmentationTrainingArguments,
    cosine_lr_with_warmup,
    lr_with_warmup,
    poly_lr_with_warmup,
)
from maekit.training.segmentation_scripts import (
    SegmentationDataArguments,
    SegmentationModelArguments,
    build_segmentation_model,
    default_out_indices,
)

from .conftest import TINY
from .test_finetune import load_example

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {i: name for i, name in enumerate(TEXTURE_CLASSES)}


def tiny_upernet(hidden_size=32, drop_path_rate=0.0, image_size=32):
    torch.manual_seed(0)
    backbone = MAEBackboneConfig(
        **{**TINY, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "image_size": image_size},
        drop_path_rate=drop_path_rate,
        pyramid_scales=[4, 2, 1, 0.5],
        pyramid_channels=16 if hidden_size == 32 else 32,
    )
    config = UperNetConfig(
        backbone_config=backbone,
        id2label=CLASSES,
        label2id={v: k for k, v in CLASSES.items()},
        hidden_size=16 if hidden_size == 32 else 32,
        auxiliary_channels=8 if hidden_size == 32 else 16,
    )
    return UperNetForSemanticSegmentation(config)


def varied_upernet():
    """`tiny_upernet` with a large random classifier: an untrained model predicts every class, not mostly one."""
    model = tiny_upernet()
    with torch.no_grad():
        model.decode_head.classifier.weight.normal_(0, 10)
        model.decode_head.classifier.bias.zero_()
    return model


def mosaic_datasets(num_train=16, num_eval=4, size=32):
    """Texture mosaics: random crops (seed, epoch, index) for training, whole images for evaluation."""
    mosaics = load_texture_mosaics(num_train=num_train, num_eval=num_eval, image_size=size, seed=0)
    train_transform = SegmentationTrainTransform(
        crop_size=size, scale=(size, size), ratio_range=(1.0, 1.5), photometric_distortion=False
    )
    train = SegmentationDataset(mosaics["train"], train_transform, seed=0)
    return train, SegmentationDataset(mosaics["validation"], SegmentationEvalTransform(scale=(size, size)))


def make_args(output_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        warmup_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        eval_mode="whole",
        report_to="none",
        disable_tqdm=True,
    )
    return SegmentationTrainingArguments(**{**values, **overrides})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def evaluations(history) -> list[dict]:
    return [entry for entry in history if "eval_mean_iou" in entry]


# ----------------------------------------------------------------------------------------------------------------------
# Schedule and arguments


def mmseg_poly_lr(it, base_lr, max_iters, power, min_lr, warmup_iters, warmup_ratio):
    """mmcv's PolyLrUpdaterHook(by_epoch=False, warmup="linear"), written out from its get_lr / get_warmup_lr."""
    regular = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it >= warmup_iters:
        return regular
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("power, min_lr, warmup_ratio", [(1.0, 0.0, 1e-6), (0.9, 1e-6, 0.0), (2.0, 0.0, 0.1)])
def test_poly_schedule_matches_the_mmseg_formula(power, min_lr, warmup_ratio):
    lr, total, warmup = 1e-4, 200, 15
    for step in range(total + 1):
        got = poly_lr_with_warmup(
            step,
            learning_rate=lr,
            total_steps=total,
            warmup_steps=warmup,
            min_lr=min_lr,
            power=power,
            warmup_ratio=warmup_ratio,
        )
        assert got == pytest.approx(mmseg_poly_lr(step, lr, total, power, min_lr, warmup, warmup_ratio), rel=1e-12)
    # Linear decay over the whole run (warmup included), ending at min_lr; warmup from 0 without warmup_ratio.
    poly = dict(learning_rate=lr, total_steps=100, warmup_steps=10)
    assert poly_lr_with_warmup(50, **poly) == pytest.approx(lr / 2) and poly_lr_with_warmup(100, **poly) == 0.0
    assert poly_lr_with_warmup(0, **poly) == 0.0 and poly_lr_with_warmup(5, **poly) == pytest.approx(lr * 0.95 * 0.5)
    assert lr_with_warmup("poly", 30, poly_power=1.0, **poly) == poly_lr_with_warmup(30, **poly)
    assert lr_with_warmup("cosine", 30, **poly) == cosine_lr_with_warmup(30, **poly)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_with_warmup("step", 3, **poly)
    with pytest.raises(ValueError, match="power must be > 0"):
        poly_lr_with_warmup(3, power=0.0, **poly)


def test_the_trainer_follows_the_poly_schedule_in_every_layer_decay_group(tmp_path):
    train, _ = mosaic_datasets(num_train=8)
    args = make_args(tmp_path, max_steps=20, warmup_steps=5, layer_decay=0.5)
    trainer = SegmentationTrainer(tiny_upernet(), args, train)
    expected = dict(learning_rate=1e-3, total_steps=20, warmup_steps=5)
    assert [trainer.lr_at(s) for s in range(21)] == [poly_lr_with_warmup(s, **expected) for s in range(21)]
    optimizer = trainer.task.create_optimizer(trainer)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert scales == [0.5**3, 0.5**2, 0.5, 1.0]  # embeddings, block 1, block 2, neck + heads (2 blocks)
    cosine = SegmentationTrainer(tiny_upernet(), make_args(tmp_path, max_steps=20, lr_schedule="cosine"), train)
    assert cosine.lr_at(7) == cosine_lr_with_warmup(7, learning_rate=1e-3, total_steps=20, warmup_steps=1)


def test_argument_defaults_are_the_ade20k_recipe():
    args = SegmentationTrainingArguments()
    recipe = ADE20K_RECIPE
    # lr = base_learning_rate * global batch / 256 = exactly the recipe's 1e-4 at its batch of 16.
    assert args.global_batch_size(num_processes=1) == recipe["batch_size"] == 16
    assert args.resolved_learning_rate(num_processes=1) == recipe["learning_rate"]
    assert SegmentationTrainingArguments(per_device_train_batch_size=2).resolved_learning_rate(8) == 1e-4
    assert (args.adam_beta1, args.adam_beta2) == recipe["betas"]
    assert (args.weight_decay, args.layer_decay) == (recipe["weight_decay"], recipe["layer_decay"])
    assert (args.lr_schedule, args.lr_poly_power, args.min_lr) == ("poly", recipe["poly_power"], recipe["min_lr"])
    assert (args.warmup_steps, args.max_steps) == (recipe["warmup_steps"], recipe["max_steps"])
    assert (args.eval_mode, args.eval_crop_size, args.eval_stride) == (
        recipe["eval_mode"],
        recipe["eval_crop_size"],
        recipe["eval_stride"],
    )
    data, model = SegmentationDataArguments(), SegmentationModelArguments()
    assert (data.crop_size, tuple(data.scale), tuple(data.ratio_range)) == (
        recipe["crop_size"],
        recipe["scale"],
        recipe["ratio_range"],
    )
    assert (data.cat_max_ratio, data.photometric_distortion) == (recipe["cat_max_ratio"], True)
    assert (model.drop_path_rate, model.upernet_hidden_size, model.auxiliary_loss_weight) == (
        recipe["drop_path_rate"],
        recipe["upernet_hidden_size"],
        recipe["auxiliary_loss_weight"],
    )
    assert tuple(default_out_indices(12)) == recipe["out_indices"] and default_out_indices(24) == [8, 12, 16, 24]
    assert default_out_indices(2) == [2]  # too shallow for four distinct blocks: ViTDet's last block
    # The base class keeps the MAE recipe's cosine.
    assert MAETrainingArguments().lr_schedule == "cosine"
    for bad, match in (
        (dict(eval_mode="tiles"), "eval_mode"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(lr_poly_power=0.0), "lr_poly_power"),
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(eval_stride=0), "eval_stride"),
    ):
        with pytest.raises(ValueError, match=match):
            SegmentationTrainingArguments(**bad)


def test_model_and_argument_checks(tmp_path):
    train, _ = mosaic_datasets(num_train=8)
    with pytest.raises(TypeError, match="SegmentationTrainingArguments"):
        SegmentationTrainer(tiny_upernet(), MAETrainingArguments(), train)
    classifier = MAEForImageClassification(MAEConfig(**{**TINY, "num_labels": 3}))
    with pytest.raises(TypeError, match="semantic segmentation model"):
        SegmentationTrainer(classifier, make_args(tmp_path), train)
    train.transform.ignore_index = 0
    with pytest.raises(ValueError, match="config.loss_ignore_index"):
        SegmentationTrainer(tiny_upernet(), make_args(tmp_path), train)


# ----------------------------------------------------------------------------------------------------------------------
# Training, resuming, the best model


def test_trainer_learns_texture_mosaics(tmp_path):
    """80 steps of a tiny UperNet-MAE from scratch on real texture photographs: loss down, mIoU on unseen texture up."""
    train, evaluation = mosaic_datasets(num_train=16, num_eval=4, size=64)
    args = make_args(
        tmp_path,
        per_device_train_batch_size=8,
        max_steps=80,
        warmup_steps=5,
        layer_decay=0.9,
        eval_on_start=True,
        eval_steps=80,
        save_steps=1000,
        logging_steps=5,
    )
    trainer = SegmentationTrainer(tiny_upernet(hidden_size=64, image_size=64), args, train, eval_dataset=evaluation)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    before, after = evaluations(trainer.state.log_history)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    assert after["eval_loss"] < 0.9 * before["eval_loss"]
    assert after["eval_mean_iou"] > before["eval_mean_iou"] + 15 and after["eval_pixel_accuracy"] > 55


def test_exact_resume(tmp_path):
    # 16 mosaics, global batch 4: 4 steps per epoch; resuming at step 3 crosses an epoch boundary afterwards.
    # Drop path draws from the process RNG and the crops from (seed, epoch, index): both must continue exactly.
    train, evaluation = mosaic_datasets()
    args = dict(max_steps=6, save_steps=3, eval_steps=3)
    SegmentationTrainer(
        tiny_upernet(drop_path_rate=0.2), make_args(tmp_path / "full", **args), train, eval_dataset=evaluation
    ).train()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.replace(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    torch.manual_seed(123)  # a different init and RNG state: everything must come from the checkpoint
    model = UperNetForSemanticSegmentation(tiny_upernet(drop_path_rate=0.2).config)
    resumed = SegmentationTrainer(
        model, make_args(resumed_dir, resume_from_checkpoint="latest", **args), train, eval_dataset=evaluation
    )
    assert resumed.train().global_step == 6
    full, again = weights(tmp_path / "full"), weights(resumed_dir)
    assert full.keys() == again.keys() and any("running_mean" in k for k in full)  # BatchNorm statistics too
    assert max((full[k].double() - again[k].double()).abs().max().item() for k in full) <= 1e-6
    full_state = json.loads((tmp_path / "full" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["loss"] for e in resumed.state.log_history if "loss" in e] == pytest.approx(
        [e["loss"] for e in full_state["log_history"] if "loss" in e], abs=1e-6
    )
    assert evaluations(resumed.state.log_history)[-1]["eval_mean_iou"] == pytest.approx(
        evaluations(full_state["log_history"])[-1]["eval_mean_iou"], abs=1e-6
    )


def test_best_model_checkpoints_and_card_load_as_transformers_segmenters(tmp_path):
    train, evaluation = mosaic_datasets()
    args = make_args(tmp_path, max_steps=6, eval_steps=2, save_steps=3, eval_mode="slide", eval_crop_size=16)
    trainer = SegmentationTrainer(
        tiny_upernet(), args, train, eval_dataset=evaluation, image_processor=segmentation_image_processor(32)
    )
    trainer.train()
    scores = evaluations(trainer.state.log_history)
    best = max(scores, key=lambda entry: entry["eval_mean_iou"])
    results = json.loads((tmp_path / "best" / "eval_results.json").read_text())
    assert (results["step"], trainer.state.best_step) == (best["step"], best["step"])
    assert results["eval_mean_iou"] == pytest.approx(best["eval_mean_iou"]) == scores[-1]["best_eval_mean_iou"]
    assert sorted(results["per_class_iou"]) == sorted(TEXTURE_CLASSES)
    # The folder holds the weights that scored it: re-evaluating them independently gives the recorded mIoU.
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "best")
    again = evaluate_segmentation(model, evaluation, mode="slide", crop_size=16, stride=args.eval_stride)
    assert 100 * again["mean_iou"] == pytest.approx(results["eval_mean_iou"], abs=1e-4)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for folder in ("best", "checkpoint-3", "checkpoint-6", "."):
        assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path / folder)).__name__ == (
            "UperNetForSemanticSegmentation"
        )
        masks = pipeline("image-segmentation", model=str(tmp_path / folder))(image)
        assert masks and {m["label"] for m in masks} <= set(TEXTURE_CLASSES) and masks[0]["mask"].size == (50, 40)
    card = (tmp_path / "README.md").read_text()
    assert (
        "pipeline_tag: image-segmentation" in card and "| eval_mean_iou |" in card and "| lr_schedule | poly |" in card
    )


# ----------------------------------------------------------------------------------------------------------------------
# Distributed evaluation


class SizedSamples(torch.utils.data.Dataset):
    """Evaluation items of different sizes, labels at another size than the input (as SegmentationEvalTransform)."""

    SIZES = [
        ((24, 40), (30, 50)),
        ((32, 32), (32, 32)),
        ((16, 48), (20, 60)),
        ((32, 32), (32, 32)),
        ((40, 24), (40, 24)),
    ]

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.items = []
        for size, label_size in self.SIZES:
            labels = torch.randint(0, 3, label_size, generator=generator)
            labels[: label_size[0] // 4] = 255
            self.items.append({"pixel_values": torch.randn(3, *size, generator=generator), "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_summed_shard_confusions_equal_one_process(tmp_path, mode):
    from maekit.training.segmentation import SegmentationEvaluation

    train, _ = mosaic_datasets(num_train=8)
    args = make_args(tmp_path, per_device_eval_batch_size=2, eval_mode=mode, eval_crop_size=16, eval_stride=11)
    trainer = SegmentationTrainer(varied_upernet(), args, train, eval_dataset=SizedSamples())
    task = trainer.task
    one = task.evaluate_shard(trainer, 0, 1)
    shards = [task.evaluate_shard(trainer, rank, 2) for rank in range(2)]
    assert [int(s.confusion.sum()) for s in shards] == [sum_valid(0, 2), sum_valid(1, 2)]  # 3 and 2 images
    summed = SegmentationEvaluation(shards[0].confusion + shards[1].confusion, shards[0].loss_sum + shards[1].loss_sum)
    assert (one.confusion > 0).sum() >= 7  # predictions spread over the classes: a meaningful comparison
    assert torch.equal(summed.confusion, one.confusion) and summed.loss_sum == pytest.approx(one.loss_sum, rel=1e-6)
    metrics = trainer.evaluate()  # one process: through accelerator.reduce
    assert summed.metrics(255)[0] == pytest.approx(metrics, rel=1e-6)  # float32 logits of other batchings
    reference = evaluate_segmentation(trainer.model, SizedSamples(), mode=mode, crop_size=16, stride=11)
    assert metrics["eval_mean_iou"] == pytest.approx(100 * reference["mean_iou"], rel=1e-9)
    assert metrics["eval_pixel_accuracy"] == pytest.approx(100 * reference["pixel_accuracy"], rel=1e-9)


def sum_valid(rank: int, world: int) -> int:
    return sum(int((SizedSamples()[i]["labels"] != 255).sum()) for i in range(rank, len(SizedSamples()), world))


_DISTRIBUTED_EVAL = """
import json, sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_segmentation_training import SizedSamples, make_args, mosaic_datasets, varied_upernet
from maekit.training import SegmentationTrainer

train, _ = mosaic_datasets(num_train=8)
args = make_args(Path(sys.argv[1]), eval_mode="slide", eval_crop_size=16, eval_stride=11)
trainer = SegmentationTrainer(varied_upernet(), args, train, eval_dataset=SizedSamples())
metrics = trainer.evaluate()
if trainer.accelerator.is_main_process:
    Path(sys.argv[1]).mkdir(parents=True)
    Path(sys.argv[1], "metrics.json").write_text(json.dumps(metrics))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path):
    # 5 images of different sizes over 2 processes: 3 and 2 forwards of different window counts, summed confusions.
    script = tmp_path / "eval_script.py"
    script.write_text(textwrap.dedent(_DISTRIBUTED_EVAL.format(root=str(ROOT))))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    two = subprocess.run([*launch, str(script), str(tmp_path / "two")], env=env, capture_output=True, text=True)
    metrics_file = tmp_path / "two" / "metrics.json"
    # gloo teardown can abort a rank after the work is done (design.md): the result file tells.
    assert two.returncode == 0 or metrics_file.is_file(), two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics_two = json.loads(metrics_file.read_text())
    assert metrics_two["eval_mean_iou"] == metrics_one["eval_mean_iou"]  # the same summed confusion matrix
    assert metrics_two == pytest.approx(metrics_one, rel=1e-6)  # float32 logits of other batchings


# ----------------------------------------------------------------------------------------------------------------------
# examples/segmentation.py


def short_run(output_dir, *extra):
    return ["--output_dir", str(output_dir), "--max_steps", "4", "--eval_steps", "2", "--per_device_train_batch_size",
            "4", "--report_to", "none", "--disable_tqdm", "true", *extra]  # fmt: skip


def test_example_demo_end_to_end(tmp_path, capsys):
    example = load_example("segmentation")
    argv = short_run(tmp_path, "--demo_train_images", "8", "--demo_eval_images", "2", "--demo_image_size", "64")
    metrics = example.main(argv)
    assert {"eval_mean_iou", "best_eval_mean_iou", "eval_pixel_accuracy", "train_loss"} <= set(metrics)
    assert "Eval mean IoU" in capsys.readouterr().out
    segmenter = pipeline("image-segmentation", model=str(tmp_path / "best"))
    masks = segmenter(Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)))
    assert {m["label"] for m in masks} <= set(TEXTURE_CLASSES)
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert model.config.backbone_config.hidden_size == 64 and model.config.backbone_config.out_indices == [1, 2, 3, 4]
    # The pipeline resizes to the scale the model was evaluated at (the short edge of --scale), not the crop size.
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 128, "width": 128}


def test_example_defaults_demo_and_recipe():
    example = load_example("segmentation")
    model_args, data_args, args = example.parse_arguments([])
    assert args.output_dir == "outputs/mae-segmentation-default" and args.max_steps == 600 and args.eval_on_start
    assert data_args.crop_size == 64 and model_args.upernet_hidden_size == 32 and not data_args.photometric_distortion
    model_args, data_args, args = example.parse_arguments(["--dataset_name", "some/ade20k", "--max_steps", "10"])
    assert (args.max_steps, args.resolved_learning_rate(), args.layer_decay, args.eval_crop_size) == (
        10,
        1e-4,
        0.65,
        512,
    )
    assert (data_args.crop_size, model_args.upernet_hidden_size, model_args.drop_path_rate) == (512, 768, 0.1)


def test_example_on_a_pretrained_folder_and_a_local_data_folder(tmp_path, tiny_config):
    MAEForPreTraining(tiny_config()).save_pretrained(tmp_path / "pretrained")
    mosaics = load_texture_mosaics(num_train=8, num_eval=1, image_size=48, seed=2)["train"]
    for name in ("images", "annotations"):
        (tmp_path / "data" / name).mkdir(parents=True)
    for i, record in enumerate(mosaics):
        record["image"].save(tmp_path / "data" / "images" / f"{i}.jpg")
        record["annotation"].save(tmp_path / "data" / "annotations" / f"{i}.png")
    example = load_example("segmentation")
    common = ["--model_name_or_path", str(tmp_path / "pretrained"), "--data_dir", str(tmp_path / "data")]
    with pytest.raises(ValueError, match="--num_labels"):
        example.main(short_run(tmp_path / "out", *common))
    data = ["--label_names", *TEXTURE_CLASSES, "--train_val_split", "0.25", "--crop_size", "32", "--scale", "48", "32"]
    example.main(
        short_run(tmp_path / "out", *common, *data, "--pyramid_channels", "16", "--upernet_hidden_size", "16")
    )
    final = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert final.config.id2label == CLASSES and final.config.backbone_config.drop_path_rate == 0.1
    # The encoder starts from the pretrained folder's weights.
    model_args = SegmentationModelArguments(model_name_or_path=str(tmp_path / "pretrained"), pyramid_channels=16)
    model = build_segmentation_model(model_args, CLASSES, image_size=32)
    source = MAEForPreTraining.from_pretrained(tmp_path / "pretrained")
    assert torch.equal(model.backbone.mae.blocks[1].mlp.fc1.weight, source.mae.blocks[1].mlp.fc1.weight)
    assert model.config.backbone_config.out_indices == [2]  # 2 blocks: the last one feeds every pyramid level
