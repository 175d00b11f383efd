"""What a run's arguments configure, without training: its tasks, the test metrics it logs and their direction.

Every job of a suite is parsed here before the first run starts, so a wrong argument, file or metric name fails in
seconds rather than hours into a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule

from mtl_lightning._imports import import_from_path
from mtl_lightning.bench.suite import SuiteError, TaskChoice
from mtl_lightning.cli import MTLCLI
from mtl_lightning.metrics import build_metrics
from mtl_lightning.tasks import TaskSpec


@contextlib.contextmanager
def quiet_cli() -> Iterator[None]:
    """Silence what LightningCLI says when given ``args`` from a program that has its own command line."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    with warnings.catch_warnings():
        # It warns that sys.argv (the bench's own options) is ignored: meant, since every run gets its args.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        seed_log.setLevel(logging.WARNING)  # "Seed set to 42" at every parse: the run's own seed is what counts
        try:
            yield
        finally:
            seed_log.setLevel(level)


def build_cli(args: Sequence[str], cls: type[MTLCLI] = MTLCLI, **kwargs: Any) -> MTLCLI:
    """``mtl fit <args>`` set up but not run: the class and settings of :func:`mtl_lightning.cli.main`, ``run=False``.

    Not ``main(["fit", ...])``: the bench times ``fit`` and ``test`` without the seconds of config parsing, and reads
    configs without instantiating anything.
    """
    with quiet_cli():
        return cls(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=list(args),
            auto_configure_optimizers=False,
            run=False,
            **kwargs,
        )


class _ParseOnly(MTLCLI):
    """The ``mtl`` parser with nothing instantiated or run: only the merged config is wanted."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_config(args: Sequence[str], where: str, error: type[Exception] = SuiteError) -> Namespace:
    """The merged config of ``mtl fit <args>`` (a jsonargparse Namespace), nothing instantiated; ``error`` on bad args."""
    try:
        # Raise, not print the usage and exit, so the message names the entry at fault.
        cli = build_cli(args, _ParseOnly, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as err:
        raise error(f"{where}: the `mtl` parser rejected its arguments: {err}") from None
    return cli.config


def resolve_tasks(args: Sequence[str], where: str) -> dict[str, dict[str, Any]]:
    """The task specs (name -> plain spec dict, in order) that ``mtl fit <args>`` would train on."""
    return tasks_of_config(parse_config(args, where), where)


def tasks_of_config(config: Namespace, where: str) -> dict[str, dict[str, Any]]:
    """The task specs (name -> plain spec dict, in order) of a merged config (:func:`parse_config`)."""
    tasks = config.get("data.init_args.tasks")
    if tasks and all(hasattr(t, "as_dict") or isinstance(t, Mapping) for t in tasks):
        specs = [TaskSpec.from_any(t.as_dict() if hasattr(t, "as_dict") else dict(t)) for t in tasks]
    else:  # the data module completes its tasks (census: `tasks: null` or task names): ask it
        specs = _tasks_of_data_module(config.get("data"), where)
    return {s.name: s.to_dict() for s in specs}


def _tasks_of_data_module(data: Any, where: str) -> list[TaskSpec]:
    """The task specs of the configured data module, built from its config.

    Only the data module is built, not the model or the trainer: data module constructors are cheap (a
    MultiTaskDataModule reads or generates its data on first use, not in ``__init__``).
    """
    if data is None or not getattr(data, "class_path", None):
        raise SuiteError(f"{where}: the config has no data section, so it declares no tasks")
    cls = import_from_path(data.class_path, f"{where}: data class_path")
    init = data.get("init_args")
    module = cls(**(init.as_dict() if init is not None else {}))
    specs = list(getattr(module, "tasks", None) or [])
    if not specs:
        raise SuiteError(f"{where}: the data module {data.class_path} declares no tasks")
    return [TaskSpec.from_any(s) for s in specs]


def logged_test_metrics(spec: Mapping[str, Any]) -> dict[str, bool | None]:
    """The test keys a task logs (``test/<task>/loss`` and one per metric), each with its ``higher_is_better``."""
    return logged_metrics(spec, "test")


def logged_metrics(spec: Mapping[str, Any], stage: str) -> dict[str, bool | None]:
    """The keys a task logs in ``stage`` (``<stage>/<task>/loss`` and one per metric), each with ``higher_is_better``.

    The direction is the torchmetrics metric's own ``higher_is_better`` (None when the metric does not say).
    """
    task = TaskSpec.from_any(dict(spec))
    keys: dict[str, bool | None] = {f"{stage}/{task.name}/loss": False}
    for key, metric in build_metrics(task, stage).items(keep_base=True):
        keys[f"{stage}/{task.name}/{key}"] = metric.higher_is_better
    return keys


@dataclass(frozen=True)
class Primary:
    """The metric of a task that enters Δm%: its logged key and whether higher is better."""

    task: str
    key: str
    higher_is_better: bool

    @property
    def label(self) -> str:
        return f"{self.task} {self.key.rsplit('/', 1)[-1]} {'↑' if self.higher_is_better else '↓'}"


def primary_metric(task: str, choice: TaskChoice, logged: Mapping[str, bool | None], where: str) -> Primary:
    """The primary metric of ``task``: the suite's choice (a name or a full key) or the task's first metric."""
    metrics = [k for k in logged if not k.endswith("/loss")]
    if choice.metric is None:
        key = metrics[0] if metrics else f"test/{task}/loss"
    else:
        key = choice.metric if "/" in choice.metric else f"test/{task}/{choice.metric}"
    if key not in logged:
        raise SuiteError(
            f"{where}: metric {key!r} of task {task!r} is not logged; the logged test metrics of that task are "
            f"{list(logged)}. Name one of them (or add the metric to the task's `metrics` in the data config)"
        )
    hib = choice.higher_is_better if choice.higher_is_better is not None else logged[key]
    if hib is None:
        raise SuiteError(
            f"{where}: metric {key!r} does not say whether higher is better (its higher_is_better is None); "
            f"set tasks.{task}.higher_is_better in the suite"
        )
    return Primary(task=task, key=key, higher_is_better=bool(hib))
