"""The gradient source of a gradient method: each task loss's gradient w.r.t. the representation it reads.

Under hard sharing every task reads the one shared representation ``z`` (through one alias per head, so one
backward of ``sum_t L_t`` through the heads gives every row); architectures with one representation per task (MMoE,
PLE, ...) give each task its own tensor. Only the heads (and loss modules) are walked here; the encoder is walked by
the Gramian backend (parameter mode) or by Lightning's backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TaskGradients:
    """One step's per-task gradients, as the Gramian backends and the deliveries read them.

    Attributes:
        reps: Each task's representation (distinct tensors, or one tensor repeated).
        rep_grads: ``dL_t/d reps[t]`` per task (zeros where a loss does not reach its representation).
        z: The shared representation under hard sharing, else None.
        stacked: Under hard sharing, ``(T, *z.shape)`` in z's dtype: row t is task t's gradient on ``z``.
        flat: ``stacked`` as ``(T, z.numel())`` float32 (the same memory when z is float32).
        task_params: The heads' (and loss modules') parameters whose gradients were taken here, to hand over.
        param_grads: ``d(sum_t L_t)/dp`` for each of ``task_params`` (None: no loss reaches it).
    """

    reps: list[Tensor]
    rep_grads: list[Tensor]
    z: Tensor | None = None
    stacked: Tensor | None = None
    flat: Tensor | None = None
    task_params: list[Tensor] = field(default_factory=list)
    param_grads: list[Tensor | None] = field(default_factory=list)

    @property
    def num_tasks(self) -> int:
        return len(self.reps)


def task_gradients(
    losses: Tensor, reps: Sequence[Tensor], z: Tensor | None, task_params: Sequence[Tensor]
) -> TaskGradients:
    """The per-task gradients of one step (and the task parameters' gradients, when ``task_params`` is not empty).

    ``task_params`` may be given only when ``reps`` are distinct tensors each read by its own loss only (the
    module's per-head aliases, or per-task representations): the gradient of the sum w.r.t. ``reps[t]`` is then
    task t's alone, and the heads' graph is freed by this backward.
    """
    reps = list(reps)
    params = list(task_params)
    param_grads: list[Tensor | None] = []
    if params:
        rep_grads, param_grads = gradients_with_task_parameters(losses, reps, params)
        stacked = torch.stack(rep_grads) if z is not None else None
    elif z is not None:
        distinct = len({id(r) for r in reps}) == len(reps)
        stacked = per_task_gradients(losses, reps if distinct else z)
        rep_grads = list(stacked)
    else:
        rep_grads = per_representation_gradients(losses, reps)
        stacked = None
    flat = None if stacked is None else stacked.reshape(len(reps), -1).float()
    return TaskGradients(reps, rep_grads, z, stacked, flat, params, param_grads)


def per_task_gradients(losses: Tensor, z: Tensor | Sequence[Tensor]) -> Tensor:
    """``(T, *shape)`` gradients of each loss w.r.t. its representation, keeping the graph for the final backward.

    ``z`` is one tensor every loss depends on, or one distinct tensor per loss that only that loss depends on (the
    per-head aliases the module passes under hard sharing). With one tensor per loss a single backward of
    ``sum_t L_t`` through the heads yields every task's gradient: O(T B D) work. With one shared tensor a batched
    call (vmap over the identity) sends all T rows through every head, O(T^2 B D); it falls back to one call per task
    where the graph does not support vmap. Only the heads are traversed.
    """
    if not isinstance(z, Tensor):
        reps = list(z)
        if len(reps) != len(losses) or len({id(r) for r in reps}) != len(reps):
            raise ValueError("per_task_gradients: give one shared tensor, or one distinct tensor per loss")
        rep_grads = torch.autograd.grad(losses.sum(), reps, retain_graph=True, allow_unused=True)
        return torch.stack([torch.zeros_like(r) if g is None else g for r, g in zip(reps, rep_grads, strict=True)])
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    grads: Tensor | None  # None where no loss reaches z (allow_unused)
    try:
        (grads,) = torch.autograd.grad(losses, z, eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses]
        grads = torch.stack([torch.zeros_like(z) if g is None else g for g in rows])
    return torch.zeros((len(losses), *z.shape), dtype=z.dtype, device=z.device) if grads is None else grads


def per_representation_gradients(losses: Tensor, reps: Sequence[Tensor]) -> list[Tensor]:
    """``dL_t/dz_t`` for each task ``t``, where ``z_t`` is task t's own representation (shapes may differ).

    When the tensors are distinct, loss t depends on ``z_t`` only, so one backward of ``sum_t L_t`` through the
    heads gives every row; tasks that read the same tensor take one backward each.
    """
    grads: Sequence[Tensor | None]  # None for a representation its loss does not reach (allow_unused)
    if len({id(r) for r in reps}) == len(reps):
        grads = torch.autograd.grad(losses.sum(), list(reps), retain_graph=True, allow_unused=True)
    else:
        grads = [
            torch.autograd.grad(loss, r, retain_graph=True, allow_unused=True)[0]
            for loss, r in zip(losses, reps, strict=True)
        ]
    return [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads, strict=True)]


def gradients_with_task_parameters(
    losses: Tensor, reps: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``dL_t/dz_t`` per task and ``d(sum_t L_t)/dp`` per task parameter ``p``, from one backward through the heads.

    ``reps`` must be distinct tensors, one per loss, each read by its own loss only (the module's per-head
    aliases, or per-task representations), so the gradient of the sum w.r.t. ``reps[t]`` is task t's alone. The
    heads' graph is freed by this backward: the caller hands the parameter gradients over instead of walking it
    again.
    """
    grads = torch.autograd.grad(losses.sum(), [*reps, *params], allow_unused=True)
    rep_grads = [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads[: len(reps)], strict=True)]
    return rep_grads, list(grads[len(reps) :])
