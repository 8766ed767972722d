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
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import format_table, machine_info, write_json
from transformers import set_seed

from maekit import MAEForPreTraining
from maekit.augment import FineTuneEvalTransform
from maekit.data import MAEImageDataset, collate_fn, load_default_dataset
from maekit.evaluation import extract_features, knn_accuracy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=None, help="where the models go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="default: the demo's 25")
    parser.add_argument("--probe-epochs", type=float, default=None, help="default: the linear-probe demo's")
    parser.add_argument("--finetune-epochs", type=float, default=None, help="default: the fine-tuning demo's")
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


def run(args: argparse.Namespace) -> dict:
    pretrain, finetune, linear_probe = (load_example(name) for name in ("pretrain", "finetune", "linear_probe"))
    torch.set_num_threads(1)  # as the demos: one thread is fastest for these tiny matrices on a shared machine
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="maekit-digits-"))
    common = ["--report_to", "none", "--disable_tqdm", "true", "--seed", str(args.seed)]
    commands, timings = {}, {}

    def call(name: str, module, argv: list[str]) -> dict:
        commands[name] = f"python examples/{Path(module.__file__).name} " + " ".join(argv)
        start = time.perf_counter()
        metrics = module.main(argv)
        timings[name] = time.perf_counter() - start
        return metrics

    def epochs(value: float | None) -> list[str]:
        return [] if value is None else ["--num_train_epochs", str(value)]

    pretrained, random_init = work / "pretrained", work / "random-init"
    call("pretrain", pretrain, ["--output_dir", str(pretrained), *epochs(args.pretrain_epochs), *common])
    set_seed(args.seed)  # as examples/pretrain.py before it builds the model: the pretraining's starting point
    pretrain.build_model(pretrain.ModelArguments()).save_pretrained(random_init)
    image_size = pretrain.DEMO_MODEL["image_size"]

    results = {}
    for name, encoder in (("pretrained MAE", pretrained), ("random init", random_init)):
        tag = "pretrained" if encoder == pretrained else "random"
        row = {f"kNN ({pool})": knn_top1(encoder, pool, image_size, args.seed) for pool in ("cls", "mean")}
        probe = call(
            f"linear_probe_{tag}",
            linear_probe,
            ["--model_name_or_path", str(encoder), "--output_dir", str(work / f"probe-{tag}"),
             *epochs(args.probe_epochs), *common],
        )  # fmt: skip
        tuned = call(
            f"finetune_{tag}",
            finetune,
            ["--model_name_or_path", str(encoder), "--output_dir", str(work / f"finetune-{tag}"),
             *epochs(args.finetune_epochs), *common],
        )  # fmt: skip
        row.update({"linear probe": probe["eval_acc1"], "fine-tuning": tuned["eval_acc1"]})
        row.update(
            {"linear probe (best epoch)": probe["best_eval_acc1"], "fine-tuning (best epoch)": tuned["best_eval_acc1"]}
        )
        results[name] = row

    rows = [
        {
            "evaluation (top-1 %, 270 held-out digits)": metric,
            "pretrained MAE": results["pretrained MAE"][metric],
            "random init": results["random init"][metric],
            "gain": results["pretrained MAE"][metric] - results["random init"][metric],
        }
        for metric in results["pretrained MAE"]
    ]
    return {
        "rows": rows,
        "commands": commands,
        "seconds": timings,
        "machine": machine_info(torch.device("cpu")),
        "work_dir": str(work),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result["rows"], list(result["rows"][0])))
    print(f"\nTotal {sum(result['seconds'].values()):.0f} s of training; models in {result['work_dir']}.")
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
