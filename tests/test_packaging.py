"""Packaging metadata: the build requirements cover what pyproject.toml's metadata needs."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_build_requirement_supports_the_license_expression():
    """`license = "Apache-2.0"` (a PEP 639 SPDX string) needs setuptools >= 77; older ones stop with a schema error
    ("`project.license` must be valid exactly by one definition"), e.g. under `pip install --no-build-isolation`."""
    pyproject = tomllib.loads(PYPROJECT.read_text())
    assert isinstance(pyproject["project"]["license"], str)
    requirements = [Requirement(r) for r in pyproject["build-system"]["requires"]]
    (setuptools,) = [r for r in requirements if r.name == "setuptools"]
    assert not setuptools.specifier.contains("76.99"), setuptools
    assert setuptools.specifier.contains("77.0.0")
    lower_bounds = [Version(s.version) for s in setuptools.specifier if s.operator in (">=", ">", "==", "~=")]
    assert lower_bounds and min(lower_bounds) >= Version("77")
    # PEP 639: with a license expression, no "License ::" classifiers.
    assert not [c for c in pyproject["project"].get("classifiers", []) if c.startswith("License ::")]
