"""Task heads: a linear layer or a small MLP per task, or a custom class named in the spec."""

from __future__ import annotations

import torch.nn as nn

from mtl_lightning._imports import import_from_path
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

    def forward(self, x):
        return self.net(x)


def build_head(spec: TaskSpec, in_features: int) -> nn.Module:
    """Build the head for ``spec`` on a representation of width ``in_features``."""
    out_features = int(spec.num_outputs or 1)
    if spec.head is None:
        return MLPHead(in_features, out_features, spec.head_hidden, spec.head_dropout)
    cls = import_from_path(spec.head, f"task {spec.name!r}: head")
    return cls(in_features, out_features, **spec.head_args)
