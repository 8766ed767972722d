"""`--help` works for every script and command line (a `%` in an argparse help string once crashed it)."""

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
