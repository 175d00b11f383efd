"""The search space of a sweep: config keys with their ranges, sampled by an Optuna trial into ``mtl fit`` arguments.

A sweep file's ``space`` maps any key the ``mtl`` CLI accepts to one of::

    model.init_args.optimizer.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.init_args.encoder.init_args.hidden: {type: categorical, choices: [[256, 128], [128, 64]]}
    model.init_args.balancer: {type: categorical, choices: {pcgrad: configs/balancer/pcgrad.yaml, ew: ...}}
    model.init_args.balancer.init_args.weights: {type: simplex}        # {task: w}, w >= 0, sum 1
    trainer.accumulate_grad_batches: {type: int, low: 1, high: 4}

``simplex`` draws task weights uniformly from the simplex (one ``suggest_float`` per task, u -> -log u, normalised:
a Dirichlet(1) draw, the construction Optuna's FAQ recommends, since Optuna has no simplex distribution). Its
``tasks`` default to every task of the config. ``categorical`` choices given as a mapping are searched by name and
passed by value, so a choice can be a whole sub-config (a dict, or a YAML file path) that Optuna could not store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mtl_lightning.errors import ConfigError

if TYPE_CHECKING:
    import optuna

KINDS = ("float", "int", "categorical", "simplex")
# The smallest u of a simplex draw that -log u meets: keeps every weight finite when Optuna samples the bound 0.
_TINY = 1e-12


@dataclass(frozen=True)
class Param:
    """One searched config key."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: dict[str, Any] = field(default_factory=dict)  # name -> value (categorical)
    tasks: tuple[str, ...] = ()  # simplex

    def sample(self, trial: optuna.trial.BaseTrial) -> Any:
        """The value of this key in ``trial`` (a task-weight dict for ``simplex``)."""
        if self.kind == "float":
            assert self.low is not None and self.high is not None
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            assert self.low is not None and self.high is not None
            step = 1 if self.step is None else int(self.step)
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=step, log=self.log)
        if self.kind == "categorical":
            return self.choices[str(trial.suggest_categorical(self.key, list(self.choices)))]
        draws = [-math.log(max(trial.suggest_float(f"{self.key}[{t}]", 0.0, 1.0), _TINY)) for t in self.tasks]
        total = sum(draws)
        return {t: d / total for t, d in zip(self.tasks, draws, strict=True)}

    def example(self) -> Any:
        """A value in range (the middle, the first choice, equal weights): for checking the config accepts the key."""
        if self.kind in ("float", "int"):
            assert self.low is not None and self.high is not None
            mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
            return round(mid) if self.kind == "int" else mid
        if self.kind == "categorical":
            return next(iter(self.choices.values()))
        return {t: 1.0 / len(self.tasks) for t in self.tasks}


def _number(entry: Mapping[str, Any], name: str, where: str) -> float:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: `{name}` must be a number, got {value!r}")
    return float(value)


def parse_param(key: str, entry: Any, tasks: Sequence[str]) -> Param:
    """One ``space`` entry, checked: a known type, a non-empty range, choices, a simplex over two tasks or more."""
    where = f"sweep space {key!r}"
    if not isinstance(entry, Mapping) or "type" not in entry:
        raise ConfigError(f"{where}: give a mapping with a `type` ({', '.join(KINDS)}), got {entry!r}")
    kind = entry["type"]
    known = {"type", "low", "high", "log", "step", "choices", "tasks"}
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown type {kind!r}; use one of {list(KINDS)}")
    if unknown := sorted(set(entry) - known):
        raise ConfigError(f"{where}: unknown fields {unknown}; the fields are {sorted(known)}")
    if kind in ("float", "int"):
        low, high = _number(entry, "low", where), _number(entry, "high", where)
        if not low < high:
            raise ConfigError(
                f"{where}: the range is empty or inverted (low {low:g} >= high {high:g}); give low < high"
            )
        log = bool(entry.get("log", False))
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low:g}")
        step = entry.get("step")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"{where}: an int range needs whole bounds, got {low:g}..{high:g}")
        return Param(key, kind, low, high, log, None if step is None else float(step))
    if kind == "categorical":
        raw = entry.get("choices")
        if isinstance(raw, Mapping):
            choices = {str(name): value for name, value in raw.items()}
        elif isinstance(raw, list):
            choices = {_choice_name(value): value for value in raw}
        else:
            raise ConfigError(f"{where}: `choices` must be a list or a mapping name -> value, got {raw!r}")
        if not choices:
            raise ConfigError(f"{where}: `choices` is empty; give at least one")
        if isinstance(raw, list) and len(choices) != len(raw):
            raise ConfigError(f"{where}: `choices` has duplicates: {raw}")
        return Param(key, kind, choices=choices)
    chosen = tuple(entry.get("tasks") or tasks)
    if unknown := sorted(set(chosen) - set(tasks)):
        raise ConfigError(f"{where}: unknown tasks {unknown}; the config's tasks are {list(tasks)}")
    if len(chosen) < 2:
        raise ConfigError(
            f"{where}: a weights search space needs two tasks or more, got {list(chosen)} (one task's weight "
            "is a constant on the simplex; search the learning rate instead)"
        )
    return Param(key, kind, tasks=chosen)


def _choice_name(value: Any) -> str:
    """The name Optuna stores for a listed choice: the value itself for text, its JSON otherwise."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def parse_space(raw: Any, tasks: Sequence[str]) -> list[Param]:
    """The ``space`` section, in file order."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"the sweep file's `space` must map config keys to ranges, got {raw!r}")
    return [parse_param(str(key), entry, tasks) for key, entry in raw.items()]


def as_args(values: Mapping[str, Any]) -> list[str]:
    """``--key=value`` arguments for ``mtl fit``: text as given (a class path, a YAML file), the rest as JSON."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]
