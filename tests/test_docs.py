"""Run the Python code blocks of README.md and docs/*.md, so the documentation cannot rot.

Blocks of one file run in order in one namespace, inside a temporary working directory. A block opened with
```python no-run is shown to readers but not executed (Hub downloads, GPU-only commands).
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return [code for flags, code in BLOCK.findall(path.read_text()) if "no-run" not in flags]


def test_docs_exist_and_have_examples():
    assert (ROOT / "docs" / "model.md").exists() and (ROOT / "docs" / "index.md").exists()
    assert python_blocks(ROOT / "README.md"), "README.md must show a runnable Python example"


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(path, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    try:
        for index, code in enumerate(python_blocks(path)):
            try:
                exec(compile(code, f"{path.name}[block {index}]", "exec"), namespace)
            except Exception as error:  # show which block failed
                raise AssertionError(f"{path.name} block {index} failed: {error!r}\n{code}") from error
    finally:
        os.chdir(cwd)
