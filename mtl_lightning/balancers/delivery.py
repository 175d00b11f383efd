"""Deliveries of a gradient method: the scalar whose ordinary backward gives every parameter its update.

With ``g_t = dL_t/dz`` and ``g`` the aggregated gradient on the shared representation (``sum_t w_t g_t`` for a
weighting), the encoder must get ``(dz/dθ)^T g`` and each head the gradient of its own loss, scaled by the heads'
scale ``s`` (see :func:`head_scale`).

- :func:`hand_over` (the usual path): the heads' gradients were taken with the ``g_t`` by the gradient source, so they
  are handed over with ``g`` for the representation (or, in parameter mode with the batched Gramian, with
  ``sum_t w_t J_p[t]`` for the encoder's parameters directly); Lightning's backward walks neither the heads again
  nor, in the second case, the encoder.
- :func:`surrogate` (FSDP, float16 autocast, a balancer called without the heads' parameters):
  ``s sum_t L_t + <z, (g - s sum_t g_t).detach()>`` gives the same gradients through one more walk of the heads.

Both add the step's logged loss value (detached, so it carries no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from mtl_lightning.balancers.gradient_sources import TaskGradients
from mtl_lightning.balancers.handover import hand_over as hand_over_gradients
from mtl_lightning.compat import foreach_mul


def head_scale(present: Tensor) -> Tensor:
    """The heads' scale: ``1 / (number of present tasks)``, a 0-dim tensor (1 when no task is present).

    Every balancer gives head t the gradient of its own loss times the weight equal weighting would give it, so
    switching from equal weighting to a gradient method changes what the shared part receives and nothing else:
    a head's effective learning rate does not grow with the number of tasks.
    """
    return 1.0 / present.sum().clamp_min(1).to(torch.float32)


def hand_over(
    grads: TaskGradients,
    weights: Tensor,
    aggregated: Tensor | None,
    value: Tensor,
    scale: Tensor,
    encoder: tuple[Sequence[Tensor], Sequence[Tensor | None]] | None = None,
) -> Tensor:
    """``value`` plus a zero whose backward hands each tensor its update (see the module docstring).

    ``encoder``: the encoder's parameters and their Jacobians ``J_p`` (parameter mode, batched Gramian), to hand the
    encoder ``sum_t w_t J_p[t]`` instead of the representation its gradient.
    """
    targets: list[Tensor]
    target_grads: list[Tensor | None]
    if encoder is not None:
        params, jacobians = encoder
        targets = list(params)
        target_grads = [
            None if jac is None else torch.tensordot(weights.to(jac.dtype), jac, dims=1) for jac in jacobians
        ]
    elif grads.z is not None:
        assert grads.flat is not None  # set by the source whenever z is
        update = weights.to(grads.flat.dtype) @ grads.flat if aggregated is None else aggregated
        targets, target_grads = [grads.z], [update]
    else:  # distinct representations: task t's gets w_t g_t
        targets = list(grads.reps)
        target_grads = [weights[i].to(g.dtype) * g for i, g in enumerate(grads.rep_grads)]
    wanted = [g for g in grads.param_grads if g is not None]
    scaled = iter(foreach_mul(wanted, scale) if wanted else [])
    head_grads = [None if g is None else next(scaled) for g in grads.param_grads]
    return value + hand_over_gradients([*targets, *grads.task_params], [*target_grads, *head_grads])


def surrogate(
    grads: TaskGradients, losses: Tensor, weights: Tensor, aggregated: Tensor | None, value: Tensor, scale: Tensor
) -> Tensor:
    """``value`` plus a zero whose backward walks the heads again: ``s L_t`` for head t, ``g`` for the encoder."""
    scale = scale.to(losses.dtype)
    if grads.z is not None:
        assert grads.flat is not None  # set by the source whenever z is
        # g - s sum_t g_t; for a weighting g = sum_t w_t g_t, so one pass over the rows: (w - s) @ J.
        flat_scale = scale.to(grads.flat.dtype)
        if aggregated is None:
            correction = (weights.to(grads.flat.dtype) - flat_scale) @ grads.flat
        else:
            correction = aggregated - flat_scale * grads.flat.sum(0)
        # Value 0, gradient `correction` on z: the encoder receives the aggregated gradient.
        inner = (grads.z * correction.reshape(grads.z.shape).to(grads.z.dtype).detach()).sum()
    else:
        terms = [
            (r * ((weights[i] - scale) * g).detach().to(g.dtype)).sum()
            for i, (r, g) in enumerate(zip(grads.reps, grads.rep_grads, strict=True))
        ]
        inner = cast(Tensor, sum(terms))  # never sum()'s start value 0: there is at least one task
    total = (losses * scale).sum()
    return value + (total - total.detach()) + (inner - inner.detach())
