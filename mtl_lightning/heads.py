"""Task heads: a linear layer or a small MLP per task, or a custom class named in the spec, kept in
:class:`TaskHeads`, an ``nn.ModuleDict`` keyed by task name (state-dict keys ``heads.<task>.…``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn as nn
from torch import Tensor

from mtl_lightning._imports import import_from_path
from mtl_lightning.contracts import Encoder
from mtl_lightning.tasks import TaskSpec


class MLPHead(nn.Module):
    """``Linear`` layers with ReLU and dropout between them; no hidden widths gives one linear layer."""

    def __init__(self, in_features: int, out_features: int, hidden: list[int] | None = None, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden or []:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_head(spec: TaskSpec, in_features: int) -> nn.Module:
    """Build the head for ``spec`` on a representation of width ``in_features``."""
    out_features = int(spec.num_outputs or 1)
    if spec.head is None:
        return MLPHead(in_features, out_features, spec.head_hidden, spec.head_dropout)
    cls = import_from_path(spec.head, f"task {spec.name!r}: head")
    return cls(in_features, out_features, **spec.head_args)


def sync_parts(parts: nn.ModuleDict, names: Sequence[str], build: Callable[[str], nn.Module]) -> None:
    """Make ``parts`` hold one module per name, in that order: build the missing, drop the others, keep the rest."""
    kept = {name: parts[name] if name in parts else build(name) for name in names}
    parts.clear()
    parts.update(kept)


class TaskHeads(nn.ModuleDict):
    """One head per task, in task order. :meth:`outputs` runs them and gives each kind's canonical shape."""

    def sync(self, specs: Mapping[str, TaskSpec], widths: Mapping[str, int]) -> None:
        """Heads for the tasks of ``specs``: new tasks get a fresh head, removed ones lose theirs, others are kept."""
        sync_parts(self, list(specs), lambda name: build_head(specs[name], widths[name]))

    def outputs(
        self, specs: Mapping[str, TaskSpec], reps: Mapping[str, Tensor], names: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Raw outputs of the heads of ``names`` (default: every task), each in its kind's canonical shape."""
        return {
            name: specs[name].task_kind.output(specs[name], self[name](reps[name]))
            for name in (specs if names is None else names)
        }


def representation_widths(encoder: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """The width of the representation each task's head reads: the encoder's ``out_features``, an int or a
    ``{task: int}`` mapping that names every task (after ``bind_tasks`` for per-task encoders)."""
    width = encoder.out_features if isinstance(encoder, Encoder) else None
    if isinstance(width, Mapping):
        missing = sorted(set(names) - set(width))
        if missing:
            raise ValueError(f"encoder {type(encoder).__name__}.out_features has no width for tasks {missing}")
        return {name: int(width[name]) for name in names}
    if not isinstance(width, int):
        raise TypeError(
            f"encoder {type(encoder).__name__} must expose `out_features` (the width of its representation, "
            "an int or a {task: int} dict) so the task heads can be built"
        )
    return dict.fromkeys(names, width)
