"""Hand precomputed gradients to tensors through Lightning's ordinary ``backward()``.

A gradient method computes, before Lightning's backward, the gradient of every task loss w.r.t. the shared
representation and, in the same backward through the heads, the heads' own parameter gradients. Rebuilding a scalar
whose backward walks the heads again to reproduce them would pay the heads' backward twice. :func:`hand_over`
instead returns a zero-valued scalar whose backward gives each tensor its precomputed gradient times the incoming
gradient: the scale Lightning puts on the loss (1, ``1/accumulate_grad_batches``, the AMP loss scale) reaches every
gradient exactly as a real backward would, and DDP's hooks fire on the parameters' ``AccumulateGrad`` as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_lightning.compat import foreach_mul


class _HandOver(torch.autograd.Function):
    """Zero scalar; its backward returns ``grads[i] * grad_output`` for ``tensors[i]``."""

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor | None, ...], *tensors: Tensor) -> Tensor:
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        pairs = enumerate(zip(ctx.grads, ctx.needs_input_grad[1:], strict=True))
        wanted = [i for i, (grad, needed) in pairs if needed and grad is not None]
        out: list[Tensor | None] = [None] * (1 + len(ctx.grads))  # the first for `grads`
        # One fused multiply for every tensor (the optimizers' foreach kernels): the heads have many small ones. The
        # scale is a 0-dim tensor, so each product keeps its gradient's dtype, and a float16 gradient under a large
        # loss scale saturates exactly where a real backward in float16 would.
        scaled = foreach_mul([ctx.grads[i] for i in wanted], grad_output) if wanted else []
        for i, grad in zip(wanted, scaled, strict=True):
            out[1 + i] = grad
        ctx.grads = None  # free the gradients once handed over
        return tuple(out)


def hand_over(tensors: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """A zero-valued float32 scalar whose backward adds ``grads[i]`` (scaled) to ``tensors[i]``'s gradient.

    ``grads[i]`` must have ``tensors[i]``'s shape; ``None`` hands nothing to that tensor.
    """
    if len(tensors) != len(grads) or not tensors:
        raise ValueError("hand_over: give one gradient (or None) per tensor, and at least one tensor")
    return _HandOver.apply(tuple(_as_gradient_of(t, g) for t, g in zip(tensors, grads, strict=True)), *tensors)


def _as_gradient_of(tensor: Tensor, grad: Tensor | None) -> Tensor | None:
    """``grad`` detached, in ``tensor``'s dtype and shape; no op where it already is (the heads have many tensors)."""
    if grad is None:
        return None
    if grad.requires_grad:
        grad = grad.detach()
    if grad.dtype != tensor.dtype:
        grad = grad.to(tensor.dtype)
    return grad if grad.shape == tensor.shape else grad.reshape(tensor.shape)


def leaves_outside(roots: Tensor, stops: Sequence[Tensor], known: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that ``roots`` reach without passing through ``stops`` and are not in ``known``.

    Used once per run to check that the heads' parameters are every parameter the task losses reach downstream of
    the representation: a parameter missing from the hand-over would silently get no gradient.
    """
    stop_nodes = {id(s.grad_fn) for s in stops if s.grad_fn is not None}
    stop_leaves = {id(s) for s in stops if s.grad_fn is None}
    known_ids = {id(p) for p in known} | stop_leaves
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    pending = [roots.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen or id(node) in stop_nodes:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(variable, Tensor) and id(variable) not in known_ids:
            found[id(variable)] = variable
        pending.extend(next_node for next_node, _ in node.next_functions)
    return list(found.values())
