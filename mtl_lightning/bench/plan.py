"""From a suite to the runs: the arguments of every job, checked against what its config logs, times the seeds."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl_lightning.bench.resolve import Primary, logged_test_metrics, primary_metric, resolve_tasks
from mtl_lightning.bench.suite import SINGLE_TASK, Suite, SuiteError, TaskChoice

# Right after the configs, so a suite's own arguments can turn them back on: a benchmark prints one line per run
# rather than a progress bar and a model summary per run.
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


@dataclass(frozen=True)
class Job:
    """One configuration of ``mtl fit`` (then ``test``), run once per seed.

    ``run`` keys it in the CSV and names its folder: the variant's name, or ``single_task/<task>`` for a baseline.
    ``tasks`` are the tasks whose test metrics it contributes (a baseline: its own task only).
    """

    run: str
    variant: str
    tasks: tuple[str, ...]
    args: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """A job at one seed, with its own output folder ``<out>/runs/<run>/seed_<seed>``.

    ``logger`` is a logger config (``configs/logger/*.yaml``, read by ``mtl-bench --logger``); None: TensorBoard.
    """

    job: Job
    seed: int
    out: Path = field(compare=False)
    logger: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.job.run / f"seed_{self.seed}"

    @property
    def args(self) -> list[str]:
        """The full ``mtl fit`` arguments: the job's, then the seed and this run's own log folder (last: they win)."""
        logger = run_logger(self)
        return [
            *self.job.args,
            "--seed_everything",
            str(self.seed),
            f"--trainer.logger={json.dumps(logger)}",
            "--trainer.default_root_dir",
            str(self.run_dir),
        ]


@dataclass(frozen=True)
class Plan:
    """The jobs of a suite (baselines first) and the primary metric of each of its tasks."""

    jobs: list[Job]
    primaries: dict[str, Primary]

    def runs(
        self,
        seeds: Sequence[int],
        out: Path,
        only: Sequence[str] | None = None,
        logger: Mapping[str, Any] | None = None,
    ) -> list[RunSpec]:
        """Every (job, seed), seed-major so an interrupted benchmark has whole seeds done; ``only``: variant names."""
        jobs = [j for j in self.jobs if not only or j.variant in only]
        return [RunSpec(job, seed, out, logger) for seed in seeds for job in jobs]


def run_logger(spec: RunSpec) -> dict[str, Any]:
    """The logger config of one run: ``spec.logger`` (TensorBoard when None) named after the run and its seed.

    TensorBoard and CSV: ``<out>/runs/<run>/seed_<seed>``. MLflow: one experiment per suite (``<out>``'s name) in
    the store ``<out>/mlflow`` unless the config names a tracking URI, one run per (run, seed), tagged. W&B: one
    project per suite, ``<out>/wandb``, runs grouped by the bench run. Another logger: its config as given.
    """
    preset = spec.logger or {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}
    class_path = str(preset["class_path"])
    args = dict(preset.get("init_args") or {})
    run, seed = spec.job.run, f"seed_{spec.seed}"
    kind = class_path.rsplit(".", 1)[-1]
    if kind in ("TensorBoardLogger", "CSVLogger"):
        args.update(save_dir=str(spec.out / "runs"), name=run, version=seed)
    elif kind == "MLFlowLogger":
        if not args.get("tracking_uri"):
            args["save_dir"] = str(spec.out / "mlflow")
        tags = {"mtl_bench.run": run, "mtl_bench.variant": spec.job.variant, "mtl_bench.seed": str(spec.seed)}
        args.update(experiment_name=spec.out.name, run_name=f"{run}/{seed}", tags=tags)
    elif kind == "WandbLogger":
        args.update(save_dir=str(spec.out / "wandb"), project=spec.out.name, name=f"{run}/{seed}", group=run)
    return {"class_path": class_path, "init_args": args}


def restrict_args(mode: str, task: str, specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Arguments that make a run train ``task`` alone (the modes are described in :mod:`mtl_lightning.bench.suite`)."""
    if mode == "data":
        return [f"--data.init_args.tasks={json.dumps([dict(specs[task])])}"]
    others = [t for t in specs if t != task]
    if mode == "none" or not others:
        return []
    schedule = {"class_path": "mtl_lightning.callbacks.TaskSchedule", "init_args": {"stop": dict.fromkeys(others, 0)}}
    return [f"--trainer.callbacks+={json.dumps(schedule)}"]


def _config_args(configs: Sequence[str]) -> list[str]:
    return [a for c in configs for a in ("--config", c)]


Resolver = Callable[[Sequence[str], str], dict[str, dict[str, Any]]]


def make_plan(suite: Suite, extra: Sequence[str] = (), resolve: Resolver = resolve_tasks) -> Plan:
    """Build and check every job: each parses, declares the suite's tasks and logs their primary metrics.

    ``extra`` arguments go last in every job (the command line's ``-- ARGS``). The suite's tasks default to every
    task of the base config; a baseline's task specs come from its config parsed without the restriction.
    """
    base_tasks = resolve([*_config_args(suite.config), *QUIET, *suite.args, *extra], f"suite {suite.name!r}")
    tasks = list(suite.tasks) if suite.tasks is not None else list(base_tasks)
    unknown = [t for t in tasks if t not in base_tasks]
    if unknown:
        raise SuiteError(
            f"suite {suite.name!r}: task(s) {unknown} are not declared by its config; its tasks are {list(base_tasks)}"
        )
    _check_baselines(suite, tasks)
    jobs: list[Job] = []
    primaries: dict[str, Primary] = {}
    for task in tasks:
        configs, before, after = suite.baseline(task)
        head = [*_config_args(configs), *QUIET, *before]
        where = f"suite {suite.name!r}, {SINGLE_TASK} baseline of {task!r}"
        specs = resolve([*head, *after, *extra], where)
        _check_declares(specs, [task], where)
        choice = suite.tasks[task] if suite.tasks is not None else None
        primaries[task] = primary_metric(task, choice or TaskChoice(), logged_test_metrics(specs[task]), where)
        args = (*head, *restrict_args(suite.restrict, task, specs), *after, *extra)
        jobs.append(Job(run=f"{SINGLE_TASK}/{task}", variant=SINGLE_TASK, tasks=(task,), args=args))
    for name in suite.variants:
        configs, own = suite.variant(name)
        args = (*_config_args(configs), *QUIET, *own, *extra)
        where = f"suite {suite.name!r}, variant {name!r}"
        specs = resolve(args, where)
        _check_declares(specs, tasks, where)
        for task in tasks:  # the metric must be logged by every run it is compared across
            primary_metric(
                task,
                TaskChoice(primaries[task].key, primaries[task].higher_is_better),
                logged_test_metrics(specs[task]),
                where,
            )
        jobs.append(Job(run=name, variant=name, tasks=tuple(tasks), args=args))
    return Plan(jobs=jobs, primaries=primaries)


def _check_baselines(suite: Suite, tasks: Sequence[str]) -> None:
    unknown = sorted(set(suite.single_task_runs) - set(tasks))
    if unknown:
        raise SuiteError(
            f"suite {suite.name!r}: single_task.tasks names task(s) {unknown} that are not among the suite's tasks "
            f"{list(tasks)}"
        )
    if suite.restrict == "none":
        missing = [t for t in tasks if t not in suite.single_task_runs]
        if missing:
            raise SuiteError(
                f"suite {suite.name!r}: no single-task baseline for task(s) {missing}: with single_task.restrict: "
                "none, every task needs its own arguments under single_task.tasks (or use restrict: schedule or data)"
            )


def _check_declares(specs: Mapping[str, Any], tasks: Sequence[str], where: str) -> None:
    missing = [t for t in tasks if t not in specs]
    if missing:
        raise SuiteError(f"{where}: its config does not declare task(s) {missing}; it declares {list(specs)}")
