"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020.

- CGC (one extraction level): shared experts and task-specific experts; task ``k``'s gate
  ``g^k(x) = softmax(W_k x)`` weighs its own experts and the shared ones only, ``z_k = sum_i g^k(x)_i E_i(x)``.
- PLE stacks ``num_levels`` extraction levels. At level ``j`` task ``k``'s experts and gate read task ``k``'s output of
  level ``j - 1``; the shared experts read the shared output of level ``j - 1``, which a *shared gate* makes at every
  level but the last by weighing **all** experts of the level (shared and every task's). The first level reads ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

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
    rebind,
    zero_logs,
)
from mtl_lightning.encoders.per_task import PerTaskEncoder


class ExtractionLevel(nn.Module):
    """One level of PLE (= a CGC module): shared experts, per-task experts, per-task gates and, if ``shared_gate``,
    the gate that makes the shared output for the next level.

    The shared gate's logits over [shared experts, task 1's experts, task 2's experts, ...] are one linear map of the
    shared input; its rows for each task's experts live with that task (``shared_gate_rows[task]``), so tasks can be
    added or removed without touching the other rows.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_shared_experts: int,
        num_task_experts: int,
        shared_gate: bool,
        mlp_args: dict,
    ):
        super().__init__()
        self.in_features = in_features
        self.widths = list(widths)
        self.num_shared_experts = num_shared_experts
        self.num_task_experts = num_task_experts
        self.mlp_args = mlp_args
        self.shared_experts = nn.ModuleList(mlp(in_features, widths, **mlp_args) for _ in range(num_shared_experts))
        self.task_experts = nn.ModuleDict()
        self.task_gates = nn.ModuleDict()
        self.shared_gate = nn.Linear(in_features, num_shared_experts) if shared_gate else None
        self.shared_gate_rows = nn.ModuleDict() if shared_gate else None

    def bind_tasks(self, names: list[str]) -> None:
        self.task_experts = rebind(
            self,
            self.task_experts,
            names,
            lambda _: nn.ModuleList(
                mlp(self.in_features, self.widths, **self.mlp_args) for _ in range(self.num_task_experts)
            ),
        )
        gate_width = self.num_task_experts + self.num_shared_experts
        self.task_gates = rebind(self, self.task_gates, names, lambda _: nn.Linear(self.in_features, gate_width))
        if self.shared_gate_rows is not None:
            self.shared_gate_rows = rebind(
                self, self.shared_gate_rows, names, lambda _: nn.Linear(self.in_features, self.num_task_experts)
            )

    def experts(self) -> list[nn.Module]:
        task_experts = (cast(nn.ModuleList, experts) for experts in self.task_experts.values())
        return [*self.shared_experts, *(e for experts in task_experts for e in experts)]

    def forward(
        self, shared_in: Tensor, task_in: dict[str, Tensor]
    ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """(shared output or None at the last level, ``{task: output}``, ``{task: gate weights (N, m_t + m_s)}``)."""
        shared = torch.stack([e(shared_in) for e in self.shared_experts], dim=1)  # (N, m_s, D)
        own = {
            t: torch.stack([e(task_in[t]) for e in cast(nn.ModuleList, experts)], dim=1)
            for t, experts in self.task_experts.items()
        }
        outputs, gates = {}, {}
        for t, gate in self.task_gates.items():
            weights = torch.softmax(gate(task_in[t]), dim=-1)  # over [own experts, shared experts]
            outputs[t] = torch.einsum("ne,ned->nd", weights, torch.cat([own[t], shared], dim=1))
            gates[t] = weights
        shared_out = None
        if self.shared_gate is not None and self.shared_gate_rows is not None:
            logits = torch.cat(
                [self.shared_gate(shared_in), *(r(shared_in) for r in self.shared_gate_rows.values())], -1
            )
            everything = torch.cat([shared, *own.values()], dim=1)
            shared_out = torch.einsum("ne,ned->nd", torch.softmax(logits, dim=-1), everything)
        return shared_out, outputs, gates


class PLE(PerTaskEncoder):
    """Progressive Layered Extraction: ``num_levels`` extraction levels of shared and task-specific MLP experts.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        num_levels: Number of extraction levels (1 = CGC).
        num_shared_experts: Shared experts per level.
        num_task_experts: Experts of each task per level.
        expert_hidden: Widths of each expert MLP (the same at every level); the last is the representation size.
        dropout: Dropout after each expert layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation in the experts.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.

    ``training_logs()`` (logged as ``train/encoder/...``), for the last training batch, averaged over levels:
    ``gate_entropy/<task>`` (entropy of the task's gate divided by log(number of experts it weighs): 1 = uniform),
    ``shared_weight/<task>`` (the gate's total weight on the shared experts, ``num_shared / (num_shared +
    num_task)`` when uniform: how much the task relies on shared knowledge) and ``expert_load_cv`` (coefficient of
    variation of the mean weight the task gates give each shared expert: 0 = balanced).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        self.num_levels = check_count(self.owner, "num_levels", num_levels, 1, "e.g. num_levels: 2 (1 is CGC)")
        self.num_shared_experts = check_count(self.owner, "num_shared_experts", num_shared_experts, 1, "e.g. 2")
        self.num_task_experts = check_count(
            self.owner, "num_task_experts", num_task_experts, 1, "with no task experts use MMoE instead"
        )
        widths = check_widths(self.owner, "expert_hidden", expert_hidden, "[128, 64]")
        self.in_features = flat_features(self.owner, input_shape)
        self.expert_features = self.task_features = widths[-1]
        mlp_args = {"dropout": dropout, "norm": norm, "activation": activation}
        self.levels = nn.ModuleList(
            ExtractionLevel(
                self.in_features if j == 0 else widths[-1],
                widths,
                self.num_shared_experts,
                self.num_task_experts,
                shared_gate=j < self.num_levels - 1,
                mlp_args=mlp_args,
            )
            for j in range(self.num_levels)
        )
        self._last_gates: list[dict[str, Tensor]] = []

    def _levels(self) -> list[ExtractionLevel]:
        return cast(list[ExtractionLevel], list(self.levels))  # a ModuleList is typed as holding any Module

    def bind_parts(self, names: list[str]) -> None:
        """Task experts, task gates and shared-gate rows per task, at every level; kept tasks keep theirs."""
        for level in self._levels():
            level.bind_tasks(names)
        self._last_gates = []

    def fsdp_units(self) -> list[nn.Module]:
        """Every expert of every level."""
        return [e for level in self._levels() for e in level.experts()]

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        flat = x.flatten(1)
        shared: Tensor | None = flat
        task_in: dict[str, Tensor] = dict.fromkeys(self.task_names, flat)
        gates = []
        for level in self.levels:
            assert shared is not None  # only the last level has no shared gate
            shared, task_in, level_gates = level(shared, task_in)
            gates.append(level_gates)
        if self.training:  # references only: the statistics are computed in training_logs, on logging steps
            self._last_gates = [{t: g.detach() for t, g in level_gates.items()} for level_gates in gates]
        return task_in

    def training_logs(self) -> dict[str, Tensor]:
        keys = [f"{k}/{t}" for k in ("gate_entropy", "shared_weight") for t in self.task_names] + ["expert_load_cv"]
        if not self._last_gates or set(self._last_gates[0]) != set(self.task_names):
            return zero_logs(keys, self)
        m = self.num_task_experts
        logs = {}
        for t in self.task_names:
            logs[f"gate_entropy/{t}"] = torch.stack([normalised_entropy(g[t]) for g in self._last_gates]).mean()
        for t in self.task_names:
            logs[f"shared_weight/{t}"] = torch.stack(
                [g[t][:, m:].float().sum(-1).mean() for g in self._last_gates]
            ).mean()
        cvs = []
        for level_gates in self._last_gates:
            load = torch.stack([g[:, m:].float().mean(0) for g in level_gates.values()]).mean(0)  # (m_s,)
            cvs.append(coefficient_of_variation(load))
        logs["expert_load_cv"] = torch.stack(cvs).mean()
        return logs


class CGC(PLE):
    """Customized Gate Control: PLE with one extraction level (Tang et al. 2020, section 4.2).

    Args:
        input_shape, num_shared_experts, num_task_experts, expert_hidden, dropout, norm, activation: As in
            :class:`PLE`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        expert_hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__(input_shape, 1, num_shared_experts, num_task_experts, expert_hidden, dropout, norm, activation)
