"""CAGrad weighting on the Gramian with an exact active-set solver instead of cvxpy.

TorchJD's :class:`torchjd.aggregation.CAGradWeighting` stays the reference. It builds and solves a cvxpy problem
(CLARABEL) on every call, which costs milliseconds even for two tasks. Its problem, written with the normalised
Gramian ``G = J Jᵀ / tr(J Jᵀ)`` (TorchJD's ``normalize``; ``G = 0`` when the trace is below ``norm_eps``), is

    min over the simplex of  F(w) = bᵀ w + s · sqrt(wᵀ G w),   b = G 1 / T,   s = c · ‖g0‖ = c · sqrt(1ᵀ G 1) / T,

and the weights are ``1/T + (s / ‖d‖) w*`` with ``‖d‖ = sqrt(w*ᵀ G w*)``, or zeros when ``‖d‖ < norm_eps``.

Here it is solved exactly by a primal active-set method (Wolfe's, as for the min-norm point, with the smooth
objective above). On a face ``S`` of the simplex the stationary point has a closed form: with ``p`` the affine
min-norm point and ``q`` the linear part (one bordered ``(|S|+1)``-square solve for both), ``w = p + q / mu`` where
``mu = s / ‖d‖`` solves ``mu² pᵀGp + 2 mu pᵀGq + qᵀGq = s²``. When that has no positive root, ``F`` decreases without
bound along ``q`` and the method walks along ``q`` to the face's boundary. Each iteration either adds the task with
the most negative reduced gradient or drops a blocking one, ``F`` never increases, and the result satisfies the KKT
conditions to a relative tolerance of 1e-10; so it matches TorchJD's up to CLARABEL's own accuracy.

Where it runs: every iteration chooses an index from the data, so the loop runs on the host, in float64 numpy, on a
copy of the ``T x T`` Gramian: on an accelerator that copy is the call's one host synchronisation (TorchJD's makes the
same copy for cvxpy), and the weights go back with one host-to-device copy. Tensor ops would cost a dispatch (or a
kernel launch and a synchronisation) for each of the few scalar decisions per iteration, for matrices of at most a
few dozen rows.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FastCAGradWeighting", "cagrad_solve"]

# Relative tolerance of the KKT check (reduced gradients) and of the feasibility of a face's stationary point.
_KKT_TOL = 1e-10
# Squared norms of d below this count as zero (the normalised Gramian has trace 1, so entries of order 1 / T).
_ZERO_NORM = 1e-14


def _normalised(gramian: Tensor, norm_eps: float) -> np.ndarray:
    """TorchJD's ``normalize(G, norm_eps)``: ``G / tr(G)``, or zeros when ``tr(G) < norm_eps``; float64 on the host."""
    g = gramian.detach().to("cpu", torch.float64).numpy()
    g = (g + g.T) / 2  # the solver relies on symmetry; a Gramian is symmetric up to its rounding
    trace = float(np.trace(g))
    return np.zeros_like(g) if trace < norm_eps else g / trace


def _face(G: np.ndarray, b: np.ndarray, s: float, idx: np.ndarray) -> tuple[str, np.ndarray]:
    """The minimiser of F on the affine hull of the face ``idx``: ``("min", z)``, or ``("ray", q)`` when F is
    unbounded below there and decreases along ``q`` (with ``1ᵀq = 0``), or ``("fail", _)`` for a singular face."""
    m, n = G.shape[0], len(idx)
    K = np.zeros((n + 1, n + 1))
    K[:n, :n] = G[np.ix_(idx, idx)]
    K[:n, n] = -1.0
    K[n, :n] = 1.0
    rhs = np.zeros((n + 1, 2))
    rhs[n, 0] = 1.0  # p: stationary point of wᵀGw / 2 on {1ᵀw = 1} (the affine min-norm point)
    rhs[:n, 1] = -b[idx]  # q: of bᵀq + qᵀGq / 2 on {1ᵀq = 0}
    try:
        X = np.linalg.solve(K, rhs)
    except np.linalg.LinAlgError:
        return "fail", rhs
    if not np.isfinite(X).all():
        return "fail", rhs
    p, q = np.zeros(m), np.zeros(m)
    p[idx], q[idx] = X[:n, 0], X[:n, 1]
    Gp, Gq = G @ p, G @ q
    alpha, beta, gamma = float(p @ Gp), float(p @ Gq), float(q @ Gq)
    if s * s <= gamma:
        # No mu > 0: along q (a descent direction: bᵀq = -qᵀGq), F's slope tends to sqrt(qᵀGq) (s - sqrt(qᵀGq)) <= 0.
        return "ray", q
    if alpha <= _ZERO_NORM:
        # 0 lies in the face's affine hull (pᵀGp is 0 up to rounding, which may make it negative) and, as
        # s² > qᵀGq, it is the minimiser there: mu -> infinity.
        return "min", p
    mu = (-beta + math.sqrt(beta * beta + alpha * (s * s - gamma))) / alpha
    return "min", p + q / mu


def cagrad_solve(G: np.ndarray, c: float, max_iter: int) -> tuple[np.ndarray, bool]:
    """``(w*, converged)``: the minimiser over the simplex of ``bᵀw + s sqrt(wᵀGw)`` for a normalised float64
    Gramian ``G`` (see the module docstring). Not converged: the last iterate, feasible and the best so far."""
    m = G.shape[0]
    b = G.sum(axis=1) / m
    s = c * math.sqrt(max(float(b.sum()) / m, 0.0))
    w = np.zeros(m)
    if s == 0.0:
        # F = bᵀw is linear: a vertex of least b (cvxpy returns one too; ties are TorchJD's solver's choice).
        w[int(np.argmin(b))] = 1.0
        return w, True
    # Start at the best vertex: F(e_i) = b_i + s sqrt(G_ii).
    w[int(np.argmin(b + s * np.sqrt(np.clip(np.diagonal(G), 0.0, None))))] = 1.0
    support = w > 0
    for _ in range(max_iter):
        Gw = G @ w
        t = math.sqrt(max(float(w @ Gw), 0.0))
        if t * t <= _ZERO_NORM:
            # d = 0, where F = 0 is not differentiable. Reached only when no vertex has F < 0 (the start is the best
            # vertex and F never increases): the minimum, and TorchJD's weights are zeros there.
            return w, True
        grad = b + (s / t) * Gw
        nu = float(w @ grad)  # the common reduced gradient on the support at a face's stationary point
        slack = np.where(support, np.inf, grad - nu)
        j = int(np.argmin(slack))
        if slack[j] >= -_KKT_TOL * float(np.abs(grad).max()):
            return w, True
        support[j] = True
        # Minimise on the face, walking to its boundary and dropping blocking tasks until the stationary point is
        # feasible. Every pass drops one task, so this inner walk takes at most |S| passes.
        while True:
            kind, z = _face(G, b, s, np.flatnonzero(support))
            if kind == "fail":
                # Affinely dependent face (a task all but in the others' hull): its reduced gradient was a rounding
                # artefact; leave it out and stop with the current, KKT-optimal-to-rounding point.
                support[j] = False
                return w, True
            direction = z - w if kind == "min" else z
            shrinking = support & (direction < 0)
            ratios = np.full(m, np.inf)
            ratios[shrinking] = w[shrinking] / -direction[shrinking]
            block = int(np.argmin(ratios))
            step = float(ratios[block])
            if kind == "min" and step >= 1.0:
                w = np.where(support, np.clip(z, 0.0, None), 0.0)
                w /= w.sum()  # z is feasible to rounding: keep it exactly on the simplex
                break
            if not math.isfinite(step):
                return w, False  # a ray with no blocking task cannot happen on a bounded simplex: give up safely
            support[block] = False
            w = np.where(support, np.clip(w + step * direction, 0.0, None), 0.0)
            if not support.any():
                return w, False
            w /= w.sum()
    return w, False


class FastCAGradWeighting(nn.Module):
    """Gramian weighting giving the weights of CAGrad (Liu et al. 2021), as TorchJD 0.18 defines them.

    :param c: Radius of the ball around the mean gradient, relative to its norm (TorchJD's ``c``, non-negative).
    :param norm_eps: Below this trace the Gramian counts as zero, and below this ``‖d‖`` the weights are zeros
        (TorchJD's ``norm_eps``).
    :param max_iter: Active-set iterations allowed (default ``4 T + 20``; each adds or drops one task). Past it a
        ``RuntimeWarning`` names the method and the fallback: the last iterate, which is feasible and the best so far.
    """

    def __init__(self, c: float = 0.5, norm_eps: float = 1e-4, max_iter: int | None = None) -> None:
        super().__init__()
        if c < 0.0:
            raise ValueError(f"c must be non-negative, but got {c}.")
        if norm_eps < 0.0:
            raise ValueError(f"norm_eps must be non-negative, but got {norm_eps}.")
        if max_iter is not None and max_iter <= 0:
            raise ValueError(f"max_iter must be a positive integer, but got {max_iter}.")
        self.c, self.norm_eps, self.max_iter = c, norm_eps, max_iter

    def forward(self, gramian: Tensor) -> Tensor:
        """Return the weights, of shape ``[T]``, for a ``[T, T]`` Gramian (same dtype and device)."""
        m = gramian.shape[0]
        with torch.no_grad():
            G = _normalised(gramian, self.norm_eps)
            if not np.isfinite(G).all():
                warnings.warn(
                    "CAGrad: non-finite Gramian; using the mean weights instead", RuntimeWarning, stacklevel=2
                )
                return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
            budget = 4 * m + 20 if self.max_iter is None else self.max_iter
            w, converged = cagrad_solve(G, self.c, budget)
            norm = math.sqrt(max(float(w @ G @ w), 0.0))
            s = self.c * math.sqrt(max(float(G.sum()), 0.0)) / m
            # TorchJD: below norm_eps "we are approximately on the Pareto front" and the weights are zeros.
            weights = np.full(m, 1.0 / m) + (s / norm) * w if norm >= self.norm_eps else np.zeros(m)
            if not converged:
                warnings.warn(
                    f"CAGrad: the active-set solver did not converge within {budget} iterations; using its last "
                    "iterate (feasible, the best so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if not np.isfinite(weights).all():
                warnings.warn(
                    "CAGrad: non-finite weights; using the mean weights instead", RuntimeWarning, stacklevel=2
                )
                weights = np.full(m, 1.0 / m)
        return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c}, norm_eps={self.norm_eps}, max_iter={self.max_iter}"
