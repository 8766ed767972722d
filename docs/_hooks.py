"""MkDocs hooks: generate the API reference pages and the CLI reference at build time (see mkdocs.yml).

- One page `api/<module>.md` per maekit module that declares `__all__` (found by walking the package, so a module
  added later gets its page without editing anything), rendered by mkdocstrings from the docstrings, and an
  "API reference" section in the navigation.
- `<!-- maekit-cli-reference -->` in a page is replaced by `maekit.cli.reference_markdown()`: the `--help` of every
  command, taken from the argparse parsers.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from mkdocs.structure.files import File

CLI_MARKER = "<!-- maekit-cli-reference -->"


def api_modules() -> list[str]:
    """`maekit` and every submodule with an `__all__`, in package order."""
    import maekit

    names = ["maekit"]
    for info in pkgutil.walk_packages(maekit.__path__, prefix="maekit."):
        if info.name == "maekit.__main__":
            continue
        if getattr(importlib.import_module(info.name), "__all__", None):
            names.append(info.name)
    return names


def api_page(module: str) -> str:
    return f"::: {module}\n"  # the module's name is the page title (mkdocstrings' root heading)


def on_config(config):
    config.nav.append({"API reference": [{module: f"api/{module}.md"} for module in api_modules()]})
    return config


def on_files(files, config):
    for module in api_modules():
        files.append(File.generated(config, f"api/{module}.md", content=api_page(module)))
    return files


# House-style docstrings write types as "name (`list[str]`, *optional*): ..."; griffe shows that text verbatim in
# the parameter tables' Type column, backticks and asterisks included.
_TYPE_CELL = re.compile(r"<code>([^<]*`[^<]*)</code>")


def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("api/"):
        return html
    return _TYPE_CELL.sub(
        lambda m: "<code>" + m.group(1).replace("`", "").replace("*optional*", "optional") + "</code>", html
    )


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER in markdown:
        from maekit.cli import reference_markdown

        markdown = markdown.replace(CLI_MARKER, reference_markdown())
    return markdown
