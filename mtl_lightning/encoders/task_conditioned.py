"""A task-conditioned encoder: one shared MLP run once per task, told which task by a learned task embedding.

All parameters but one small vector per task are shared, so it suits many small tasks. Two ways to condition:

- ``concat``: the embedding ``e_t`` is concatenated to the input, ``h_1 = W [x; e_t] + b`` (as task-descriptor inputs,
  e.g. Yang and Hospedales, "A Unified Perspective on Multi-Domain and Multi-Task Learning", ICLR 2015). Computed as
  ``W_x x + W_e e_t + b``, the same numbers, so the input layer runs once for all tasks instead of once per task.
- ``film``: every layer's normalised pre-activation is modulated feature-wise,
  ``h <- (1 + gamma_l(e_t)) * h + beta_l(e_t)`` (FiLM: Perez, Strub, de Vries, Dumoulin and Courville, "FiLM: Visual
  Reasoning with a General Conditioning Layer", AAAI 2018), with ``gamma_l, beta_l`` linear in ``e_t`` and shared by
  the tasks; they start at zero, so every task starts from the same network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import (
    check_count,
    check_mlp_args,
    check_widths,
    flat_features,
)
from mtl_lightning.encoders.mlp import ACTIVATIONS, NORMS
from mtl_lightning.encoders.per_task import PerTaskEncoder
from mtl_lightning.errors import ConfigError

CONDITIONINGS = ("concat", "film")


class TaskEmbedding(nn.Module):
    """One task's learned vector, ``N(0, 1)`` at first (as ``nn.Embedding``); ``forward()`` returns it as ``(1, d)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, dim))

    def forward(self) -> Tensor:
        return self.weight


class TaskConditioned(PerTaskEncoder):
    """A shared MLP conditioned on a learned embedding of each task; returns ``{task: representation}``.

    The tasks run as one batch of ``T x N`` rows (one matmul per layer, not ``T``), so the cost grows with the number
    of tasks like a network ``T`` times wider, and nothing else per task.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        hidden: Widths of the shared layers (``Linear -> norm -> [FiLM] -> activation -> dropout``); the last is the
            representation size.
        embedding_dim: Size of each task's embedding.
        conditioning: ``concat`` (embedding concatenated to the input) or ``film`` (every layer modulated).
        dropout: Dropout after each layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation after each linear layer (``batch`` pools the statistics
            of all tasks' rows).
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (256, 128),
        embedding_dim: int = 16,
        conditioning: Literal["concat", "film"] = "film",
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"{self.owner}: conditioning must be one of {list(CONDITIONINGS)}, got {conditioning!r}")
        self.hidden = check_widths(self.owner, "hidden", hidden, "[256, 128]")
        self.task_features = self.hidden[-1]
        self.embedding_dim = check_count(self.owner, "embedding_dim", embedding_dim, 1, "e.g. embedding_dim: 16")
        self.conditioning = conditioning
        self.in_features = flat_features(self.owner, input_shape)
        ins = [self.in_features, *self.hidden[:-1]]
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(ins, self.hidden, strict=True))
        norm_layer = NORMS[norm]
        self.norms = nn.ModuleList(norm_layer(w) if norm_layer is not None else nn.Identity() for w in self.hidden)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.embedding_proj: nn.Linear | None
        self.film: nn.ModuleList | None
        if conditioning == "concat":
            self.embedding_proj = nn.Linear(self.embedding_dim, self.hidden[0], bias=False)
            self.film = None
        else:
            self.embedding_proj = None
            film = [nn.Linear(self.embedding_dim, 2 * w) for w in self.hidden]
            for layer in film:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.film = nn.ModuleList(film)
        self.embeddings = nn.ModuleDict()

    def bind_parts(self, names: list[str]) -> None:
        """One embedding per task; kept tasks keep theirs."""
        self.embeddings = self.per_task(self.embeddings, lambda _: TaskEmbedding(self.embedding_dim))

    def _norm(self, index: int, h: Tensor) -> Tensor:
        norm = self.norms[index]
        if isinstance(norm, nn.BatchNorm1d):  # (T, N, D): BatchNorm1d wants (rows, D)
            return norm(h.reshape(-1, h.shape[-1])).view_as(h)
        return norm(h)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        x = x.flatten(1)
        emb = torch.cat([e() for e in self.embeddings.values()]).to(x.dtype)  # (T, d)
        h = self.linears[0](x)[None]  # (1, N, D): the input layer runs once for all tasks
        if self.embedding_proj is not None:
            h = h + self.embedding_proj(emb)[:, None]  # (T, N, D) = W_x x + W_e e_t + b
        for i in range(len(self.linears)):
            if i:
                h = self.linears[i](h)
            h = self._norm(i, h)
            if self.film is not None:
                gamma, beta = self.film[i](emb)[:, None].chunk(2, dim=-1)  # (T, 1, D) each
                h = h * (1 + gamma) + beta
            h = self.dropout(self.activation(h))
        return dict(zip(self.task_names, h.unbind(0), strict=True))
