"""Run the Python code blocks of README.md, docs/*.md and every maekit docstring, so the documentation cannot rot.

Blocks of one Markdown file run in order in one namespace, inside a temporary working directory. Each docstring block
runs alone, in a fresh namespace, inside a temporary working directory. A block opened with ```python no-run is shown
to readers but not executed (Hub downloads, GPU-only commands, undefined placeholders).

Docstring blocks are collected by walking the maekit package: the docstrings of every module and of every class,
function, method and property defined in it (re-exports are collected once, where they are defined), so blocks that
other modules add later are picked up without editing this file.
"""

import importlib
import importlib.util
import inspect
import logging
import os
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import maekit

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
# In docstrings the fence may be indented (inside an "Example:" section): the closing fence has the same indent.
INDENTED_BLOCK = re.compile(r"^([ \t]*)```python([^\n]*)\n(.*?)^\1```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return [code for flags, code in BLOCK.findall(path.read_text()) if "no-run" not in flags]


def docstring_blocks(doc: str | None) -> list[str]:
    if not doc:
        return []
    doc = inspect.cleandoc(doc)
    return [textwrap.dedent(code) for _, flags, code in INDENTED_BLOCK.findall(doc) if "no-run" not in flags]


def maekit_modules() -> list[str]:
    return ["maekit"] + sorted(
        info.name for info in pkgutil.walk_packages(maekit.__path__, "maekit.") if info.name != "maekit.__main__"
    )


def _documented(module) -> list[tuple[str, str | None]]:
    """(qualified name, docstring) of the module and of everything defined in it (not imported into it)."""
    found = [(module.__name__, module.__doc__)]
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__ or not (
            inspect.isclass(obj) or inspect.isfunction(obj)
        ):
            continue
        found.append((f"{module.__name__}.{name}", obj.__doc__))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(member):
                    found.append((f"{module.__name__}.{name}.{attr}", member.__doc__))
    return found


def collect_docstring_blocks() -> list[tuple[str, str]]:
    """`(id, code)` for every runnable ```python block in a maekit docstring."""
    blocks = []
    for module_name in maekit_modules():
        for qualname, doc in _documented(importlib.import_module(module_name)):
            blocks += [(f"{qualname}[{i}]", code) for i, code in enumerate(docstring_blocks(doc))]
    return blocks


DOCSTRING_BLOCKS = collect_docstring_blocks()


def test_docs_exist_and_have_examples():
    assert (ROOT / "docs" / "model.md").exists() and (ROOT / "docs" / "index.md").exists()
    assert python_blocks(ROOT / "README.md"), "README.md must show a runnable Python example"


def test_docstring_collector_finds_blocks_where_they_are_defined():
    ids = {block_id for block_id, _ in DOCSTRING_BLOCKS}
    # A class docstring, a function docstring, a module of the training sub-package and a new module.
    assert {"maekit.modeling_mae.MAEModel[0]", "maekit.evaluation.knn_classify[0]"} <= ids
    assert any(block_id.startswith("maekit.training.") for block_id in ids)
    assert "maekit.features.extract_features_to_file[0]" in ids
    assert len(ids) == len(DOCSTRING_BLOCKS), "a docstring was collected twice"
    assert not any(block_id.startswith("maekit.MAE") for block_id in ids), "re-exports must not be collected again"


def test_docstring_blocks_may_be_indented():
    doc = """Summary.

    Example:

        ```python
        value = 1
        assert value == 1
        ```

        ```python no-run
        download()
        ```
    """
    assert docstring_blocks(doc) == ["value = 1\nassert value == 1\n"]


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


@pytest.mark.parametrize("block_id, code", DOCSTRING_BLOCKS, ids=[block_id for block_id, _ in DOCSTRING_BLOCKS])
def test_docstring_blocks_run(block_id, code, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, block_id, "exec"), {"__name__": "__docstring__"})
    except Exception as error:
        raise AssertionError(f"{block_id} failed: {error!r}\n{code}") from error
    finally:
        os.chdir(cwd)


def test_site_hooks_generate_the_api_and_cli_references():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("maekit_docs_hooks", ROOT / "docs" / "_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    modules = hooks.api_modules()
    assert modules[0] == "maekit" and "maekit.__main__" not in modules
    # Every module with public names gets a page, the ones added later included.
    expected = {name for name in maekit_modules() if getattr(importlib.import_module(name), "__all__", None)}
    assert set(modules) == expected and {"maekit.data", "maekit.training", "maekit.features"} <= expected
    assert hooks.api_page("maekit.data") == "::: maekit.data\n"
    page = hooks.on_page_markdown(f"# CLI\n\n{hooks.CLI_MARKER}\n", None, None, None)
    assert "usage: maekit extract-features" in page and hooks.CLI_MARKER not in page
    assert (ROOT / "docs" / "cli.md").read_text().count(hooks.CLI_MARKER) == 1


def test_site_navigation_lists_every_page():
    # mkdocs.yml also makes an omitted page a warning (validation.nav.omitted_files), which `--strict` turns into an
    # error; this finds it without building the site.
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        items = nav.values() if isinstance(nav, dict) else nav
        return [page for item in items for page in pages(item)]

    listed = pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice"
    assert set(listed) == {path.name for path in (ROOT / "docs").glob("*.md")}


def test_docstrings_parse_without_warnings(caplog):
    # What the site's API reference (mkdocstrings, griffe's Google parser, mkdocs.yml's options) warns about, e.g. a
    # "Raises:" line that is not `ExceptionType: description`; `mkdocs build --strict` fails on any of them.
    griffe = pytest.importorskip("griffe")
    options = {"ignore_init_summary": True, "warn_unknown_params": False, "warn_missing_types": False}

    def parse(obj) -> None:
        if obj.docstring is not None:
            obj.docstring.parse("google", **options)
        for member in obj.members.values():
            if not member.is_alias:
                parse(member)

    with caplog.at_level(logging.WARNING, logger="griffe"):
        parse(griffe.load("maekit", search_paths=[str(ROOT)], resolve_aliases=False))
    assert [record.getMessage() for record in caplog.records] == []
