"""Every notebook under notebooks/ runs top to bottom in a fresh kernel, and is stored without outputs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from jupyter_client import KernelManager

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a notebook's training cell takes seconds, so this only catches a hang
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel", "matplotlib") if importlib.util.find_spec(m) is None]
ANSI_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks; pytest shows them as text
needs_jupyter = pytest.mark.skipif(
    bool(MISSING), reason=f'{", ".join(MISSING)} not installed: pip install -e ".[notebooks]"'
)


def _kernel_manager(tmp_path: Path, env: dict[str, str]) -> KernelManager:
    """A kernel of this interpreter (the venv's python3), whatever other kernels Jupyter knows about."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    # The kernel spec pins sys.executable; a user-wide "python3" spec could point at another Python.
    write_kernel_spec(tmp_path / "kernels" / "python3", overrides={"env": env})
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.integration  # a fresh Jupyter kernel per notebook
@needs_jupyter
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    # Agg: no window, no display needed; the notebooks write their runs under tmp_path instead of runs/notebooks.
    env = {"MPLBACKEND": "Agg", "MTL_NOTEBOOK_RUNS": str(tmp_path / "runs")}
    client = NotebookClient(
        notebook,
        km=_kernel_manager(tmp_path, env),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(path.parent)}},  # cwd = notebooks/, as in `jupyter lab`
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        # The message holds the failing cell's source and its traceback; drop nbclient's own frames.
        pytest.fail(f"{path.name} failed:\n{ANSI_COLOURS.sub('', str(err))}", pytrace=False)
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    ran = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    assert ran and all(c.execution_count is not None for c in ran), f"{path.name}: not every code cell ran"


def test_there_are_notebooks() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_analyse_runs.ipynb"} <= names, f"notebooks/ holds {sorted(names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    """Outputs in git bloat diffs and leak local paths: the notebooks are committed clean."""
    notebook = json.loads(path.read_text(encoding="utf-8"))  # plain JSON: runs without the notebook extra
    dirty = [
        f"cell {i}"
        for i, cell in enumerate(notebook["cells"])
        if (cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None))
        or "execution" in cell.get("metadata", {})  # per-cell timings that Jupyter records on request
    ]
    if "widgets" in notebook.get("metadata", {}):
        dirty.append("notebook metadata 'widgets'")
    assert not dirty, (
        f"{path.name} has outputs, execution counts or timings in {', '.join(dirty)}: clear them before committing "
        "(Jupyter: Edit > Clear Outputs of All Cells, then save; or "
        f"`jupyter nbconvert --clear-output --inplace notebooks/{path.name}`)"
    )
