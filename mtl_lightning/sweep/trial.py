"""One trial's process: ``python -m mtl_lightning.sweep.trial TRIAL.json`` trains as ``mtl fit`` would.

A trial is an ordinary run in a fresh interpreter, so nothing leaks from one trial to the next, a crash fails one
trial only, and DDP inside a trial works: Lightning's launcher re-runs this same command for every rank. The file
names the run's arguments, where to write the result and, for a pruned study, the Optuna trial to report to
(optuna-integration's Lightning callback, which Optuna maintains). Rank 0 writes ``result.json``::

    {"state": "complete" | "pruned" | "failed", "metrics": {key: value}, "epochs": N, "wall_time_s": s, "error": ...}

``metrics`` are the values Lightning holds at the end of ``fit`` (``trainer.callback_metrics``): the last
validation epoch's ``val/...`` values among them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from mtl_lightning.errors import find_config_error


def _pruning_callback(spec: dict[str, Any]) -> Any:
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from mtl_lightning.sweep.runner import make_pruner
    from mtl_lightning.sweep.storage import open_storage

    # A loaded study does not keep its pruner: give it the sweep's, which decides in this process.
    storage = open_storage(spec["storage"])
    study = optuna.load_study(study_name=spec["study_name"], storage=storage, pruner=make_pruner(spec.get("pruner")))
    return PyTorchLightningPruningCallback(optuna.trial.Trial(study, spec["trial_id"]), monitor=spec["prune_monitor"])


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``spec["args"]``; the result as described in the module docstring (never raises for a bad run)."""
    start = time.perf_counter()
    trainer = None
    state, error = "complete", None
    try:
        import optuna

        from mtl_lightning.bench.resolve import build_cli

        cli = build_cli(spec["args"])
        trainer = cli.trainer
        pruning = _pruning_callback(spec) if spec.get("prune_monitor") else None
        if pruning is not None:
            callbacks: list[Any] = getattr(trainer, "callbacks")  # noqa: B009 (a property mypy cannot see)
            callbacks.append(pruning)
        try:
            trainer.fit(cli.model, datamodule=cli.datamodule)
            if pruning is not None:
                pruning.check_pruned()  # under DDP the decision is read back from the storage here
        except optuna.TrialPruned:
            state = "pruned"
    except Exception as err:  # a failed trial is recorded with its error; the study goes on
        state = "failed"
        found = find_config_error(err)
        error = str(found) if found is not None else "".join(traceback.format_exception_only(type(err), err)).strip()
        traceback.print_exc()
    metrics: dict[str, float] = {}
    if trainer is not None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return {
        "state": state,
        "metrics": metrics,
        "epochs": trainer.current_epoch if trainer is not None else 0,
        "wall_time_s": time.perf_counter() - start,
        "error": error,
    }


def _wait_for_spec() -> str | None:
    """``--wait``: import what a run needs, then read its spec's path from stdin (an empty line: nothing to run).

    The sweep starts its first trial's process this way before it checks the sweep file, so the seconds of importing
    Lightning here overlap with the sweep's own. The run's output goes to ``output.log`` beside the spec, and
    ``sys.argv`` becomes the plain form, which Lightning's DDP launcher re-runs for the other ranks.
    """
    import mtl_lightning.bench.resolve  # noqa: F401 - Lightning, the CLI and the core: the imports worth doing early

    line = sys.stdin.readline().strip()
    if not line:
        return None
    log = os.open(Path(line).parent / "output.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.argv[1:] = [line]
    return line


def main(argv: list[str]) -> int:
    from mtl_lightning.allocator import keep_freed_memory

    keep_freed_memory()  # as `mtl fit` does
    if argv and argv[0] == "--wait":
        path = _wait_for_spec()
        if path is None:
            return 0
        argv = [path]
    spec = json.loads(Path(argv[0]).read_text())
    result = run_trial(spec)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    # Lightning sets `rank` on the rank_zero_only function; under DDP every rank runs this and one writes.
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        out = Path(spec["result"])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)  # the parent never reads half a file
    return 0 if result["state"] != "failed" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
