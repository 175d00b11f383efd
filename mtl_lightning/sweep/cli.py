"""``mtl sweep``: an Optuna study over config keys, each trial an ordinary ``mtl fit`` run in its own folder.

    mtl sweep --config configs/quickstart.yaml --sweep configs/sweep/weights_pareto.yaml --trials 20
    mtl sweep --config ... --sweep ... --trials 20 --workers 4            # 4 local workers on one study
    mtl sweep --config ... --sweep ... --storage postgresql://u:p@db/mtl  # one study for workers on many machines
    mtl sweep --config ... --sweep ... --trials 8 --trainer.max_epochs 3  # other arguments go to every trial

``--dir`` (default ``runs/sweep/<sweep file name>``) holds the study (``study.journal`` unless ``--storage``),
``trials/trial_NNNN/`` (each trial's config, TensorBoard logs, checkpoints, output and ``result.json``), ``compare/NAME/``
(the sweep file's compare runs, run once), ``trials.csv``, ``pareto.csv``, ``pareto.png`` and ``summary/`` (the
figure in TensorBoard). The same command again adds ``--trials`` more trials to the same study; a folder holding a
study of another sweep (other space, objectives, fixed keys or trial arguments) is refused, naming the difference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtl_lightning.errors import ConfigError
from mtl_lightning.sweep.spec import SweepSpec, build_spec, check_keys, load_sweep_file, spec_difference
from mtl_lightning.sweep.storage import default_storage, open_storage, redact

SIGNATURE = "mtl_sweep.signature"  # study user attr: what the study was started with (the sweep file and args)
# Sections that may change between commands on one study: its name, the sampler (Optuna allows a new one for the
# trials to come) and the compare runs (drawn beside the trials, never part of them).
UNSIGNED = ("study_name", "sampler", "compare")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the sweep's own options, the arguments passed to every trial)."""
    p = argparse.ArgumentParser(
        prog="mtl sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Any other argument is passed to every trial as to `mtl fit`, e.g. --trainer.max_epochs 3.",
        allow_abbrev=False,  # `--tr` must not become --trials: trial arguments (--trainer...) pass through
    )
    p.add_argument("--config", action="append", default=[], help="the trials' config (repeat to stack)")
    p.add_argument("--sweep", type=Path, required=True, help="the sweep file, e.g. configs/sweep/weights_pareto.yaml")
    p.add_argument("--trials", type=int, default=10, help="trials this command adds to the study (default 10)")
    p.add_argument("--dir", type=Path, default=None, help="the sweep folder (default runs/sweep/<sweep name>)")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (default: DIR/study.journal)")
    p.add_argument("--study_name", default=None, help="the study's name (default: the sweep file's, else DIR's)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the trials (default 1)")
    p.add_argument("--no_compare", action="store_true", help="skip the sweep file's compare runs")
    own, rest = p.parse_known_args(list(argv))
    if own.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {own.workers} (1 runs the trials in this process's worker)")
    if own.trials < 0:
        raise ConfigError(f"--trials must be >= 0, got {own.trials} (0 only rewrites the outputs)")
    if not own.config:
        raise ConfigError("give the trials' config, e.g. --config configs/quickstart.yaml")
    return own, rest


def prepare(own: argparse.Namespace, rest: list[str]) -> tuple[SweepSpec, list[str]]:
    """The sweep file checked against the trials' config; the trials' base arguments."""
    from mtl_lightning.bench.resolve import logged_metrics, parse_config, tasks_of_config
    from mtl_lightning.sweep.space import as_args

    raw = load_sweep_file(own.sweep)
    base = [a for c in own.config for a in ("--config", c)] + rest
    fixed = dict(raw.get("fixed") or {})
    config = parse_config([*base, *as_args(fixed)], "mtl sweep", ConfigError)
    tasks = tasks_of_config(config, "mtl sweep")
    logged: dict[str, bool | None] = {"val/loss": False}
    for task in tasks.values():
        logged.update(logged_metrics(task, "val"))
    spec = build_spec(raw, list(tasks), logged)
    check_keys(config, [p.key for p in spec.params], "sweep space")
    for name, overrides in spec.compare.items():
        check_keys(config, list(overrides), f"sweep compare run {name!r}")
    # One parse with a value of every key: a type the key refuses fails now, not in every trial.
    example = {p.key: p.example() for p in spec.params}
    parse_config(
        [*base, *as_args(fixed), *as_args(example)], "sweep space (checked with an example value)", ConfigError
    )
    return spec, base


def open_study(own: argparse.Namespace, spec: SweepSpec, base: list[str], directory: Path) -> tuple[Any, str, str]:
    """(the study, its storage URL, its name): created, or continued when its signature matches this sweep's."""
    import optuna

    from mtl_lightning.sweep.runner import pruner_of, sampler_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = own.storage or default_storage(directory)
    name = own.study_name or spec.raw.get("study_name") or directory.name
    storage = open_storage(url)
    signature = json.loads(json.dumps({**spec.raw, "trial_args": base}, default=str))
    for free in UNSIGNED:
        signature.pop(free, None)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if name in existing:
        old = existing[name].user_attrs.get(SIGNATURE)
        if old is not None and old != signature:
            raise ConfigError(
                f"the study {name!r} in {redact(url)} was started by another sweep; differences: "
                f"{'; '.join(spec_difference(old, signature))}. Use another --dir (or --study_name) for this sweep"
            )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=spec.directions,  # type: ignore[arg-type]  # checked: minimize | maximize
        sampler=sampler_of(spec),
        pruner=pruner_of(spec),
        load_if_exists=True,
    )
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in spec.directions]:
        raise ConfigError(f"the study {name!r} has other objective directions; use another --dir for this sweep")
    study.set_user_attr(SIGNATURE, signature)
    return study, url, name


def run_workers(job: Any, workers: int, waiting: Any = None) -> None:
    """``workers`` workers on the study: this process alone, or spawned processes (each claims its own trials).

    ``waiting``: the first trial's process, started early (one worker only).
    """
    from mtl_lightning.sweep.runner import run_worker

    if workers == 1:
        run_worker(job, waiting)
        return
    # spawn, not fork: a forked child of a process that imported torch can deadlock in its thread pools.
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run_worker, args=(replace(job, worker=i),)) for i in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
    failed = [p.exitcode for p in processes if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} sweep worker(s) ended with an error (exit codes {failed}); see above")


def compare_runs(spec: SweepSpec, base: list[str], directory: Path) -> dict[str, dict[str, float]]:
    """The sweep file's compare runs (run once each, kept under ``compare/``): name -> objective values."""
    from mtl_lightning.sweep.runner import run_dir_args, train
    from mtl_lightning.sweep.space import as_args

    points: dict[str, dict[str, float]] = {}
    for name, overrides in spec.compare.items():
        run_dir = directory / "compare" / name
        args = [*base, *as_args(spec.fixed), *as_args(overrides), *run_dir_args(run_dir)]
        done = run_dir / "result.json"
        result = json.loads(done.read_text()) if done.is_file() else None
        ran_with = json.loads((run_dir / "trial.json").read_text())["args"] if result else None
        if result is None or result.get("state") != "complete" or ran_with != args:
            print(f"compare run {name!r} ({run_dir})", flush=True)
            result = train(args, run_dir)
        if result.get("state") != "complete":
            print(f"compare run {name!r} failed: {result.get('error')}", file=sys.stderr)
            continue
        metrics = result["metrics"]
        if all(k in metrics for o in spec.objectives for k in o.metrics):
            points[name] = {o.name: o.value(metrics) for o in spec.objectives}
    return points


def main(argv: list[str]) -> int:
    from mtl_lightning.sweep.report import write_report
    from mtl_lightning.sweep.runner import WorkerJob, start_waiting_trial, stop_waiting_trial

    own, rest = parse_args(argv)
    directory = own.dir or Path("runs") / "sweep" / own.sweep.stem
    directory.mkdir(parents=True, exist_ok=True)
    # The first trial's process imports Lightning while this one checks the sweep: seconds off the first trial.
    waiting = start_waiting_trial(directory / ".waiting.log") if own.trials and own.workers == 1 else None
    try:
        spec, base = prepare(own, rest)
        study, url, name = open_study(own, spec, base, directory)
    except BaseException:
        stop_waiting_trial(waiting)
        raise
    pruned = spec.raw.get("pruner") and spec.objectives[0].reference is None
    job = WorkerJob(
        spec=spec,
        base_args=tuple(base),
        directory=directory,
        storage=url,
        study_name=name,
        invocation=uuid.uuid4().hex,
        trials=own.trials,
        prune_monitor=spec.objectives[0].name if pruned else None,
    )
    print(f"study {name!r} in {redact(url)}: {len(study.trials)} trials so far, {own.trials} to add", flush=True)
    interrupted = False
    try:
        run_workers(job, own.workers, waiting)
    except KeyboardInterrupt:
        interrupted = True
    points = {} if own.no_compare or interrupted else compare_runs(spec, base, directory)
    pareto = write_report(study, directory, spec.objectives, points)
    print(f"{len(study.trials)} trials; {len(pareto)} on the Pareto front: {directory / 'pareto.csv'}")
    for row in pareto:
        print(
            "  trial " + str(row["number"]) + ": " + ", ".join(f"{o.name} {row[o.name]:.4g}" for o in spec.objectives)
        )
    if interrupted:
        print("interrupted: the study is saved; the same command continues it", file=sys.stderr)
        return 130
    return 0
