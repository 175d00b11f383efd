"""Vectorised GradVac weighting on the Gramian.

TorchJD's :class:`torchjd.aggregation.GradVacWeighting` stays the reference; this module exists because that
implementation walks every ordered task pair in a Python double loop (T² iterations, each about twenty tiny tensor
ops and one data-dependent branch), on the CPU. GradVac's correction of task ``i`` visits the other tasks ``j`` in a
random order and each visit depends on the previous one, but the T rows ``i`` are independent of each other. So here
the loop runs over the T - 1 positions of the visiting order and each step updates all T rows at once, with
``torch.where`` in place of the branch, on the Gramian's device.

With the same global RNG state, :class:`FastGradVacWeighting` draws the same visiting orders as TorchJD, so the
weights and the updated EMA targets equal TorchJD's up to floating-point rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FastGradVacWeighting", "gradvac_step"]


def gradvac_step(gramian: Tensor, targets: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """One GradVac call: ``(weights [T], updated EMA cosine targets [T, T])`` from a ``[T, T]`` Gramian.

    ``targets`` holds the EMA targets ``phi_hat`` (TorchJD's ``_phi_t``) the call starts from; it is not modified.
    Both results are in the Gramian's dtype and on its device. Not differentiable, like TorchJD's.
    """
    with torch.no_grad():
        return _gradvac(gramian.detach(), targets.to(gramian), beta, eps)


def _gradvac(gramian: Tensor, phi_t: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    m = gramian.shape[0]
    device, dtype = gramian.device, gramian.dtype
    # TorchJD draws, for each task i in order, ``torch.randperm(T - 1)`` from the global CPU generator and visits
    # ``others[k]`` (the tasks but i, ascending): the same calls in the same order give the same orders.
    perms = torch.stack([torch.randperm(m - 1) for _ in range(m)]) if m > 1 else torch.zeros(m, 0, dtype=torch.long)
    rows = torch.arange(m)
    order = (perms + (perms >= rows[:, None]).long()).to(device)  # order[i, p]: the task row i visits at step p
    rows = rows.to(device)

    # Everything that only depends on the pair (i, j) is gathered once for every position: each pair is visited
    # once per call, so its target phi_hat is the one the call started from.
    phi_hat = phi_t.gather(1, order)
    sqrt_1_hat2 = (1.0 - phi_hat * phi_hat).clamp(min=0.0).sqrt()
    norm_j = gramian.diagonal().clamp(min=0.0).sqrt()[order]
    denom_w = norm_j * sqrt_1_hat2 + eps
    flat = rows[:, None] * m + order  # flat index of (i, order[i, p]) in a [T, T] matrix
    # One contiguous index vector per position: a strided column, or one advanced-indexing gather of all the rows
    # G[order[i, p]] at once ([T-1, T, T]), is many times slower on a CPU than these small index_selects.
    flat_by_pos, order_by_pos = flat.t().contiguous(), order.t().contiguous()
    norm_j, sqrt_1_hat2, denom_w = norm_j.t().contiguous(), sqrt_1_hat2.t().contiguous(), denom_w.t().contiguous()
    phi_hat_by_pos = phi_hat.t().contiguous()

    # Row i of ``coeffs`` holds c_i with g_i^PC = sum_k c_ik g_k (TorchJD's C); row i of ``cg`` is c_i G.
    coeffs = torch.eye(m, dtype=dtype, device=device)
    cg = gramian.clone()  # = I @ G, exactly
    zero = torch.zeros((), dtype=dtype, device=device)
    phis = []
    for p in range(m - 1):
        hat = phi_hat_by_pos[p]
        dot = cg.view(-1).index_select(0, flat_by_pos[p])
        norm_i = (cg * coeffs).sum(dim=1).clamp(min=0.0).sqrt()
        phi = dot / (norm_i * norm_j[p] + eps)
        sqrt_1_phi2 = (1.0 - phi * phi).clamp(min=0.0).sqrt()
        w = norm_i * (hat * sqrt_1_phi2 - phi * sqrt_1_hat2[p]) / denom_w[p]
        # TorchJD corrects only when phi < phi_hat; adding a zero elsewhere leaves its rows bit for bit.
        w = torch.where(phi < hat, w, zero)
        coeffs.view(-1).index_copy_(0, flat_by_pos[p], w)  # c_ij was 0 before its only visit: 0 + w = w
        # TorchJD's ``cG + w * G[j]``, rounded twice as there (addcmul may fuse): GradVac's formulas cancel badly
        # when a corrected gradient nears zero (e.g. collinear tasks), and then every rounding shows.
        cg.add_(w[:, None] * gramian.index_select(0, order_by_pos[p]))
        phis.append(phi)

    updated = phi_t.clone()
    if m > 1:
        new = (1.0 - beta) * phi_hat + beta * torch.stack(phis, dim=1)
        updated.view(-1).index_copy_(0, flat.flatten(), new.flatten())
    return coeffs.sum(dim=0), updated


class FastGradVacWeighting(nn.Module):
    """Gramian weighting giving the weights of GradVac (Wang et al. 2021), as TorchJD 0.18 defines them.

    Called as a module it keeps its EMA targets itself, like TorchJD's weighting (starting from zeros, and again
    whenever the number of tasks or the dtype changes; :meth:`reset` clears them). The balancer instead calls
    :func:`gradvac_step` with the targets it checkpoints (``GradVac.cosine_targets``), so this module's own state is
    a plain attribute, never saved.

    :param beta: EMA decay of the cosine targets, in ``[0, 1]``.
    :param eps: Non-negative constant added to denominators (TorchJD's ``eps``).
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], but got {beta}.")
        if eps < 0.0:
            raise ValueError(f"eps must be non-negative, but got {eps}.")
        self.beta, self.eps = beta, eps
        self.targets: Tensor | None = None

    def reset(self) -> None:
        """Forget the EMA targets: the next call starts from zeros."""
        self.targets = None

    def forward(self, gramian: Tensor) -> Tensor:
        """Return the weights, of shape ``[T]``, for a ``[T, T]`` Gramian (same dtype and device)."""
        m = gramian.shape[0]
        if self.targets is None or self.targets.shape != (m, m) or self.targets.dtype != gramian.dtype:
            self.targets = torch.zeros(m, m, dtype=gramian.dtype, device=gramian.device)
        weights, self.targets = gradvac_step(gramian, self.targets, self.beta, self.eps)
        return weights

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}"
