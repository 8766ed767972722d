"""`--help` works for every script and command line (a `%` in an argparse help string once crashed it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")] if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_prints_its_help(script):
    result = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=script.parent, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.parametrize("module", ["maekit", "maekit.convert"])
def test_every_command_line_prints_its_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_segmentation_help_says_which_defaults_the_demo_replaces():
    """`--help` shows the ADE20K recipe's defaults; a run without data arguments uses the demo's: the help says so."""
    from maekit.training.segmentation_scripts import SEGMENTATION_DEMO

    script = ROOT / "examples" / "segmentation.py"
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    epilog = " ".join(result.stdout.split("\n\n")[-1].split())  # the last paragraph, unwrapped
    assert epilog.startswith("Without --dataset_name or --data_dir (the offline demo)")
    for name, value in SEGMENTATION_DEMO.items():
        value = " ".join(map(str, value)) if isinstance(value, list) else value
        assert f"--{name} {value}" in epilog
    assert max(len(line) for line in result.stdout.split("\n\n")[-1].splitlines()) <= 100
