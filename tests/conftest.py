"""Shared helpers: run the ``mtl`` CLI in-process from the repository root, with outputs in a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_lightning.cli import MTLCLI, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
# Small, fast variant of the quickstart data used by the CLI tests.
SMALL_DATA = ["--data.init_args.num_samples", "1500", "--data.init_args.batch_size", "128"]
# No checkpoints, callbacks or progress bar: for runs whose model or metrics are inspected in-process.
QUIET_TRAINER = [
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.callbacks",
    "[]",
    "--trainer.enable_progress_bar",
    "false",
]


def run_cli(args: list[str], root: Path) -> MTLCLI:
    """``mtl <args>`` in-process, writing logs, configs and checkpoints under ``root``."""
    return main([*args, "--trainer.default_root_dir", str(root)])


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Config files name data paths relative to the repository root, where users run `mtl`.
    monkeypatch.chdir(REPO)
    torch.set_num_threads(2)
