"""Run trials: a worker claims one, samples its config, trains it in a fresh process and tells the study the result.

Several workers (``--workers N``, or several ``mtl sweep`` commands on one storage) share one study. Within one
command the workers claim trials under a file lock and count the trials the command has started, so ``--trials N``
runs exactly N trials however many workers share them: none is lost or run twice. Every trial starts with
``ask`` and ends with ``tell`` (complete, pruned or failed, with its error), also when the worker is interrupted,
so the study stays resumable.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from mtl_lightning.compat import optuna_trial_id
from mtl_lightning.sweep.space import as_args
from mtl_lightning.sweep.spec import SweepSpec

INVOCATION = "mtl_sweep.invocation"  # user attr: the command that started a trial
VALUES = "mtl_sweep.values"  # user attr: the config values a trial ran with (weights as {task: w})
ERROR = "mtl_sweep.error"
DIR = "mtl_sweep.dir"
METRICS = "mtl_sweep.metrics"
ERROR_LINES = 12  # of a failed trial's output kept in the study when its result has no error message


@dataclass(frozen=True)
class WorkerJob:
    """What one worker needs: picklable, so ``--workers`` can hand it to spawned processes."""

    spec: SweepSpec
    base_args: tuple[str, ...]
    directory: Path
    storage: str
    study_name: str
    invocation: str
    trials: int
    worker: int = 0
    prune_monitor: str | None = None
    quiet: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)


def run_dir_args(run_dir: Path) -> list[str]:
    """Arguments that put a run's TensorBoard logs, saved config and checkpoints in ``run_dir``."""
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir.parent), "name": "", "version": run_dir.name},
    }
    return [f"--trainer.logger={json.dumps(logger)}", "--trainer.default_root_dir", str(run_dir)]


def run_args(job: WorkerJob, values: dict[str, Any], run_dir: Path) -> list[str]:
    """The ``mtl fit`` arguments of one run: the command's, the sweep's fixed keys, the run's values, its folder."""
    return [*job.base_args, *as_args(job.spec.fixed), *as_args(values), *run_dir_args(run_dir)]


def start_waiting_trial(log: Path) -> subprocess.Popen[str]:
    """A trial process that imports what a run needs now and runs the spec it is given later (``--wait``)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mtl_lightning.sweep.trial", "--wait"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def stop_waiting_trial(process: subprocess.Popen[str] | None) -> None:
    """Tell a waiting trial process that nothing is coming (it exits at once)."""
    if process is not None and process.poll() is None and process.stdin is not None:
        with contextlib.suppress(OSError):  # it has died already
            process.stdin.close()
        _wait_or_kill(process)


def _wait_or_kill(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def train(
    args: Sequence[str],
    run_dir: Path,
    study: dict[str, Any] | None = None,
    waiting: subprocess.Popen[str] | None = None,
) -> dict[str, Any]:
    """Train one run in a fresh process (:mod:`mtl_lightning.sweep.trial`); its result dict.

    The run's output goes to ``run_dir/output.log``. ``study`` names the Optuna trial a pruned study reports to;
    ``waiting``: a process from :func:`start_waiting_trial` to run it in (else a new one).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    spec = {"args": list(args), "result": str(result_path), **(study or {})}
    (run_dir / "trial.json").write_text(json.dumps(spec, indent=1))
    log = run_dir / "output.log"
    process: subprocess.Popen[Any] | None = None
    if waiting is not None and waiting.poll() is None and waiting.stdin is not None:
        try:
            waiting.stdin.write(f"{run_dir / 'trial.json'}\n")
            waiting.stdin.close()
            process = waiting
        except OSError:  # it died while importing: run the trial in a new process
            _wait_or_kill(waiting)
    if process is None:
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mtl_lightning.sweep.trial", str(run_dir / "trial.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    try:
        code = process.wait()
    except BaseException:  # Ctrl-C or a stop: the trial's process must not outlive its worker
        process.terminate()
        _wait_or_kill(process)
        raise
    if result_path.is_file():
        return dict(json.loads(result_path.read_text()))
    output = log.read_text(errors="replace") if log.is_file() else ""  # a waiting process opens it itself
    tail = output.strip().splitlines()[-ERROR_LINES:]
    return {
        "state": "failed",
        "metrics": {},
        "error": f"the trial's process ended with exit code {code}: " + " | ".join(tail),
    }


def _make(section: dict[str, Any] | None, default: Callable[[], Any], seed_offset: int = 0) -> Any:
    """An Optuna sampler or pruner from ``{class_path, init_args}``; a worker's sampler seed is offset by its index."""
    if not section:
        return default()
    from mtl_lightning._imports import import_from_path

    cls = import_from_path(str(section["class_path"]), "sweep sampler/pruner class_path")
    init = dict(section.get("init_args") or {})
    if seed_offset and init.get("seed") is not None:
        init["seed"] = int(init["seed"]) + seed_offset  # two workers with one seed would draw the same configs
    return cls(**init)


def sampler_of(spec: SweepSpec, worker: int = 0) -> Any:
    import optuna

    return _make(spec.raw.get("sampler"), optuna.samplers.TPESampler, worker)


def pruner_of(spec: SweepSpec) -> Any:
    return make_pruner(spec.raw.get("pruner"))


def make_pruner(section: dict[str, Any] | None) -> Any:
    """The sweep file's pruner (none: Optuna's NopPruner, not its default MedianPruner, which would prune)."""
    import optuna

    return _make(section, optuna.pruners.NopPruner)


def _claim(study: Any, job: WorkerJob) -> Any | None:
    """A new trial of this command, or None once it has started ``job.trials`` (counted under the sweep's lock)."""
    with FileLock(str(job.directory / ".claim.lock")):
        started = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get(INVOCATION) == job.invocation)
        if started >= job.trials:
            return None
        trial = study.ask()
        trial.set_user_attr(INVOCATION, job.invocation)
        return trial


class SpaceExhausted(Exception):
    """The sampler has no configuration left (a grid or brute-force search is done): the worker stops."""


def _finish(study: Any, trial: Any, values: Sequence[float] | None = None, state: Any = None) -> None:
    """``study.tell``. A sampler that has run out of configurations calls ``study.stop()`` from ``tell``, which Optuna
    allows inside ``optimize`` only: the trial is stored by then, and the worker stops (:class:`SpaceExhausted`)."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
        raise SpaceExhausted from None


def _tell(study: Any, trial: Any, job: WorkerJob, result: dict[str, Any]) -> str:
    """Record ``result`` in the study; a one-line summary."""
    from optuna.trial import TrialState

    metrics = result.get("metrics") or {}
    trial.set_user_attr(METRICS, {k: v for k, v in metrics.items() if k.startswith("val/")})
    for key in ("wall_time_s", "epochs"):
        if key in result:
            trial.set_user_attr(f"mtl_sweep.{key}", result[key])
    if result["state"] == "pruned":
        _finish(study, trial, state=TrialState.PRUNED)
        return f"pruned after epoch {result.get('epochs')}"
    error = result.get("error")
    if result["state"] == "complete":
        missing = [k for o in job.spec.objectives for k in o.metrics if k not in metrics]
        if missing:
            error = f"the run logged no {missing} (it logged {sorted(metrics)}); did validation run?"
        else:
            values = [o.value(metrics) for o in job.spec.objectives]
            if all(math.isfinite(v) for v in values):
                _finish(study, trial, values)
                return ", ".join(f"{o.name} {v:.4g}" for o, v in zip(job.spec.objectives, values, strict=True))
            error = f"an objective is not finite: {values}"
    trial.set_user_attr(ERROR, str(error))
    _finish(study, trial, state=TrialState.FAIL)
    return f"failed: {error}"


def run_worker(job: WorkerJob, waiting: subprocess.Popen[str] | None = None) -> int:
    """Claim and run trials until the command's ``job.trials`` have started; the number this worker ran.

    ``waiting``: a trial process already importing (:func:`start_waiting_trial`) for the first trial.
    """
    import optuna

    from mtl_lightning.sweep.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed here instead
    study = optuna.load_study(
        study_name=job.study_name,
        storage=open_storage(job.storage),
        sampler=sampler_of(job.spec, job.worker),
        pruner=pruner_of(job.spec),
    )
    try:
        return _run_trials(study, job, waiting)
    finally:
        stop_waiting_trial(waiting)  # no trial claimed, or an error before it ran


def _run_trials(study: Any, job: WorkerJob, waiting: subprocess.Popen[str] | None) -> int:
    import optuna

    ran = 0
    while (trial := _claim(study, job)) is not None:
        start = time.perf_counter()
        # Not a bare number: the logger would read "0007" as version 7 and write version_7/.
        run_dir = job.directory / "trials" / f"trial_{trial.number:04d}"
        try:
            values = {p.key: p.sample(trial) for p in job.spec.params}
            trial.set_user_attr(VALUES, values)
            trial.set_user_attr(DIR, str(run_dir))
            pruning = None
            if job.prune_monitor:
                pruning = {
                    "storage": job.storage,
                    "study_name": job.study_name,
                    "trial_id": optuna_trial_id(trial),
                    "prune_monitor": job.prune_monitor,
                    "pruner": job.spec.raw.get("pruner"),  # the trial's process decides, with this pruner
                }
            result = train(run_args(job, values, run_dir), run_dir, pruning, waiting)
            waiting = None
        except BaseException:
            trial.set_user_attr(ERROR, "interrupted")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        exhausted = False
        try:
            summary = _tell(study, trial, job, result)
        except SpaceExhausted:
            summary, exhausted = f"{result['state']}; the sampler has no configuration left", True
        ran += 1
        if not job.quiet:
            print(f"trial {trial.number}: {summary} ({time.perf_counter() - start:.1f} s, {run_dir})", flush=True)
        if exhausted:
            break
    return ran
