"""Shared helpers: run the ``mtl`` CLI in-process from the repository root, with outputs in a temp folder; a world
of one process for the distributed strategies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

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


# A launcher's or an outer run's variables, which would make a subprocess join (or wait for) a process group.
_DIST_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def subprocess_env() -> dict[str, str]:
    """The environment of a CLI subprocess: no inherited ranks or Lightning seeds, ``tests/`` importable (for
    ``mp_callbacks``), one thread per process (two ranks on two cores), gloo on loopback."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def mp_callback(name: str, **init_args: object) -> list[str]:
    """``--trainer.callbacks+`` of the ``tests/mp_callbacks.py`` callback ``name`` with its init args."""
    return ["--trainer.callbacks+", json.dumps({"class_path": f"mp_callbacks.{name}", "init_args": init_args})]


def without_trainer(model: object) -> object:
    """``model`` (a MultiTaskModule) made to run ``training_step`` with no Trainer: one process, and "this step is
    not logged" (what Lightning says on 49 of 50 steps by default)."""
    from types import SimpleNamespace

    model.trainer = SimpleNamespace(  # type: ignore[attr-defined]
        world_size=1,
        global_step=0,
        fast_dev_run=False,
        is_last_batch=False,
        _logger_connector=SimpleNamespace(should_update_logs=False),
    )
    model._log_every_train_step = False  # type: ignore[attr-defined]
    return model


def build_cli(*args: str) -> MTLCLI:
    """``mtl`` with the quickstart and ``args``, instantiated (model, data, trainer) but not run."""
    from lightning.pytorch import LightningDataModule, LightningModule

    return MTLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(QUICKSTART), *args, "--trainer.logger", "false"],
    )


def mtl_subprocess(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m mtl_lightning <args>`` in a child process from the repository root (multi-process runs, kills)."""
    return subprocess.run(
        [sys.executable, "-m", "mtl_lightning", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(args: list[str], root: Path) -> MTLCLI:
    """``mtl <args>`` in-process, writing logs, configs and checkpoints under ``root``."""
    return main([*args, "--trainer.default_root_dir", str(root)])


def fit_quickstart(root: Path, *extra: str) -> Path:
    """A 4-step quickstart run (``extra``: its other arguments) under ``root``; the path of its last checkpoint."""
    args = ["fit", "--config", str(QUICKSTART), *extra, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root / "runs")]
    cli = run_cli(args, root)
    return Path(cli.trainer.checkpoint_callback.last_model_path)  # type: ignore[union-attr]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Config files name data paths relative to the repository root, where users run `mtl`.
    monkeypatch.chdir(REPO)
    torch.set_num_threads(2)


@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch):
    """A world of one gloo process in this process (on a free port), destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    before = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, value in before.items():  # Lightning exports the rank variables; later tests must not see them
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
