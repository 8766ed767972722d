"""Smoke tests of the benchmark scripts: they run end to end on tiny models, and their measuring helpers are right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import inference  # noqa: E402
import pretraining_variants  # noqa: E402
import train_step  # noqa: E402

TINY = (
    "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,decoder_hidden_size=32,"
    "decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=64,patch_size=8"
)
QUICK = ["--batch-size", "2", "--image-size", "32", "--repeats", "1", "--warmup", "1", "--matmul-size", "64"]


def test_count_flops_counts_linear_and_cpu_attention():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    assert common.count_flops(lambda: F.linear(x, w)) == 2 * 4 * 8 * 16
    # SDPA on CPU dispatches to a kernel torch's counter does not know; ours counts QK^T and PV: 2 * 2*B*H*N*N*d.
    q = torch.randn(2, 3, 5, 4)
    assert common.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * 2 * 2 * 3 * 5 * 5 * 4


def test_peak_memory_sees_transient_tensors_on_cpu():
    def fn():
        a = torch.empty(2**20, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(2 * 2**20, dtype=torch.uint8)  # 2 MiB, both live: 3 MiB
        del a, b
        return torch.empty(2**19, dtype=torch.uint8)  # 0.5 MiB after the peak

    peak = common.peak_memory(fn, torch.device("cpu"))
    assert 3 * 2**20 <= peak < 3.1 * 2**20


def test_parse_overrides():
    assert train_step.parse_overrides("a=1,b=0.5,c=gelu,d=true") == {"a": 1, "b": 0.5, "c": "gelu", "d": True}
    with pytest.raises(ValueError, match="field=value"):
        train_step.parse_overrides("hidden_size")


def _libturbojpeg3() -> str | None:
    """A libturbojpeg >= 3.0: $MAEKIT_LIBTURBOJPEG, else the system's when it is that recent."""
    import ctypes
    import ctypes.util
    import os

    path = os.environ.get("MAEKIT_LIBTURBOJPEG") or ctypes.util.find_library("turbojpeg")
    if path is None:
        return None
    try:
        return path if hasattr(ctypes.CDLL(path), "tj3SetCroppingRegion") else None
    except OSError:
        return None


def test_crop_window_route_refuses_an_older_library():
    import ctypes.util

    from crop_window_decode import TurboJPEG3

    with pytest.raises(ValueError, match="not libturbojpeg >= 3.0"):
        TurboJPEG3(ctypes.util.find_library("c"))


@pytest.mark.skipif(_libturbojpeg3() is None, reason="no libturbojpeg >= 3.0 (set MAEKIT_LIBTURBOJPEG to one)")
def test_crop_window_route_gives_the_pixels_of_the_full_decode(capsys):
    # Decoding only the crop window must change the speed, not the result: same boxes, same scales, same pixels
    # (up to fancy upsampling at the window's edges).
    from crop_window_decode import main

    differences = main(["--libturbojpeg", _libturbojpeg3(), "--images", "2"])
    assert len(differences) == 4 and max(differences.values()) < 0.01  # grey levels
    assert "oversampling 1.0: mean |difference|" in capsys.readouterr().out


def test_train_step_benchmark_runs_and_compares_the_same_computation(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    result = train_step.main(
        ["--preset", "vit-tiny-patch16", "--dtype", "fp32", "bf16", "--config-overrides", TINY, "--profile", "3"]
        + QUICK
        + ["--output", str(out)]
    )
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert result["first_loss"]["maekit"] == pytest.approx(result["first_loss"]["transformers"], rel=1e-5)
    rows = {(r["impl"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {(i, d) for i in ("maekit", "transformers", "matmul 64²") for d in ("fp32", "bf16")}
    for dtype in ("fp32", "bf16"):
        ours, theirs = rows[("maekit", dtype)], rows[("transformers", dtype)]
        assert ours["img/s"] > 0 and ours["peak MiB"] > ours["step MiB"] > 0
        # maekit skips embedding the masked patches, otherwise both count the same matmuls.
        assert 0.8 < ours["GFLOP/step"] / theirs["GFLOP/step"] <= 1.0
        assert ours["vs transformers"].endswith("x")
    assert len(result["profiles"]["maekit fp32"]) == 3
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| matmul 64²")  # the table comes last


def test_inference_benchmark_features_match_transformers_without_masking():
    result = inference.main(["--preset", "vit-tiny-patch16"] + QUICK)
    assert result["features_max_abs_diff_fp32"] < 1e-4
    assert result["settings"]["transformers_mask_ratio"] == 0.0
    assert [r["impl"] for r in result["rows"]] == ["maekit", "transformers", "matmul 64²"]
    assert all(r["img/s"] > 0 for r in result["rows"][:2])


def test_gpu_benchmark_runs_on_cpu_without_datasets(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--preset", "vit-tiny-patch16", "--config-overrides", TINY, "--no-compile"]
    argv += QUICK + ["--output", str(out)]
    code = (
        "import sys; sys.modules['datasets'] = None; "  # the H200 machine has no `datasets`: importing it must fail
        f"sys.path.insert(0, {str(BENCHMARKS)!r}); import gpu_train_step; gpu_train_step.main({argv!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["impl"] for r in result["rows"]] == ["maekit", "transformers", "matmul 64² bf16"]
    assert result["rows"][0]["MFU %"] > 0 and result["rows"][0]["vs transformers"].endswith("x")
    assert result["settings"]["attention_kernel"] == {"maekit": "flash-cpu", "transformers": "flash-cpu"}
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| matmul 64² bf16")


def test_pretraining_variants_benchmark_times_every_variant(tmp_path):
    out = tmp_path / "variants.json"
    argv = ["--preset", "vit-tiny-patch16", "--config-overrides", TINY, "--batch-size", "2", "--image-size", "32"]
    result = pretraining_variants.main(argv + ["--repeats", "1", "--warmup", "0", "--output", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(pretraining_variants.VARIANTS) and rows["mae"]["vs mae"] == "1.00x"
    # mask tokens in the encoder: all 16 patches instead of 4 go through the encoder block
    assert rows["encoder mask token"]["GFLOP/step"] > rows["mae"]["GFLOP/step"]
    assert rows["block masks"]["GFLOP/step"] == rows["mae"]["GFLOP/step"]  # same computation, other masks
    assert result["settings"]["command"].startswith("python benchmarks/pretraining_variants.py")


def test_ablations_benchmark_runs_every_stage_and_draws_the_figures(tmp_path, capsys, monkeypatch):
    # The mechanics of benchmarks/ablations.py on two points, two seeds and 2 steps per stage (not the results).
    # The raw-pixel baselines (5-fold CV, ~20 s) are tested with digits_results.py; here they are given.
    import ablations

    monkeypatch.setattr(ablations, "pixel_baselines", lambda *a: {"accuracy": {ablations.PIXEL_LOGISTIC: 97.0}})
    out, figures = tmp_path / "ablations.json", tmp_path / "figures"
    argv = ["--ablations", "mask_token", "--seeds", "0", "1", "--pretrain-steps", "2", "--finetune-steps", "2",
            "--probe-epochs", "1", "--output", str(out), "--figures", str(figures), "--work-dir", str(tmp_path)]  # fmt: skip
    result = ablations.main(argv)
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 6  # random init x 2 seeds, then 2 settings x 2 seeds
    (ablation,) = saved["ablations"]
    assert [p["label"] for p in ablation["points"]] == ["encoder w/o [M]", "encoder w/ [M]"]
    for point in ablation["points"]:
        assert point["seeds"] == 2 and point["paper"]["linear_probe"] is not None
        for metric in ("finetune", "linear_probe", "knn"):
            values = point[metric]["values"]
            assert len(values) == 2 and all(0 <= v <= 100 for v in values)
            assert point[metric]["min"] <= point[metric]["mean"] <= point[metric]["max"]
        assert point["pretrain_time_cpu_s"]["mean"] > 0
    with_token = [r for r in saved["runs"] if r["settings"]["encoder_mask_token"] and r["pretrained"]]
    assert len(with_token) == 2 and set(saved["random_init"]) == {"finetune", "linear_probe", "knn"}
    assert [p.name for p in figures.iterdir()] == ["ablation_mask_token.png"]
    assert "| **encoder w/o [M]** |" in capsys.readouterr().out
    assert not list(tmp_path.glob("maekit-ablation-*"))  # every run's models are removed
    # --resume reuses every run: nothing is trained again.
    again = ablations.main([*argv, "--resume"])
    assert again["runs"] == result["runs"]


def test_digits_recipes_become_example_arguments():
    import digits_results

    from maekit.training.recipes import FINETUNE_DIGITS, PRETRAIN_DIGITS

    assert digits_results.as_argv({"max_steps": 100, "rand_augment": False, "learning_rate": 0.004}) == [
        "--max_steps", "100", "--rand_augment", "false", "--learning_rate", "0.004",
    ]  # fmt: skip
    assert digits_results.RECIPES["digits"] == (PRETRAIN_DIGITS, FINETUNE_DIGITS)
    # Every key of the named recipes is an argument of its example script.
    pretrain, finetune = digits_results.load_example("pretrain"), digits_results.load_example("finetune")
    model_args, _, args = pretrain.parse_arguments(digits_results.as_argv(PRETRAIN_DIGITS))
    assert (
        pretrain.build_model(model_args).config.hidden_size == 128 and args.max_steps == PRETRAIN_DIGITS["max_steps"]
    )
    _, data_args, args = finetune.parse_arguments(digits_results.as_argv(FINETUNE_DIGITS))
    assert data_args.rand_augment is False and args.max_steps == FINETUNE_DIGITS["max_steps"]
