"""The distribution as a user installs it: one version, a licence, type information (issue 14)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import torch_port

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refimpl", "softmax_common", "torch_port")


def test_version_is_the_distributions():
    """pyproject.toml reads the version from torch_port.__version__; the installed metadata agrees."""
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", torch_port.__version__)
    assert importlib.metadata.version("softmax-variants") == torch_port.__version__
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torch_port.__version__"}


def test_changelog_names_the_version():
    assert f"## {torch_port.__version__}" in (REPO / "CHANGELOG.md").read_text()


def test_license_file_matches_the_metadata():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_every_package_is_marked_typed():
    for package in PACKAGES:
        assert (REPO / package / "py.typed").is_file(), package
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["*"]


def test_readme_has_no_relative_image():
    """The README is the package's description on an index, where relative images do not resolve."""
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme):
        assert re.match(r"https?://", target), f"relative image in the README: {target}"
