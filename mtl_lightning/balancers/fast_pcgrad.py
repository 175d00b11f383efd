"""Vectorised PCGrad weighting on the Gramian.

TorchJD's :class:`torchjd.aggregation.PCGradWeighting` stays the reference; this module exists because that
implementation runs a T x T Python double loop with one host-synchronising comparison per pair (and moves the
Gramian to the CPU to make those cheap). Here the loop over the position in the permutation is kept (it is
sequential by nature) but each step updates all T task rows at once, so the Python loop is T steps instead of
T^2 and the work stays on the Gramian's device without synchronisation.

With the same global RNG state, :class:`FastPCGradWeighting` draws the same permutations as TorchJD and returns
the same weights up to floating-point rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FastPCGradWeighting"]


class FastPCGradWeighting(nn.Module):
    """Gramian weighting giving the weights of PCGrad (Yu et al. 2020), as TorchJD 0.18 defines them.

    For task i, ``w_i`` starts at ``e_i``; for each ``j`` of a random permutation of the tasks (``j != i``), if
    ``w_iᵀ G e_j < 0`` the projection of ``g_i^{PC}`` onto the normal plane of ``g_j`` is applied in weight space:
    ``w_i <- w_i - (w_iᵀ G e_j / G_jj) e_j``. The result is ``sum_i w_i``. Like TorchJD's, it is not differentiable.
    """

    def forward(self, gramian: Tensor) -> Tensor:
        """Return the weights, of shape ``[T]``, for a ``[T, T]`` Gramian (same dtype and device)."""
        with torch.no_grad():
            return _pcgrad_weights(gramian)


def _pcgrad_weights(gramian: Tensor) -> Tensor:
    dimension = gramian.shape[0]
    # Same draws as TorchJD: one ``torch.randperm(T)`` per task, in task order, on the global CPU generator
    # (TorchJD calls it without device/generator), so seeding the global RNG reproduces TorchJD's order.
    perms = torch.stack([torch.randperm(dimension) for _ in range(dimension)]).to(gramian.device)

    rows = torch.arange(dimension, device=gramian.device)
    diag = gramian.diagonal()
    # Row i holds the current weights of g_i^{PC}; all rows are updated together at each permutation position.
    current = torch.eye(dimension, dtype=gramian.dtype, device=gramian.device)
    zero = torch.zeros((), dtype=gramian.dtype, device=gramian.device)
    for k in range(dimension):
        j = perms[:, k]
        inner = (gramian[j] * current).sum(dim=1)  # <g_i^{PC}, g_j> for every row i
        # TorchJD skips j == i and projects only on a strict conflict; it has no epsilon, and a zero row never
        # projects because its inner product is exactly 0. ``where`` discards the 0/0 of untaken branches.
        take = (inner < 0.0) & (j != rows)
        step = torch.where(take, inner / diag[j], zero)
        current[rows, j] = current[rows, j] - step
    return current.sum(dim=0)
