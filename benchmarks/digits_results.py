"""Does MAE pretraining help? The real-data result on scikit-learn's handwritten digits, end to end.

1. Pretrain the tiny demo MAE with `examples/pretrain.py`'s demo recipe (4 blocks of width 64, 32x32 digits in 4x4
   patches, 25 epochs on the 1,527 training digits).
2. Save the same encoder at its random initialization (the model `examples/pretrain.py` starts from, same seed).
3. For both encoders, on the 270 held-out digits (stratified split, never seen in pretraining):
   - kNN top-1 (k=20, T=0.07) of frozen cls-token and mean-pooled features, the training digits as references;
   - linear-probe top-1 after `examples/linear_probe.py`'s demo recipe (frozen encoder, BatchNorm + linear head, LARS);
   - fine-tuning top-1 after `examples/finetune.py`'s demo recipe (from the random encoder = training from scratch).
   The accuracy reported is the one after the last epoch (the best-epoch one, chosen on the same held-out split, is in
   the JSON for reference).

    python benchmarks/digits_results.py --output digits_results.json     # about 6 minutes on 2 CPU cores

Every step calls the example scripts' `main` with the arguments printed in the JSON (`commands`), so the numbers can
be reproduced from the command line.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from common import format_table, machine_info, timed, write_json
from transformers import set_seed

from maekit import MAEForPreTraining
from maekit.augment import FineTuneEvalTransform
from maekit.data import MAEImageDataset, collate_fn, load_default_dataset
from maekit.evaluation import extract_features, knn_accuracy
from maekit.training.recipes import FINETUNE_DIGITS, PRETRAIN_DIGITS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# Arguments each recipe adds to the example scripts' (pretraining, fine-tuning); the linear probe is always the demo's.
RECIPES = {"demo": ({}, {}), "digits": (PRETRAIN_DIGITS, FINETUNE_DIGITS)}


def as_argv(arguments: dict) -> list[str]:
    """`{"max_steps": 100, "rand_augment": False}` -> `["--max_steps", "100", "--rand_augment", "false"]`."""
    return [
        item for k, v in arguments.items() for item in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="where the models go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="default: the demo's 25")
    parser.add_argument("--probe-epochs", type=float, default=None, help="default: the linear-probe demo's")
    parser.add_argument("--finetune-epochs", type=float, default=None, help="default: the fine-tuning demo's")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo",
                        help="'demo': the examples' demo recipes; 'digits': recipes.PRETRAIN_DIGITS / FINETUNE_DIGITS")  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, default=None, help="shorten pretraining (--max_steps)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="shorten fine-tuning (--max_steps)")
    parser.add_argument("--skip-linear-probe", action="store_true", help="leave the two linear probes out")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def knn_top1(model_dir: Path, pool: str, image_size: int, seed: int) -> float:
    """kNN top-1 of the held-out digits against the training digits, frozen features, no augmentation."""
    model = MAEForPreTraining.from_pretrained(model_dir)
    train, evaluation = load_default_dataset(image_size=image_size, source="digits", seed=seed)
    transform = FineTuneEvalTransform(size=image_size)
    features = [
        extract_features(
            model, torch.utils.data.DataLoader(MAEImageDataset(split, transform), 256, collate_fn=collate_fn), pool
        )
        for split in (train, evaluation)
    ]
    (train_features, train_labels), (eval_features, eval_labels) = features
    return knn_accuracy(train_features, train_labels, eval_features, eval_labels, k=20, temperature=0.07)


PIXEL_KNN_COSINE = "kNN (k=20, T=0.07, cosine)"
PIXEL_KNN = "kNN (Euclidean, k by 5-fold CV)"
PIXEL_LOGISTIC = "logistic regression (C by 5-fold CV)"


def pixel_baselines(train, evaluation, image_size: int) -> dict:
    """Top-1 % on the held-out digits of classifiers on the raw pixels the models see (the evaluation transform's
    `image_size`² normalized pixels, flattened): maekit's kNN (as for the features), scikit-learn's Euclidean kNN and a
    standardized logistic regression, their hyper-parameter chosen by 5-fold cross-validation on the training digits.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    transform = FineTuneEvalTransform(size=image_size)
    (x_train, y_train), (x_eval, y_eval) = (
        (batch["pixel_values"].flatten(1), batch["labels"])
        for batch in (collate_fn([MAEImageDataset(split, transform)[i] for i in range(len(split))])
                      for split in (train, evaluation))
    )  # fmt: skip
    knn = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": [1, 3, 5, 10]}, cv=5).fit(x_train, y_train)
    logistic = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]},
        cv=5,
    ).fit(x_train, y_train)
    accuracy = {
        PIXEL_KNN_COSINE: knn_accuracy(x_train, y_train, x_eval, y_eval, k=20, temperature=0.07),
        PIXEL_KNN: 100.0 * knn.score(x_eval, y_eval),
        PIXEL_LOGISTIC: 100.0 * logistic.score(x_eval, y_eval),
    }
    chosen = {PIXEL_KNN: knn.best_params_["n_neighbors"], PIXEL_LOGISTIC: logistic.best_params_}
    return {"accuracy": accuracy, "chosen": {PIXEL_KNN: chosen[PIXEL_KNN],
            PIXEL_LOGISTIC: chosen[PIXEL_LOGISTIC]["logisticregression__C"]}}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    pretrain, finetune, linear_probe = (load_example(name) for name in ("pretrain", "finetune", "linear_probe"))
    torch.set_num_threads(1)  # as the demos: one thread is fastest for these tiny matrices on a shared machine
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="maekit-digits-"))
    common = ["--report_to", "none", "--disable_tqdm", "true", "--seed", str(args.seed)]
    pretrain_recipe, finetune_recipe = RECIPES[args.recipe]
    commands, timings, cpu_timings = {}, {}, {}

    def call(name: str, module, argv: list[str]) -> dict:
        commands[name] = f"python examples/{Path(module.__file__).name} " + " ".join(argv)
        metrics, took = timed(lambda: module.main(argv))
        timings[name], cpu_timings[name] = took["wall_s"], took["cpu_s"]
        return metrics

    def length(epochs: float | None, steps: int | None) -> list[str]:
        return ([] if epochs is None else ["--num_train_epochs", str(epochs)]) + (
            [] if steps is None else ["--max_steps", str(steps)]
        )

    pretrained, random_init = work / "pretrained", work / "random-init"
    pretrain_argv = as_argv({k: v for k, v in pretrain_recipe.items() if k != "output_dir"})
    finetune_argv = as_argv({k: v for k, v in finetune_recipe.items() if k != "output_dir"})
    call("pretrain", pretrain, ["--output_dir", str(pretrained), *pretrain_argv,
                                *length(args.pretrain_epochs, args.pretrain_steps), *common])  # fmt: skip
    set_seed(args.seed)  # as examples/pretrain.py before it builds the model: the pretraining's starting point
    overrides = pretrain_recipe.get("config_overrides")
    pretrain.build_model(pretrain.ModelArguments(config_overrides=overrides)).save_pretrained(random_init)
    image_size = pretrain.DEMO_MODEL["image_size"]

    results = {}
    for name, encoder in (("pretrained MAE", pretrained), ("random init", random_init)):
        tag = "pretrained" if encoder == pretrained else "random"
        row = {f"kNN ({pool})": knn_top1(encoder, pool, image_size, args.seed) for pool in ("cls", "mean")}
        if not args.skip_linear_probe:
            probe = call(
                f"linear_probe_{tag}",
                linear_probe,
                ["--model_name_or_path", str(encoder), "--output_dir", str(work / f"probe-{tag}"),
                 *length(args.probe_epochs, None), *common],
            )  # fmt: skip
            row["linear probe"] = probe["eval_acc1"]
        tuned = call(
            f"finetune_{tag}",
            finetune,
            ["--model_name_or_path", str(encoder), "--output_dir", str(work / f"finetune-{tag}"), *finetune_argv,
             *length(args.finetune_epochs, args.finetune_steps), *common],
        )  # fmt: skip
        row["fine-tuning"] = tuned["eval_acc1"]
        if not args.skip_linear_probe:
            row["linear probe (best epoch)"] = probe["best_eval_acc1"]
        row["fine-tuning (best epoch)"] = tuned["best_eval_acc1"]
        results[name] = row

    train, evaluation = load_default_dataset(image_size=image_size, source="digits", seed=args.seed)
    pixels = pixel_baselines(train, evaluation, image_size)
    rows = [
        {
            "evaluation (top-1 %, 270 held-out digits)": metric,
            "pretrained MAE": results["pretrained MAE"][metric],
            "random init": results["random init"][metric],
            "gain": results["pretrained MAE"][metric] - results["random init"][metric],
        }
        for metric in results["pretrained MAE"]
    ]
    pixel_rows = [
        {
            "raw-pixel baseline (top-1 %, 270 held-out digits)": name,
            "top-1": value,
            "chosen": pixels["chosen"].get(name),
        }
        for name, value in pixels["accuracy"].items()
    ]
    tuned, scratch = results["pretrained MAE"]["fine-tuning"], results["random init"]["fine-tuning"]
    best_pixels = max(pixels["accuracy"].items(), key=lambda item: item[1])
    summary = {
        "recipe": args.recipe,
        "fine-tuned pretrained MAE": tuned,
        "from scratch, same recipe": scratch,
        "gain over from scratch": tuned - scratch,
        "best raw-pixel baseline": best_pixels[1],
        "best raw-pixel baseline is": best_pixels[0],
        "beats the best raw-pixel baseline": tuned > best_pixels[1],
        "pretraining + fine-tuning CPU-s": cpu_timings["pretrain"] + cpu_timings["finetune_pretrained"],
    }
    return {
        "rows": rows,
        "pixel_rows": pixel_rows,
        "summary": summary,
        "commands": commands,
        "seconds": timings,
        "cpu_seconds": cpu_timings,
        "machine": machine_info(torch.device("cpu")),
        "work_dir": str(work),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result["rows"], list(result["rows"][0])))
    print()
    print(format_table(result["pixel_rows"], list(result["pixel_rows"][0])))
    print()
    print(format_table([{"": k, "value": v} for k, v in result["summary"].items()], ["", "value"]))
    print(f"\nTotal {sum(result['seconds'].values()):.0f} s of training; models in {result['work_dir']}.")
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
