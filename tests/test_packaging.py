"""pyproject.toml's requirements: extras spelt as their packages publish them, and the tested ranges installed."""

from __future__ import annotations

import importlib.metadata

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
requirements = pytest.importorskip("packaging.requirements")


def project_requirements() -> list:
    """Every requirement of the project: its dependencies and each optional group's."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for group in project["optional-dependencies"].values() for s in group)]
    return [requirements.Requirement(spec) for spec in specs]


def test_torchjd_extras_are_the_ones_torchjd_publishes() -> None:
    # pip 23 (a fresh Python 3.11 venv's) compares extras as written: `quadprog_projector` is not TorchJD's
    # `quadprog-projector`, so it warns "does not provide the extra" and installs no solver.
    published = set(importlib.metadata.metadata("torchjd").get_all("Provides-Extra") or [])
    wanted = {extra for req in project_requirements() if req.name == "torchjd" for extra in req.extras}
    assert wanted, "pyproject.toml asks for no TorchJD extra: the solvers extra is gone?"
    unknown = sorted(wanted - published)
    assert not unknown, f"torchjd does not publish the extras {unknown}; it publishes {sorted(published)}"


@pytest.mark.parametrize("name", ["lightning", "torchjd", "transformers"])
def test_bounded_dependencies_are_installed_in_their_tested_range(name: str) -> None:
    (req,) = [r for r in project_requirements() if r.name == name and not r.extras]
    assert any(s.operator == "<" for s in req.specifier), f"{name} has no upper bound in pyproject.toml"
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {req.specifier}"
