"""The MAE paper's ablations (He et al. 2021, Table 1 (a)-(f) and Figure 5) re-run at digits scale, with the library.

Every point is one run of the whole protocol, under one fixed budget, for several seeds:

1. pretrain a MAE of the demo's encoder (`maekit.training.recipes.DEMO_MODEL`: 4 blocks of width 64, 32x32 digits in
   4x4 patches; decoder 2 blocks of width 32) with `MAETrainer` on the 1,527 training digits for `--pretrain-steps`
   steps of 64 images (AdamW, lr 2e-3, 10% warmup, cosine), the point's setting changed: mask ratio, decoder depth or
   width, mask tokens in the encoder, target, mask sampling (`MAETrainingArguments.mask_strategy`), augmentation;
2. at its last step a `KNNMonitor` scores the frozen encoder on the 270 held-out digits: kNN (k=20, T=0.07) and a
   linear probe (BatchNorm + linear head on the frozen cls token, trained on the training digits' features);
3. fine-tune it with `ClassificationTrainer` for `--finetune-steps` steps (`FINETUNE` below: the fine-tuning demo's
   recipe without RandAugment, lr 4e-3, layer decay 0.75, drop path 0.1, label smoothing 0.1).

The same protocol from the random initialization (no pretraining: fine-tuning is then training from scratch), and
kNN / logistic regression on the raw pixels, are measured in the same run as references. The baseline setting (mask
ratio 0.75, random masks, pixel target, decoder 2 x 32, crop + flip) is shared by every ablation and run once per seed.

    OMP_NUM_THREADS=1 python benchmarks/ablations.py --output ablations.json --figures docs/images/ablations

writes the JSON (every run, the per-point mean / std / min / max over seeds, the paper's numbers, timings) after each
run (`--resume` continues an interrupted one), one PNG per ablation, and prints markdown tables. Wall and CPU time of
every stage are recorded: the mask-token ablation's time column is the paper's efficiency argument measured here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import machine_info, parse_checked, timed, write_json
from digits_results import PIXEL_LOGISTIC, pixel_baselines
from transformers import set_seed

from maekit import MAEConfig, MAEForPreTraining, MAETrainer, MAETrainingArguments
from maekit.augment import FineTuneEvalTransform
from maekit.data import MAEImageDataset, MAETrainTransform, load_default_dataset
from maekit.training import ClassificationTrainer, ClassificationTrainingArguments, KNNMonitor
from maekit.training.recipes import DEMO_MODEL, FINETUNE_DEMO
from maekit.training.scripts import (
    ClassificationDataArguments,
    ClassifierModelArguments,
    build_classifier,
    classification_transforms,
)

# Pretraining augmentations of Table 1(e), as `MAETrainTransform` arguments ("crop" = random size, the paper's).
AUGMENTATIONS = {
    "none": dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0),
    "crop": dict(scale=(0.2, 1.0), hflip_prob=0.0),
    "crop+flip": dict(scale=(0.2, 1.0), hflip_prob=0.5),
}
METRICS = ("finetune", "linear_probe", "knn")


def decoder_width(width: int) -> dict:
    return dict(
        decoder_hidden_size=width, decoder_intermediate_size=4 * width, decoder_num_attention_heads=width // 16
    )


# The official pretraining at the demo model's size; every ablation changes one of these. The decoder is half the
# encoder's width, as the paper's 512 of 1024 (the demo's is as wide as its encoder: twice the cost of a step here).
BASELINE = dict(mask_ratio=0.75, mask_strategy="random", target="pixel", encoder_mask_token=False,
                decoder_num_hidden_layers=2, **decoder_width(32), augmentation="crop+flip")  # fmt: skip
# Fine-tuning: the fine-tuning demo's recipe without RandAugment and at twice its rate, which in a pilot on one seed
# (100 steps) gave 93% instead of 76% from a pretrained encoder and 71% instead of 40% from scratch.
FINETUNE = {**FINETUNE_DEMO, "rand_augment": False, "learning_rate": 4e-3}


@dataclass(frozen=True)
class Point:
    """One setting of an ablation and the paper's (fine-tuning, linear probing) top-1 for it, if it has one."""

    label: str
    settings: dict
    paper: tuple[float | None, float | None] | None = None


@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    source: str  # where the paper's numbers are
    points: list[Point] = field(default_factory=list)  # numeric labels are drawn as a line (see plot)


# The paper: ViT-L/16, 800 pretraining epochs on ImageNet-1K; (fine-tuning, linear probing) top-1 %.
ABLATIONS = [
    Ablation(
        "mask_ratio",
        "Mask ratio",
        "Figure 5 and its text (§4.1): linear probing rises up to 75% (54.6% at 10%), fine-tuning is flat over 40-80%",
        [
            Point(f"{r:g}", dict(mask_ratio=r), {0.1: (None, 54.6), 0.75: (84.9, 73.5)}.get(r))
            for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
        ],
    ),
    Ablation(
        "decoder_depth",
        "Decoder depth (blocks)",
        "Table 1(a)",
        [
            Point(str(d), dict(decoder_num_hidden_layers=d), p)
            for d, p in ((1, (84.8, 65.5)), (2, (84.9, 70.0)), (4, (84.9, 71.9)), (8, (84.9, 73.5)))
        ],
    ),
    Ablation(
        "decoder_width",
        "Decoder width (encoder: 64)",
        "Table 1(b), at the same fraction of the encoder's width (paper: 256, 512, 1024 of 1024)",
        [Point(str(w), decoder_width(w), p) for w, p in ((16, (84.8, 71.3)), (32, (84.9, 73.5)), (64, (84.3, 73.1)))],
    ),
    Ablation(
        "mask_token",
        "Mask token",
        "Table 1(c) (accuracy, 3.3x encoder FLOPs) and Table 2 (2.8-4.1x wall-clock)",
        [
            Point("encoder w/o [M]", dict(encoder_mask_token=False), (84.9, 73.5)),
            Point("encoder w/ [M]", dict(encoder_mask_token=True), (84.2, 59.6)),
        ],
    ),
    Ablation(
        "target",
        "Reconstruction target",
        "Table 1(d) (HOG is MaskFeat's target, not in the MAE paper)",
        [
            Point("pixel", dict(target="pixel"), (84.9, 73.5)),
            Point("norm pixel", dict(target="norm_pixel"), (85.4, 73.9)),
            Point("HOG", dict(target="hog")),
        ],
    ),
    Ablation(
        "mask_strategy",
        "Mask sampling (75%)",
        "Table 1(f)",
        [
            Point("random", dict(mask_strategy="random"), (84.9, 73.5)),
            Point("block", dict(mask_strategy="block"), (82.8, 63.9)),
            Point("grid", dict(mask_strategy="grid"), (84.0, 66.0)),
        ],
    ),
    Ablation(
        "augmentation",
        "Pretraining augmentation",
        "Table 1(e) ('crop, rand size' is the official crop + flip)",
        [
            Point("none", dict(augmentation="none"), (84.0, 65.7)),
            Point("crop", dict(augmentation="crop")),
            Point("crop+flip", dict(augmentation="crop+flip"), (84.9, 73.5)),
        ],
    ),
]


@dataclass(frozen=True)
class Budget:
    """What every point gets, whatever its setting."""

    pretrain_steps: int = 300
    finetune_steps: int = 100
    batch_size: int = 64
    pretrain_learning_rate: float = 2e-3
    probe_epochs: int = 100


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ablations", nargs="+", default=[a.name for a in ABLATIONS],
                        choices=[a.name for a in ABLATIONS], help="which ablations (default: all)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=Budget.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=Budget.finetune_steps)
    parser.add_argument("--probe-epochs", type=int, default=Budget.probe_epochs)
    parser.add_argument("--output", default=None, help="the JSON (also read back by --resume)")
    parser.add_argument("--figures", default=None, help="folder for the PNG figures")
    parser.add_argument("--resume", action="store_true", help="reuse the runs already in --output")
    parser.add_argument("--work-dir", default=None, help="where the models go while a run lasts (default: temp)")
    args = parse_checked(parser, argv, positive=("pretrain_steps", "finetune_steps", "probe_epochs"))
    if args.resume and args.output is None:
        parser.error("--resume reads the runs from --output: give it")
    return args


class Digits:
    """The digits split once; the datasets every run wraps."""

    def __init__(self, seed: int = 0):
        self.train, self.eval = load_default_dataset(image_size=DEMO_MODEL["image_size"], source="digits", seed=seed)
        transform = FineTuneEvalTransform(size=DEMO_MODEL["image_size"])
        self.train_frozen = MAEImageDataset(self.train, transform)  # labeled, no augmentation: frozen features
        self.eval_frozen = MAEImageDataset(self.eval, transform)


def run_point(settings: dict, seed: int, budget: Budget, data: Digits, work: Path, pretrain: bool = True) -> dict:
    """Pretrain (unless `pretrain=False`: the random initialization), score the frozen encoder, fine-tune."""
    settings = {**BASELINE, **settings}
    model_fields = {k: v for k, v in settings.items() if k not in ("mask_strategy", "augmentation")}
    set_seed(seed)
    model = MAEForPreTraining(MAEConfig(**{**DEMO_MODEL, **model_fields}))
    steps = budget.pretrain_steps
    monitor = KNNMonitor(data.train_frozen, data.eval_frozen, every_n_steps=steps, linear_probe=True,
                         probe_epochs=budget.probe_epochs, num_labels=10, seed=seed)  # fmt: skip
    args = MAETrainingArguments(
        output_dir=str(work / "pretrain"), per_device_train_batch_size=budget.batch_size, max_steps=steps,
        warmup_steps=steps // 10, learning_rate=budget.pretrain_learning_rate, logging_steps=max(1, steps // 4),
        save_total_limit=1, num_reconstruction_images=0, mask_strategy=settings["mask_strategy"], seed=seed,
        report_to="none", disable_tqdm=True,
    )  # fmt: skip
    transform = MAETrainTransform(size=DEMO_MODEL["image_size"], **AUGMENTATIONS[settings["augmentation"]])
    trainer = MAETrainer(model, args, MAEImageDataset(data.train, transform, seed=seed), monitor=monitor)
    record = {"settings": settings, "seed": seed, "pretrained": pretrain}
    if pretrain:
        result, record["pretrain_time"] = timed(trainer.train)
        record["pretrain_loss"] = result.training_loss
        frozen = next(e for e in reversed(trainer.state.log_history) if "knn_acc1" in e)  # the monitor's, last step
    else:
        frozen = monitor(trainer, 0)
        model.save_pretrained(args.output_dir)
    record["knn"], record["linear_probe"] = frozen["knn_acc1"], frozen["linear_probe_acc1"]
    metrics, record["finetune_time"] = timed(lambda: finetune(Path(args.output_dir), seed, budget, data, work))
    record["finetune"] = metrics["eval_acc1"]
    return record


def finetune(encoder: Path, seed: int, budget: Budget, data: Digits, work: Path) -> dict:
    """`FINETUNE` for `budget.finetune_steps` steps, evaluated on the held-out digits at the end."""
    recipe = {k: v for k, v in FINETUNE.items() if k in ClassificationTrainingArguments.__dataclass_fields__}
    steps = budget.finetune_steps
    args = ClassificationTrainingArguments(
        **{**recipe, "output_dir": str(work / "finetune"), "max_steps": steps, "warmup_steps": steps // 10,
           "eval_steps": steps, "logging_steps": max(1, steps // 4), "save_best_model": False, "seed": seed,
           "report_to": "none", "disable_tqdm": True},
    )  # fmt: skip
    set_seed(seed)
    labels = [str(i) for i in range(10)]
    model = build_classifier(
        ClassifierModelArguments(model_name_or_path=str(encoder), drop_path_rate=FINETUNE["drop_path_rate"]),
        labels,
    )
    data_fields = ClassificationDataArguments.__dataclass_fields__
    data_args = ClassificationDataArguments(**{k: v for k, v in FINETUNE.items() if k in data_fields})
    train_transform, eval_transform = classification_transforms(model.config, data_args)
    trainer = ClassificationTrainer(
        model,
        args,
        MAEImageDataset(data.train, train_transform, seed=seed),
        eval_dataset=MAEImageDataset(data.eval, eval_transform),
    )
    return trainer.train().metrics


def run_key(settings: dict, seed: int, pretrained: bool) -> str:
    return json.dumps({"settings": {**BASELINE, **settings}, "seed": seed, "pretrained": pretrained}, sort_keys=True)


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def summarize(runs: dict[str, dict], ablations: list[Ablation], seeds: list[int]) -> list[dict]:
    """Per ablation and point: mean / std / min / max over seeds of each metric and of the pretraining time."""
    out = []
    for ablation in ablations:
        points = []
        for point in ablation.points:
            records = [
                runs[run_key(point.settings, s, True)] for s in seeds if run_key(point.settings, s, True) in runs
            ]
            if not records:
                continue
            row = {"label": point.label, "settings": {**BASELINE, **point.settings}, "seeds": len(records)}
            row["paper"] = (
                None if point.paper is None else {"finetune": point.paper[0], "linear_probe": point.paper[1]}
            )
            row["baseline"] = {**BASELINE, **point.settings} == BASELINE
            for metric in METRICS:
                row[metric] = spread([r[metric] for r in records])
            for clock in ("wall_s", "cpu_s"):
                row[f"pretrain_time_{clock}"] = spread([r["pretrain_time"][clock] for r in records])
            points.append(row)
        out.append({"name": ablation.name, "title": ablation.title, "source": ablation.source, "points": points})
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # one thread is fastest for these tiny models on a shared machine (see digits_results)
    budget = Budget(args.pretrain_steps, args.finetune_steps, probe_epochs=args.probe_epochs)
    ablations = [a for a in ABLATIONS if a.name in args.ablations]
    previous = json.loads(Path(args.output).read_text()) if args.resume and Path(args.output).is_file() else {}
    runs = {run_key(r["settings"], r["seed"], r["pretrained"]): r for r in previous.get("runs", [])}
    if previous and previous["settings"]["budget"] != asdict(budget):
        raise SystemExit(f"--resume: {args.output} was run with another budget ({previous['settings']['budget']}).")
    data = Digits()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    wanted = [({}, s, False) for s in args.seeds]  # the references first: the random initialization ...
    for ablation in ablations:  # ... then every point, the baseline once
        wanted += [(p.settings, s, True) for p in ablation.points for s in args.seeds]
    todo = list(dict.fromkeys(run_key(*w) for w in wanted))
    by_key = {run_key(*w): w for w in wanted}
    result = {}

    def save() -> None:
        command = "python benchmarks/ablations.py " + " ".join(sys.argv[1:] if __name__ == "__main__" else [])
        seeds = [s for s in args.seeds if run_key({}, s, False) in runs]
        elapsed = previous.get("elapsed", {"wall_s": 0.0, "cpu_s": 0.0})
        if ran:  # a resumed run adds its own time; redrawing from a finished JSON adds none
            elapsed = {"wall_s": time.perf_counter() - start_wall + elapsed["wall_s"],
                       "cpu_s": time.process_time() - start_cpu + elapsed["cpu_s"]}  # fmt: skip
        result.update(
            settings={
                "budget": asdict(budget),
                "seeds": args.seeds,
                "baseline": BASELINE,
                "model": DEMO_MODEL,
                "finetune_recipe": FINETUNE,
                "command": previous.get("settings", {}).get("command", command),
            },
            machine=previous.get("machine") or machine_info(torch.device("cpu")),
            runs=list(runs.values()),
            random_init={m: spread([runs[run_key({}, s, False)][m] for s in seeds]) for m in METRICS} if seeds else {},
            ablations=summarize(runs, ablations, args.seeds),
            elapsed=elapsed,
        )
        write_json(args.output, result)

    result["pixels"] = previous.get("pixels") or pixel_baselines(data.train, data.eval, DEMO_MODEL["image_size"])
    ran = False
    for number, key in enumerate(todo, 1):
        if key in runs:
            continue
        ran = True
        settings, seed, pretrained = by_key[key]
        work = Path(tempfile.mkdtemp(prefix="maekit-ablation-", dir=args.work_dir))
        try:
            runs[key] = run_point(settings, seed, budget, data, work, pretrain=pretrained)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r = runs[key]
        print(f"[{number}/{len(todo)}] {settings or 'random init'} seed {seed}: fine-tune {r['finetune']:.1f}, "
              f"probe {r['linear_probe']:.1f}, kNN {r['knn']:.1f} "
              f"({r.get('pretrain_time', {}).get('cpu_s', 0):.0f} + {r['finetune_time']['cpu_s']:.0f} CPU-s)",
              flush=True)  # fmt: skip
        save()
    save()
    return result


def markdown_tables(result: dict) -> str:
    """One markdown table per ablation: ours (mean ± std over seeds) beside the paper's."""

    def cell(spread_: dict) -> str:
        return f"{spread_['mean']:.1f} ± {spread_['std']:.1f}"

    lines = []
    for ablation in result["ablations"]:
        lines += [f"**{ablation['title']}** — paper: {ablation['source']}", ""]
        lines.append("| setting | fine-tune | linear probe | kNN | pretraining CPU-s | paper ft | paper lin |")
        lines.append("|---|---|---|---|---|---|---|")
        for p in ablation["points"]:
            paper = p["paper"] or {}
            label = f"**{p['label']}**" if p["baseline"] else p["label"]
            paper_ft, paper_lin = (f"{paper[k]:.1f}" if paper.get(k) is not None else "—"
                                   for k in ("finetune", "linear_probe"))  # fmt: skip
            lines.append(
                f"| {label} | {cell(p['finetune'])} | {cell(p['linear_probe'])} | {cell(p['knn'])} | "
                f"{p['pretrain_time_cpu_s']['mean']:.0f} | {paper_ft} | {paper_lin} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, folder: str | Path) -> list[Path]:
    """One PNG per ablation: fine-tuning and linear probe top-1 (mean, min-max bar, every seed), the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    random_init, pixels = result.get("random_init", {}), result["pixels"]
    references = {
        "finetune": [("from scratch (same budget)", random_init.get("finetune")), ("best raw-pixel baseline", None)],
        "linear_probe": [("random init", random_init.get("linear_probe")), ("logistic regression on pixels", None)],
    }
    pixel_lines = {"finetune": max(pixels["accuracy"].values()), "linear_probe": pixels["accuracy"][PIXEL_LOGISTIC]}
    for ablation in result["ablations"]:
        points = ablation["points"]
        if not points:
            continue
        timed = ablation["name"] == "mask_token"
        fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(11 if timed else 8, 3.4), constrained_layout=True)
        numeric = all(_is_number(p["label"]) for p in points)
        xs = [float(p["label"]) for p in points] if numeric else list(range(len(points)))
        for ax, metric, name in zip(axes, ("finetune", "linear_probe"), ("fine-tuning", "linear probe")):
            means = [p[metric]["mean"] for p in points]
            low = [p[metric]["mean"] - p[metric]["min"] for p in points]
            high = [p[metric]["max"] - p[metric]["mean"] for p in points]
            ax.errorbar(xs, means, yerr=[low, high], fmt="o-" if numeric else "o", color="C0", capsize=4,
                        label=f"maekit, mean and range of {points[0]['seeds']} seeds")  # fmt: skip
            for x, p in zip(xs, points):
                ax.scatter([x] * len(p[metric]["values"]), p[metric]["values"], s=10, color="C0", alpha=0.35)
            baseline = [x for x, p in zip(xs, points) if p["baseline"]]
            if baseline:
                ax.axvline(baseline[0], color="0.85", lw=6, zorder=0, label="baseline (shared by every ablation)")
            (scratch_label, scratch), (pixel_label, _) = references[metric]
            if scratch:
                ax.axhline(scratch["mean"], color="C3", ls="--", lw=1, label=scratch_label)
            ax.axhline(pixel_lines[metric], color="C2", ls=":", lw=1.2, label=pixel_label)
            ax.set_title(f"{name} (270 held-out digits)", fontsize=10)
            ax.set_ylabel("top-1 %")
            ax.set_xlabel(ablation["title"])
            if not numeric:
                ax.set_xticks(xs, [p["label"] for p in points])
                ax.set_xlim(-0.5, len(points) - 0.5)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="lower left")
        if timed:
            ax = axes[2]
            cpu = [p["pretrain_time_cpu_s"]["mean"] for p in points]
            ax.bar(xs, cpu, color="C1")
            for x, value in zip(xs, cpu):
                ax.text(x, value, f"{value:.0f} s ({value / cpu[0]:.2f}x)", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(xs, [p["label"] for p in points])
            ax.set_title("pretraining time (CPU-s, same steps)", fontsize=10)
            ax.set_ylim(0, max(cpu) * 1.2)
        title = f"{ablation['title']} — paper: {ablation['source']}"
        fig.suptitle(textwrap.fill(title, 140 if timed else 100), fontsize=9)
        path = folder / f"ablation_{ablation['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if args.figures:
        result["figures"] = [str(p) for p in plot(result, args.figures)]
        write_json(args.output, result)
    print(markdown_tables(result))
    elapsed = result["elapsed"]
    print(f"Total: {elapsed['wall_s'] / 60:.1f} min wall, {elapsed['cpu_s'] / 60:.1f} CPU-min.")
    return result


if __name__ == "__main__":
    main()
