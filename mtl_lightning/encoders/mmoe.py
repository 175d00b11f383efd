"""Multi-gate Mixture-of-Experts (MMoE).

Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018: ``n`` expert networks shared by all tasks, and for each task ``k`` a gate
``g^k(x) = softmax(W_gk x)`` over the experts; task ``k``'s representation is ``f^k(x) = sum_i g^k(x)_i f_i(x)``
(its tower is the task head here).
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
    coefficient_of_variation,
    flat_features,
    mlp,
    normalised_entropy,
    zero_logs,
)
from mtl_lightning.encoders.per_task import PerTaskEncoder


class MMoE(PerTaskEncoder):
    """Shared MLP experts mixed by one softmax gate per task; returns ``{task: mixture}``.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        num_experts: Number of experts shared by the tasks.
        expert_hidden: Widths of each expert MLP; the last is the representation size.
        dropout: Dropout after each expert layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation in the experts.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.

    ``training_logs()`` (logged as ``train/encoder/...``) reports, for the last training batch:
    ``gate_entropy/<task>`` (entropy of the task's gate over the experts divided by log(num_experts): 1 = uniform,
    0 = one expert per sample), ``expert_load/<i>`` (mean gate weight of expert ``i`` over the tasks and samples; they
    sum to 1) and ``expert_load_cv`` (their coefficient of variation: 0 = balanced, high = a few experts do the work).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        self.num_experts = check_count(self.owner, "num_experts", num_experts, 1, "e.g. num_experts: 4")
        widths = check_widths(self.owner, "expert_hidden", expert_hidden, "[128, 64]")
        self.in_features = flat_features(self.owner, input_shape)
        self.expert_features = self.task_features = widths[-1]
        self.experts = nn.ModuleList(
            mlp(self.in_features, widths, dropout, norm, activation) for _ in range(self.num_experts)
        )
        self.gates = nn.ModuleDict()
        self._last_gates: dict[str, Tensor] = {}

    def bind_parts(self, names: list[str]) -> None:
        """One gate per task: kept tasks keep theirs, new tasks get a new one, removed tasks lose theirs."""
        self.gates = self.per_task(self.gates, lambda _: nn.Linear(self.in_features, self.num_experts))
        self._last_gates = {}

    def fsdp_units(self) -> list[nn.Module]:
        """Each expert."""
        return list(self.experts)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        x = x.flatten(1)
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # (N, E, D)
        gates = {name: torch.softmax(gate(x), dim=-1) for name, gate in self.gates.items()}  # (N, E) each
        if self.training:  # references only: the statistics are computed in training_logs, on logging steps
            self._last_gates = {name: g.detach() for name, g in gates.items()}
        return {name: torch.einsum("ne,ned->nd", g, experts) for name, g in gates.items()}

    def training_logs(self) -> dict[str, Tensor]:
        keys = [f"gate_entropy/{t}" for t in self.task_names]
        keys += [f"expert_load/{i}" for i in range(self.num_experts)] + ["expert_load_cv"]
        if set(self._last_gates) != set(self.task_names):
            return zero_logs(keys, self)
        logs = {f"gate_entropy/{t}": normalised_entropy(self._last_gates[t]) for t in self.task_names}
        load = torch.stack([g.float().mean(0) for g in self._last_gates.values()]).mean(0)  # (E,)
        logs.update({f"expert_load/{i}": load[i] for i in range(self.num_experts)})
        logs["expert_load_cv"] = coefficient_of_variation(load)
        return logs
