"""Benchmark suites: a small YAML file naming the configs, tasks, baselines, variants and seeds of a benchmark.

A suite (``configs/bench/*.yaml``)::

    name: quickstart                      # optional (default: the file name); names the output folder
    config: configs/quickstart.yaml       # base config(s) of every run, stacked in order like repeated --config
    args: [--trainer.max_epochs, "15"]    # optional: extra `mtl fit` arguments for every run
    seeds: 3                              # N (seeds 0..N-1) or a list of seeds; each run gets --seed_everything
    tasks:                                # optional: default every task of the base config, with its first metric
      purchase: auroc                     # a metric name, or a logged test key such as test/purchase/auroc
      spend: {metric: mae, higher_is_better: false}   # the direction is read from the torchmetrics metric;
                                                      # give it only for metrics that do not declare it
    single_task:                          # the baselines: one run per task, trained on that task alone
      restrict: schedule                  # schedule | data | none (see below)
      config: ...                         # optional: replaces `config` for the baselines
      args: [...]                         # optional: extra arguments for every baseline
      tasks: {spend: [...]}               # optional: per task, extra arguments or {config: ..., args: [...]}
    variants:                             # the multi-task runs: name -> arguments, or {config: ..., args: [...]}
      equal: [--model.balancer, configs/balancer/equal.yaml]
      mmoe: {config: configs/experiment/census_mmoe.yaml}   # a variant's `config` replaces the base config
    tune:                                 # optional: the equal-budget tuned protocol (mtl_lightning/bench/tuning.py)
      trials: 8                           # sweep trials per variant, single-task baselines included
      space: {model.init_args.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}

How a baseline trains one task (``single_task.restrict``):

- ``schedule`` (default): the data and the model keep every task, and a :class:`~mtl_lightning.callbacks.TaskSchedule`
  keeps the others inactive for the whole run: their heads run on zero rows, their losses and labels are never used
  (nor in ``val/loss``, which picks the tested checkpoint), so the encoder and the task's head are trained by that
  task's loss alone, on exactly the rows and labels the multi-task runs see. Use it when the data depend on the task
  list (the synthetic generators draw every task from the declared list; a tabular module turns the target columns
  of undeclared tasks into input features).
- ``data``: ``--data.init_args.tasks`` holds that task alone, so the model has only its head and loss. Use it for
  per-task datasets (a schedule would still draw batches of the inactive tasks) and for data whose other targets
  are dropped, not used as features, when their task is not declared.
- ``none``: no arguments are added; every task needs its own entry under ``single_task.tasks``.

Paths in ``config`` and argument values ending in ``.yaml``/``.yml`` are taken relative to the working directory,
else to the suite's folder, else to the project root (the folder holding ``configs/``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtl_lightning.errors import ConfigError

SINGLE_TASK = "single_task"
"""Variant name of the single-task baselines (in the CSV, the table and ``--only``)."""

RESTRICT_MODES = ("schedule", "data", "none")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # variant names become folder names
_SUITE_KEYS = {"name", "config", "args", "seeds", "tasks", "single_task", "variants", "tune"}
_TUNE_KEYS = {"trials", "space", "seed", "sampler"}
_SINGLE_TASK_KEYS = {"restrict", "config", "args", "tasks"}
_RUN_KEYS = {"config", "args"}
_TASK_KEYS = {"metric", "higher_is_better"}


class SuiteError(ConfigError):
    """A benchmark suite file is invalid, or does not match the configs it names."""


@dataclass(frozen=True)
class RunConfig:
    """A base config replacement (None: keep the suite's) and extra arguments."""

    config: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskChoice:
    """A task of the suite and its primary metric (None: the task's first metric)."""

    metric: str | None = None
    higher_is_better: bool | None = None


@dataclass(frozen=True)
class Suite:
    """A parsed suite file (paths resolved); see the module docstring for the format."""

    name: str
    path: Path
    config: tuple[str, ...]
    args: tuple[str, ...]
    seeds: tuple[int, ...]
    tasks: dict[str, TaskChoice] | None
    restrict: str
    single_task: RunConfig
    single_task_runs: dict[str, RunConfig]
    variants: dict[str, RunConfig]
    tune: dict[str, Any] | None = None  # the tuned protocol (mtl_lightning/bench/tuning.py); None: configs as given

    def baseline(self, task: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(configs, arguments before the restriction, arguments after it) of the baseline of ``task``."""
        own = self.single_task_runs.get(task, RunConfig())
        config = own.config or self.single_task.config or self.config
        return config, (*self.args, *self.single_task.args), own.args

    def variant(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(configs, arguments) of a variant."""
        run = self.variants[name]
        return run.config or self.config, (*self.args, *run.args)

    def pick_seeds(self, count: int | None) -> list[int]:
        """The first ``count`` seeds (all when None), continuing after the last seed when more are asked for."""
        seeds = list(self.seeds)
        if count is None:
            return seeds
        if count < 1:
            raise SuiteError(f"--seeds must be >= 1, got {count}")
        while len(seeds) < count:
            seeds.append(max(seeds) + 1)
        return seeds[:count]


# --------------------------------------------------------------------------------------------------- loading
def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; every error names the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SuiteError(f"suite {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise SuiteError(f"suite {str(path)!r} must be a mapping with keys {sorted(_SUITE_KEYS)}")
    where = f"suite {str(path)!r}"
    _check_keys(raw, _SUITE_KEYS, where)
    for required in ("config", "variants"):
        if required not in raw:
            raise SuiteError(f"{where}: missing key {required!r}")
    folder = path.resolve().parent
    single = raw.get("single_task") or {}
    if not isinstance(single, Mapping):
        raise SuiteError(f"{where}: single_task must be a mapping with keys {sorted(_SINGLE_TASK_KEYS)}")
    _check_keys(single, _SINGLE_TASK_KEYS, f"{where}, single_task")
    restrict = single.get("restrict", "schedule")
    if restrict not in RESTRICT_MODES:
        raise SuiteError(f"{where}: single_task.restrict must be one of {list(RESTRICT_MODES)}, got {restrict!r}")
    per_task = single.get("tasks") or {}
    if not isinstance(per_task, Mapping):
        raise SuiteError(f"{where}: single_task.tasks must map task names to arguments or {{config, args}}")
    variants = raw["variants"]
    if not isinstance(variants, Mapping) or not variants:
        raise SuiteError(f"{where}: variants must map at least one name to arguments or {{config, args}}")
    for name in variants:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == SINGLE_TASK:
            raise SuiteError(
                f"{where}: variant name {name!r} is not allowed: use letters, digits, '_', '-', '.' "
                f"(it names a folder), and not {SINGLE_TASK!r}"
            )
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SuiteError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder)")
    return Suite(
        name=name,
        path=path,
        config=_configs(raw["config"], folder, f"{where}: config"),
        args=_args(raw.get("args"), folder, f"{where}: args"),
        seeds=_seeds(raw.get("seeds", 3), where),
        tasks=_tasks(raw.get("tasks"), where),
        restrict=restrict,
        single_task=_run_config({k: v for k, v in single.items() if k in _RUN_KEYS}, folder, f"{where}, single_task"),
        single_task_runs={
            str(t): _run_config(v, folder, f"{where}, single_task.tasks.{t}") for t, v in per_task.items()
        },
        variants={str(n): _run_config(v, folder, f"{where}, variants.{n}") for n, v in variants.items()},
        tune=_tune(raw.get("tune"), where),
    )


def _tune(raw: Any, where: str) -> dict[str, Any] | None:
    """The ``tune`` section: ``trials`` (>= 1) per variant, a sweep ``space``, optional ``seed`` and ``sampler``."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SuiteError(f"{where}: tune must be a mapping with keys {sorted(_TUNE_KEYS)}")
    _check_keys(raw, _TUNE_KEYS, f"{where}, tune")
    trials = raw.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise SuiteError(f"{where}: tune.trials must be a whole number >= 1 (trials per variant), got {trials!r}")
    if not isinstance(raw.get("space"), Mapping) or not raw["space"]:
        raise SuiteError(
            f"{where}: tune.space must map config keys to ranges (see configs/sweep/), got {raw.get('space')!r}"
        )
    return dict(raw)


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in set(raw) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


def _seeds(raw: Any, where: str) -> tuple[int, ...]:
    if isinstance(raw, bool) or not isinstance(raw, (int, list)):
        raise SuiteError(f"{where}: seeds must be a count N (seeds 0..N-1) or a list of integers, got {raw!r}")
    seeds = list(range(raw)) if isinstance(raw, int) else raw
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise SuiteError(f"{where}: seeds must be a count >= 1 or a non-empty list of integers, got {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"{where}: seeds must be distinct, got {seeds}")
    return tuple(seeds)


def _tasks(raw: Any, where: str) -> dict[str, TaskChoice] | None:
    if raw is None:
        return None
    if isinstance(raw, list):
        raw = dict.fromkeys(raw)
    if not isinstance(raw, Mapping) or not raw:
        raise SuiteError(f"{where}: tasks must be a list of task names or a mapping task -> metric")
    tasks = {}
    for name, value in raw.items():
        if value is None or isinstance(value, str):
            tasks[str(name)] = TaskChoice(metric=value)
            continue
        if not isinstance(value, Mapping):
            raise SuiteError(f"{where}: task {name!r} must map to a metric name or {{metric, higher_is_better}}")
        _check_keys(value, _TASK_KEYS, f"{where}, tasks.{name}")
        hib = value.get("higher_is_better")
        if hib is not None and not isinstance(hib, bool):
            raise SuiteError(f"{where}: tasks.{name}.higher_is_better must be true or false, got {hib!r}")
        tasks[str(name)] = TaskChoice(metric=value.get("metric"), higher_is_better=hib)
    return tasks


def _run_config(raw: Any, folder: Path, where: str) -> RunConfig:
    if raw is None:
        return RunConfig()
    if isinstance(raw, list):
        return RunConfig(args=_args(raw, folder, where))
    if not isinstance(raw, Mapping):
        raise SuiteError(f"{where}: give a list of arguments or a mapping with keys {sorted(_RUN_KEYS)}")
    _check_keys(raw, _RUN_KEYS, where)
    config = _configs(raw["config"], folder, f"{where}.config") if raw.get("config") is not None else None
    return RunConfig(config=config, args=_args(raw.get("args"), folder, f"{where}.args"))


def _configs(raw: Any, folder: Path, where: str) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(c, str) for c in items):
        raise SuiteError(f"{where}: give a config file or a list of them, got {raw!r}")
    return tuple(_find(c, folder, where) for c in items)


def _args(raw: Any, folder: Path, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(a, (str, int, float, bool)) for a in raw):
        raise SuiteError(f"{where}: give a list of command-line arguments (strings), got {raw!r}")
    out = []
    for arg in raw:
        text = str(arg).lower() if isinstance(arg, bool) else str(arg)  # YAML's true -> the CLI's "true"
        flag, eq, value = text.partition("=") if text.startswith("--") else ("", "", text)
        if value.endswith((".yaml", ".yml")) and (eq or not flag):
            text = f"{flag}{eq}{_find(value, folder, where)}"
        out.append(text)
    return tuple(out)


def _find(name: str, folder: Path, where: str) -> str:
    """A file named relative to the working directory, the suite's folder or the project root."""
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return name
    for base in (folder, PROJECT_ROOT):
        if (base / path).is_file():
            return str(base / path)
    raise SuiteError(
        f"{where}: file {name!r} not found in the working directory, the suite's folder ({folder}) or the "
        f"project root ({PROJECT_ROOT})"
    )
