"""A sweep file (``configs/sweep/*.yaml``) read and checked against the config its trials run.

    study_name: quickstart_weights      # optional; default: the sweep folder's name
    sampler: {class_path: optuna.samplers.TPESampler, init_args: {seed: 0}}
    pruner: {class_path: optuna.pruners.MedianPruner}        # single objective only
    fixed:                               # given to every trial (and compare run) before the searched keys
      model.init_args.balancer: mtl_lightning.balancers.StaticWeighting
    space: {...}                         # see mtl_lightning.sweep.space
    objectives:                          # one: a single-objective study; several: a Pareto front
      - metric: val/purchase/auroc       # direction from the metric (torchmetrics' higher_is_better)
      - metric: val/spend/mae
        direction: minimize              # or say it
      - delta_m: {val/purchase/auroc: 0.93, val/spend/mae: 0.31}   # Δm% against a reference (a mapping or a file)
    compare:                             # runs drawn on the Pareto figure as named points, run once each
      pcgrad: {model.init_args.balancer: configs/balancer/pcgrad.yaml}

Everything is checked before the first trial: every key exists in the merged config (or a did-you-mean error),
every objective is a validation metric the model logs (or the list of those that are).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtl_lightning.errors import ConfigError
from mtl_lightning.sweep.space import Param, parse_space

SECTIONS = ("study_name", "sampler", "pruner", "fixed", "space", "objectives", "compare")
DIRECTIONS = ("minimize", "maximize")
DELTA_M = "delta_m"


@dataclass(frozen=True)
class Objective:
    """One value a trial is scored on: a logged validation metric, or Δm% (%, lower is better) against a reference."""

    name: str
    direction: str
    reference: dict[str, float] | None = None  # Δm%: metric key -> reference value
    higher_is_better: dict[str, bool] | None = None  # Δm%: the direction of each reference metric

    def value(self, metrics: Mapping[str, float]) -> float:
        """The objective from a trial's final validation metrics (every key checked present before)."""
        if self.reference is None:
            return float(metrics[self.name])
        from mtl_lightning.bench.delta import delta_m

        assert self.higher_is_better is not None
        return delta_m({k: float(metrics[k]) for k in self.reference}, self.reference, self.higher_is_better)

    @property
    def metrics(self) -> list[str]:
        """The logged keys the objective reads."""
        return list(self.reference) if self.reference is not None else [self.name]


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep file; ``raw`` is the file's content, compared with the study's to refuse mixing two sweeps."""

    raw: dict[str, Any]
    params: list[Param]
    objectives: list[Objective]
    fixed: dict[str, Any]
    compare: dict[str, dict[str, Any]]

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


def load_sweep_file(path: Path) -> dict[str, Any]:
    """The sweep file's sections (unknown ones refused)."""
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; e.g. --sweep configs/sweep/weights_pareto.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {str(path)!r} must be a mapping of {list(SECTIONS)}, got {type(raw).__name__}")
    if unknown := sorted(set(raw) - set(SECTIONS)):
        raise ConfigError(f"sweep file {str(path)!r}: unknown sections {unknown}; the sections are {list(SECTIONS)}")
    for key in ("space", "objectives"):
        if not raw.get(key):
            raise ConfigError(f"sweep file {str(path)!r} has no `{key}`; see configs/sweep/weights_pareto.yaml")
    return raw


def build_spec(raw: Mapping[str, Any], tasks: Sequence[str], logged: Mapping[str, bool | None]) -> SweepSpec:
    """The sweep file checked against the trials' tasks and the validation metrics they log (key -> higher better)."""
    objectives = [_objective(entry, logged, i) for i, entry in enumerate(_as_list(raw["objectives"], "objectives"))]
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep objectives repeat a metric: {names}")
    if raw.get("pruner") and len(objectives) > 1:
        raise ConfigError("a pruner needs a single objective (Optuna prunes no multi-objective study); drop `pruner`")
    if raw.get("pruner") and objectives[0].reference is not None:
        raise ConfigError("a pruner needs a metric objective (Δm% is computed at the end of a trial); drop `pruner`")
    compare = raw.get("compare") or {}
    if not isinstance(compare, Mapping) or not all(isinstance(v, Mapping) for v in compare.values()):
        raise ConfigError(f"sweep `compare` must map run names to {{config key: value}}, got {compare!r}")
    return SweepSpec(
        raw=dict(raw),
        params=parse_space(raw["space"], tasks),
        objectives=objectives,
        fixed=dict(_as_mapping(raw.get("fixed") or {}, "fixed")),
        compare={str(k): dict(v) for k, v in compare.items()},
    )


def _as_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"sweep `{name}` must be a list, got {value!r}")
    return value


def _as_mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"sweep `{name}` must map config keys to values, got {value!r}")
    return value


def _objective(entry: Any, logged: Mapping[str, bool | None], index: int) -> Objective:
    where = f"sweep objective {index}"
    if isinstance(entry, str):
        entry = {"metric": entry}
    if not isinstance(entry, Mapping) or len({"metric", DELTA_M} & set(entry)) != 1:
        raise ConfigError(f"{where}: give `metric: KEY` or `{DELTA_M}: REFERENCE`, got {entry!r}")
    if unknown := sorted(set(entry) - {"metric", DELTA_M, "direction"}):
        raise ConfigError(f"{where}: unknown fields {unknown}; the fields are metric, {DELTA_M}, direction")
    if DELTA_M in entry:
        reference = _reference(entry[DELTA_M], where)
        directions = {key: _direction_of(key, logged, where, None) == "maximize" for key in reference}
        if entry.get("direction", "minimize") != "minimize":
            raise ConfigError(f"{where}: Δm% is minimised (lower is better); drop `direction`")
        return Objective(DELTA_M, "minimize", reference, directions)
    key = str(entry["metric"])
    return Objective(key, _direction_of(key, logged, where, entry.get("direction")), None, None)


def _reference(value: Any, where: str) -> dict[str, float]:
    """Δm%'s reference: ``{key: value}``, or a JSON/YAML file of one (a trial's ``result.json``: its ``metrics``)."""
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{where}: the Δm% reference file {value!r} does not exist")
        value = yaml.safe_load(path.read_text())
        if isinstance(value, Mapping) and isinstance(value.get("metrics"), Mapping):
            value = value["metrics"]
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}: the Δm% reference must map metric keys to values, got {value!r}")
    return {str(k): float(v) for k, v in value.items()}


def _direction_of(key: str, logged: Mapping[str, bool | None], where: str, given: Any) -> str:
    if not key.startswith("val/"):
        raise ConfigError(
            f"{where}: {key!r} is not a validation metric; a sweep scores trials on `val/...` metrics (tuning on "
            "the test split would overfit it). The validation metrics logged are " + json.dumps(sorted(logged))
        )
    if key not in logged:
        close = difflib.get_close_matches(key, list(logged), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {key!r} is never logged{hint}; the validation metrics logged are {sorted(logged)}")
    if given is not None:
        if given not in DIRECTIONS:
            raise ConfigError(f"{where}: direction must be one of {list(DIRECTIONS)}, got {given!r}")
        return str(given)
    if logged[key] is None:
        raise ConfigError(f"{where}: {key!r} does not say whether higher is better; add `direction: maximize|minimize`")
    return "maximize" if logged[key] else "minimize"


def check_keys(config: Any, keys: Sequence[str], where: str) -> None:
    """Every key exists in the merged config (a jsonargparse Namespace), or one error with the nearest keys."""
    leaves = [str(k) for k in config.keys()]  # noqa: SIM118 - a Namespace iterates differently
    present = set(leaves) | {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
    for key in keys:
        if key in present:
            continue
        close = difflib.get_close_matches(key, sorted(present), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no key of the config is close"
        raise ConfigError(
            f"{where}: the config has no key {key!r}; {hint} (`mtl fit --config ... --print_config` shows every key; "
            "a key of a class that the config does not use, e.g. a balancer's weights, needs that class in `fixed`)"
        )


def spec_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two sweeps' recorded settings, by section (and by key inside ``space``)."""
    diffs: list[str] = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            diffs.append(f"{section}: {', '.join(keys)}")
        else:
            diffs.append(f"{section}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return diffs
