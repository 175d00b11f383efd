"""Gramian backends of a gradient method: the T x T Gramian ``G = J J^T`` (float32) of one step's task gradients.

- :class:`RepresentationGramian` (``mode: representation``): ``J`` holds the gradients w.r.t. the shared
  representation ``z``, already computed by the gradient source; ``G`` is one matrix product.
- :class:`BatchedParameterGramian` (``mode: parameter``, ``gramian: batched``): one T-batched backward from the
  representation(s) to the encoder's parameters gives ``J_p`` for every parameter tensor ``p`` (by the chain rule,
  row t backpropagated from the representation is task t's gradient), then ``G = sum_p J_p J_p^T``. It holds the
  T x P Jacobian for a moment, and can keep it for the delivery to hand the encoder its update.
- :class:`AutogramGramian` (``mode: parameter``, ``gramian: autogram``): TorchJD's autogram engine differentiates
  ``o_t = <z_t, g_t>`` (``g_t`` constant, so ``do_t/dθ = dL_t/dθ``) and never materialises ``J``.

Each backend is chosen once, at bind; its per-step work is one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mtl_lightning.balancers.gradient_sources import TaskGradients
from mtl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from torchjd.autogram import Engine


class GramianBackend:
    """Computes the Gramian of one step's task gradients from a :class:`TaskGradients`."""

    def __call__(self, grads: TaskGradients, amp: bool = False) -> Tensor:
        raise NotImplementedError


class RepresentationGramian(GramianBackend):
    """``flat @ flat.T`` of the per-task gradients on the shared representation."""

    def __call__(self, grads: TaskGradients, amp: bool = False) -> Tensor:
        if grads.flat is None:
            raise ValueError("RepresentationGramian needs one shared representation (TaskGradients.flat)")
        return grads.flat @ grads.flat.T


class _ParameterGramian(GramianBackend):
    """Parameter mode: the Gramian w.r.t. the encoder's trainable parameters (those frozen since bind excluded)."""

    def __init__(self, encoder_params: Sequence[Tensor]):
        # A plain list, not submodules: the encoder belongs to the LightningModule and is saved there once.
        self.encoder_params = list(encoder_params)

    def trainable(self) -> list[Tensor]:
        return [p for p in self.encoder_params if p.requires_grad]


class BatchedParameterGramian(_ParameterGramian):
    """``sum_p J_p J_p^T`` from one T-batched backward to the encoder's parameters."""

    def jacobians(self, grads: TaskGradients, params: Sequence[Tensor]) -> list[Tensor | None]:
        """``J_p`` (T, *p.shape) for each of ``params`` (None: no task reaches p)."""
        sources, source_grads = batched_sources(grads)
        return parameter_jacobians(sources, source_grads, params)

    def __call__(self, grads: TaskGradients, amp: bool = False) -> Tensor:
        device = grads.rep_grads[0].device
        return gramian_of(self.jacobians(grads, self.trainable()), grads.num_tasks, device)


class AutogramGramian(_ParameterGramian):
    """TorchJD's autogram engine on ``o_t = <z_t, g_t>``: the Gramian without the Jacobian."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__(list(encoder.parameters()))
        from torchjd.autogram import Engine

        # The engine hooks the encoder's leaf modules, and its hooks expect compute_gramian after every forward that
        # records a graph; so it exists only when this backend is chosen.
        leaves = [m for m in encoder.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
        # A parameter of a module with children (nn.MultiheadAttention's in_proj_weight) is used in no leaf's
        # forward, so no hook sees it and the Gramian would silently leave it out.
        inner = [
            f"{name}.{p_name}" if name else p_name
            for name, m in encoder.named_modules()
            if list(m.children())
            for p_name, p in m.named_parameters(recurse=False)
            if p.requires_grad
        ]
        if inner:
            raise ConfigError(
                f"gramian: autogram cannot see parameters held by modules that have submodules ({inner[:3]}"
                f"{' ...' if len(inner) > 3 else ''}, e.g. nn.MultiheadAttention's): its Gramian would leave them "
                "out. Use gramian: batched, or hold those weights in leaf modules (nn.Linear)"
            )
        self.engine: Engine = Engine(*leaves, batch_dim=None)

    def __call__(self, grads: TaskGradients, amp: bool = False) -> Tensor:
        if grads.z is not None:
            assert grads.stacked is not None
            # a matrix-vector product: its T-batched backward is (T x T) @ J, with no T x T x |z| intermediate
            projections = grads.stacked.reshape(grads.num_tasks, -1) @ grads.z.reshape(-1)
        else:
            projections = torch.stack(
                [torch.dot(r.flatten(), g.flatten()) for r, g in zip(grads.reps, grads.rep_grads, strict=True)]
            )
        if not amp:
            return self.engine.compute_gramian(projections).float()
        # TorchJD's autogram engine fails on graphs recorded under autocast (bf16/fp16 activations with fp32
        # parameters: "expected scalar type BFloat16 but found Float"), so materialise J_θ: one backward through the
        # encoder per task.
        params = self.trainable()
        rows = []
        for projection in projections:
            row = torch.autograd.grad(projection, params, retain_graph=True, allow_unused=True)
            flat_row = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, row, strict=True)]
            rows.append(torch.cat(flat_row).float())
        jacobian = torch.stack(rows)
        return jacobian @ jacobian.T


def batched_sources(grads: TaskGradients) -> tuple[list[Tensor], list[Tensor]]:
    """The distinct representation tensors and, for each, ``(T, *shape)`` with row t = task t's gradient on it."""
    if grads.z is not None:
        assert grads.stacked is not None
        return [grads.z], [grads.stacked]
    sources: list[Tensor] = []
    index: dict[int, int] = {}
    for r in grads.reps:
        if id(r) not in index:
            index[id(r)] = len(sources)
            sources.append(r)
    batched = [r.new_zeros((grads.num_tasks, *r.shape)) for r in sources]
    for t, (r, g) in enumerate(zip(grads.reps, grads.rep_grads, strict=True)):
        batched[index[id(r)]][t] = g
    return sources, batched


def parameter_jacobians(
    sources: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor]
) -> list[Tensor | None]:
    """``J_p`` (T, *p.shape) for every parameter tensor ``p``, from one T-batched backward (None: no task reaches p).

    ``sources`` are the tensors through which the task losses reach ``params`` (the shared representation, or each
    task's own), and ``grads[i]`` is ``(T, *sources[i].shape)``: row t is task t's gradient w.r.t. ``sources[i]``
    (zero where task t does not read it). By the chain rule row t, backpropagated from ``sources`` to ``params``, is
    task t's gradient w.r.t. ``params``. The backward holds T copies of the encoder's intermediate gradients and
    returns the whole T x P Jacobian. Where a graph has no batching rule it takes one backward per task instead.
    """
    num_tasks = grads[0].shape[0]
    params = list(params)
    try:
        return list(
            torch.autograd.grad(
                list(sources), params, list(grads), retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(list(sources), params, [g[t] for g in grads], retain_graph=True, allow_unused=True)
            for t in range(num_tasks)
        ]
        return [
            None
            if all(row[i] is None for row in rows)
            else torch.stack([torch.zeros_like(p) if row[i] is None else row[i] for row in rows])
            for i, p in enumerate(params)
        ]


def gramian_of(jacobians: Sequence[Tensor | None], num_tasks: int, device: torch.device) -> Tensor:
    """``G = sum_p J_p J_p^T`` (T x T, float32) of per-parameter Jacobians ``(T, *p.shape)``."""
    gramian = torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=device)
    for jacobian in jacobians:
        if jacobian is not None:
            matrix = jacobian.reshape(num_tasks, -1).float()
            gramian.addmm_(matrix, matrix.T)
    return gramian
