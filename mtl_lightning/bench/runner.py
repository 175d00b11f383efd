"""One benchmark run: ``mtl fit`` with the run's arguments, then ``test`` on the best validation checkpoint.

The checkpoint tested is the one the config's (first) ``ModelCheckpoint`` rates best on its ``monitor`` (the
quickstart's: lowest ``val/loss``), as papers such as MMoE report test metrics at the best validation epoch. Without
a monitor it is the last checkpoint saved; without checkpointing, the weights at the end of training. The CSV
records which (``checkpoint`` column).

Runs go in-process by default (:func:`run_in_process`; every run re-seeds everything through ``--seed_everything``).
``isolate`` runs each in a fresh Python process (:func:`run_in_subprocess`: about 5 s of imports more per run, and
nothing can leak from one run to the next: CUDA memory, global flags set by a callback, threads).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from mtl_lightning import trackers
from mtl_lightning.bench.resolve import build_cli


@dataclass(frozen=True)
class RunResult:
    """The test metrics of one run (every ``test/...`` value logged), its wall time and the checkpoint tested."""

    metrics: dict[str, float]
    wall_time_s: float
    checkpoint: str


class RunFailed(RuntimeError):
    """A run in a subprocess ended with an error (its output says why)."""


def _checkpoint_to_test(trainer: Trainer) -> tuple[str | None, str]:
    """(path for ``trainer.test``, what it is), as described in the module docstring."""
    # Lightning's Checkpoint base class declares no paths; ModelCheckpoint has them. getattr on None gives "".
    callback = trainer.checkpoint_callback
    best: str = getattr(callback, "best_model_path", "")
    if best:
        monitor = getattr(callback, "monitor", None)
        return best, f"best {monitor}" if monitor else "last"
    last: str = getattr(callback, "last_model_path", "")
    if last:
        return last, "last"
    return None, "final"


def run_in_process(args: Sequence[str]) -> RunResult:
    """Train as ``mtl fit <args>`` does, in this process, then test the chosen checkpoint.

    ``wall_time_s`` is the time of ``fit`` and ``test`` together; the parsing of the config and the building of the
    model and data module before them (seconds of jsonargparse, the same for every run) are left out.
    """
    cli = build_cli(args)
    trainer = cli.trainer
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    path, which = _checkpoint_to_test(trainer)
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=path, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    result = RunResult(metrics=metrics, wall_time_s=time.perf_counter() - start, checkpoint=which)
    trackers.end_runs(trainer)  # a W&B run ends with its bench run, not at the end of the process
    del cli, trainer
    gc.collect()
    if torch.cuda.is_available():  # the next run starts with the memory this one held
        torch.cuda.empty_cache()
    return result


def run_in_subprocess(args: Sequence[str]) -> RunResult:
    """:func:`run_in_process` in a fresh interpreter; its output streams to this process's stdout/stderr."""
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        out = Path(tmp) / "result.json"
        code = subprocess.call([sys.executable, "-m", "mtl_lightning.bench.runner", str(out), *args])
        if code != 0 or not out.is_file():
            raise RunFailed(f"the run's process ended with exit code {code} (its output is above)")
        return RunResult(**json.loads(out.read_text()))


def _worker(argv: list[str]) -> None:
    """``python -m mtl_lightning.bench.runner RESULT.json ARGS...``: one run, its result written as JSON."""
    result = run_in_process(argv[1:])
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    # Lightning sets `rank` on the rank_zero_only function at import; its type does not declare it.
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # under DDP every rank runs this; one writes
        Path(argv[0]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    _worker(sys.argv[1:])
