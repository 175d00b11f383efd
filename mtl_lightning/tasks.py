"""Declarative task specifications.

A task is declared once (in the data section of a config) and everything else — its head, its loss, its
metrics, the way its missing labels are masked — follows from the spec. Specs are plain data so that they
travel inside checkpoints and load back with ``weights_only=True``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.nn as nn

from mtl_lightning.errors import ConfigError
from mtl_lightning.kinds import BUILTIN, KindError, TaskKind, get_kind
from mtl_lightning.kinds import IGNORE_INDEX as IGNORE_INDEX  # re-exported: the missing-label marker of specs

KINDS = tuple(BUILTIN)
"""The short names of the task kinds that ship (:mod:`mtl_lightning.kinds`); a dotted class path names another."""

_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
# Names a ModuleDict entry may not take: anything an nn.Module/ModuleDict already has as an attribute.
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


class TaskSpecError(ConfigError):
    """A task specification, or a list of them, is invalid."""


@dataclass
class TaskSpec:
    """One task of a multi-task model.

    Args:
        name: Key of the task in batches, heads, metrics and logs (letters, digits, ``_`` and ``-``).
        kind: ``binary``, ``multiclass``, ``multilabel``, ``regression``, ``count``, or the dotted path of a
            :class:`~mtl_lightning.kinds.TaskKind` subclass.
        num_outputs: Classes for multiclass, labels for multilabel, target dimensions for regression and count
            (default 1); binary tasks always have one output.
        weight: Static loss weight, used by the static balancer and for the validation loss.
        loss: Short name (``bce``, ``ce``, ``mse``, ``l1``, ``huber``, ``smooth_l1``, ``poisson``) or the dotted path of an
            ``nn.Module`` loss that accepts ``reduction="none"``; ``None`` picks the kind's default.
        loss_args: Keyword arguments for the loss (lists become tensors, e.g. ``pos_weight``).
        metrics: Short names (``accuracy``, ``f1``, ``auroc``, ``precision``, ``recall``,
            ``average_precision``, ``mae``, ``mse``, ``rmse``, ``r2``, ``poisson_deviance``) or dotted paths of torchmetrics
            classes; ``None`` picks the kind's defaults, ``[]`` turns metrics off.
        metric_args: Extra keyword arguments per metric name.
        head_hidden: Hidden widths of the default MLP head; empty gives a linear head.
        head_dropout: Dropout between the hidden layers of the default head.
        head: Dotted path of a custom head class called as ``cls(in_features, out_features, **head_args)``.
        head_args: Keyword arguments for the custom head.
    """

    name: str
    kind: str
    num_outputs: int | None = None
    weight: float = 1.0
    loss: str | None = None
    loss_args: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] | None = None
    metric_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0
    head: str | None = None
    head_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):  # '$' alone accepts 'a\n'
            raise TaskSpecError(
                f"task name {self.name!r} is not allowed: use letters, digits, '_' or '-', starting with a "
                "letter or '_' (no dots or slashes, which would break module keys and log names)"
            )
        if self.name in _RESERVED_NAMES:
            raise TaskSpecError(
                f"task name {self.name!r} clashes with an attribute of torch.nn.Module; rename the task "
                f"(e.g. {self.name + '_task'!r})"
            )
        try:
            # Resolved once, into a plain attribute rather than a field (to_dict and comparisons see the kind's name
            # only): the losses, metrics and heads read it on every step.
            self._task_kind: TaskKind = get_kind(self.kind)
            self.num_outputs = self._task_kind.checked_num_outputs(self)
        except KindError as err:
            message = str(err)
            raise TaskSpecError(message if message.startswith("task ") else f"task {self.name!r}: {message}") from err
        if not self.weight >= 0:
            raise TaskSpecError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise TaskSpecError(f"task {self.name!r}: head_dropout must be in [0, 1), got {self.head_dropout}")
        if any(int(w) < 1 for w in self.head_hidden):
            raise TaskSpecError(f"task {self.name!r}: head_hidden widths must be >= 1, got {self.head_hidden}")
        unknown = set(self.metric_args) - set(self.metric_names)
        if unknown:
            raise TaskSpecError(
                f"task {self.name!r}: metric_args given for metrics not in the task's metrics: "
                f"{sorted(unknown)}; metrics are {self.metric_names}"
            )

    @property
    def task_kind(self) -> TaskKind:
        """The kind object (:mod:`mtl_lightning.kinds`) that knows this task's targets, outputs and defaults."""
        return self._task_kind

    @property
    def is_classification(self) -> bool:
        return self.task_kind.is_classification

    @property
    def integer_targets(self) -> bool:
        """Whether targets are class indices (int64, missing = -100) rather than floats (missing = NaN)."""
        return self.task_kind.integer_targets

    @property
    def loss_name(self) -> str:
        return self.loss or self.task_kind.default_loss

    @property
    def metric_names(self) -> list[str]:
        return list(self.task_kind.default_metrics if self.metrics is None else self.metrics)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, safe to store in checkpoints and configs."""
        return asdict(self)

    @classmethod
    def from_any(cls, spec: TaskSpec | Mapping[str, Any]) -> TaskSpec:
        """Build a spec from a spec or a mapping, with a clear error for unknown keys."""
        if isinstance(spec, TaskSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise TaskSpecError(f"a task must be a TaskSpec or a mapping, got {type(spec).__name__}")
        allowed = {f.name for f in fields(cls)}
        unknown = set(spec) - allowed
        if unknown:
            raise TaskSpecError(
                f"task {spec.get('name', '?')!r}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        missing = sorted({"name", "kind"} - set(spec))
        if missing:
            raise TaskSpecError(f"task {spec.get('name', '?')!r}: missing required keys {missing}")
        return cls(**spec)


def parse_tasks(tasks: Iterable[TaskSpec | Mapping[str, Any]]) -> list[TaskSpec]:
    """Normalise a list of specs (or mappings) and reject empty lists and duplicate names."""
    specs = [TaskSpec.from_any(t) for t in tasks]
    if not specs:
        raise TaskSpecError("no tasks declared: give at least one task (name and kind) in the data section")
    dupes = sorted(name for name, n in Counter(s.name for s in specs).items() if n > 1)
    if dupes:
        raise TaskSpecError(f"duplicate task names {dupes}: every task needs a unique name")
    return specs
