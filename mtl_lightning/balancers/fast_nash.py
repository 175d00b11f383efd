"""Nash-MTL's weights from the Gramian by Newton's method, with no cvxpy problem to build or solve.

Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game") weighs the task gradients by the
``a > 0`` (alpha) with ``G a = 1/a`` elementwise, ``G = J Jᵀ``. The weights depend on the Gramian only, so here the
method is a Gramian weighting: T x T work, DDP-exact through the all-reduced Gramian, and a parameter mode. TorchJD's
``NashMTL`` (``impl: torchjd``, the reference) approaches that point by the authors' sequence of convex problems,
one cvxpy/ECOS solve each. This module finds it as the minimiser of the strictly convex

    f(a) = ½ aᵀ G a - sum_i log a_i,    grad f = G a - 1/a,    Hessian = G + diag(1/a²),

by Newton's method in variables scaled by ``D = diag(a)``: the step is ``a <- a * (1 - t u)`` with
``(D G D + I) u = r``, ``r = a * (G a) - 1`` (the residual of the definition itself). That matrix has every
eigenvalue >= 1, so it is well conditioned even for rank-deficient Gramians.

* Step size: the full step when the Newton decrement ``lambda = sqrt(rᵀ u)`` is below 1/4 (quadratic convergence;
  lambda < 1 keeps ``a > 0``), else the lowest ``f`` among a few step sizes (8 down to 1/8) and the damped step
  ``1/(1 + lambda)``, which always stays positive and decreases ``f`` (f is self-concordant).
* Start: ``a_i = 1/sqrt(G_ii)`` (exact for orthogonal gradients) or the previous solution (a warm start), whichever
  has the lower ``f`` once each is rescaled by its best factor ``sqrt(T / aᵀ G a)``. Newton's iterates are
  equivariant under ``G -> cG``, so no normalisation of ``G`` is needed (TorchJD divides it by its norm).
* Degenerate Gramians: a zero gradient row makes ``G a = 1/a`` unsolvable (its ``a_t`` would be infinite), and so
  does 0 in the cone of the gradients (``f`` unbounded below). A ridge of ``ridge`` (1e-15) times the mean diagonal
  is added for the solve, as if each task had a private direction of that tiny size: such tasks get a large, finite
  weight, and a zero row's gradient adds nothing to the update. Tasks whose gradient norm is above about
  ``sqrt(ridge)`` of the typical one are unaffected to about ``ridge``, relative. The input's rounding can leave a
  singular Gramian slightly indefinite: where its Jacobi-scaled form is not positive definite, ``T eps`` (the input's
  precision) of each diagonal entry is added as well. An all-zero Gramian gets equal weights. On such Gramians
  TorchJD's convex problem fails and it returns its previous weights (ones at first).
* Stopping: when every ``|r_i|`` is within ``tol`` of the rounding it carries (``4 T eps a_i (|G| a)_i``, large when
  opposed gradients cancel in ``G a``), or after ``max_iters`` iterations.

Then, as TorchJD: the raw ``a`` is kept as the warm start and, between two solves (``update_weights_every``), reused;
the weights are ``a`` scaled down to ``‖Jᵀ a‖ = sqrt(aᵀ G a) <= max_norm`` (``max_norm = 0``: no clipping), with
the current Gramian.

If a solve does not converge within the budget (or meets a non-finite Gramian), a warning names the method, the
step and the fallback: the previous weights of the present tasks, equal weights for tasks never solved (TorchJD's
initial state); weights are never NaN. Host synchronisations: on the CPU the loop stops at convergence (a check per
iteration costs nothing there); on an accelerator it runs all ``max_iters`` iterations, freezing the converged
iterate, with no synchronisation: whether the solve converged is copied to the host asynchronously and read at a
later call, which then warns. With ``update_weights_every > 1``, a call that could reuse the weights of an earlier
solve for some tasks only reads both sets of task indices to compare them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FastNashMTLWeighting"]

# Step sizes tried by the line search when the decrement is large, 8 down to 1/8 (besides the damped step): made on
# the device by arange, since a tensor built from a Python list is a host-to-device copy, which waits for the device.
_STEP_EXPONENTS = (3, -4)
# Below this Newton decrement the full step is taken: quadratic convergence, and a stays positive (lambda < 1).
_FULL_STEP_DECREMENT = 0.25


class FastNashMTLWeighting(nn.Module):
    """Gramian weighting giving Nash-MTL's weights: ``a > 0`` with ``G a = 1/a``, then the ``max_norm`` clipping.

    Stateful like TorchJD's: the last solution (the warm start, and the weights reused between solves), the tasks it
    was solved for and the number of calls are buffers, so they are checkpointed with the model.

    :param n_tasks: Number of tasks (the size of the state).
    :param max_norm: Largest norm of the update ``Jᵀ w`` (``0`` disables the clipping), as TorchJD's.
    :param update_weights_every: Solve every this many calls and reuse the weights in between, as TorchJD's.
    :param max_iters: Newton iterations per solve, at most.
    :param tol: How far above its rounding floor the residual ``a * (G a) - 1`` may be when a solve stops.
    :param ridge: Ridge added to the Gramian for the solve, relative to its mean diagonal.
    """

    alpha: Tensor  # (n_tasks,) the last solution, before clipping
    solved: Tensor  # (n_tasks,) bool: the tasks present at the last solve (whose weights are reused)
    calls: Tensor  # () int64: calls so far

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        max_iters: int = 20,
        tol: float = 1e-8,
        ridge: float = 1e-15,
    ) -> None:
        super().__init__()
        if n_tasks <= 0:
            raise ValueError(f"n_tasks must be a positive integer, but got {n_tasks}.")
        if max_norm < 0:
            raise ValueError(f"max_norm must be non-negative, but got {max_norm}.")
        if update_weights_every <= 0:
            raise ValueError(f"update_weights_every must be a positive integer, but got {update_weights_every}.")
        if max_iters <= 0:
            raise ValueError(f"max_iters must be a positive integer, but got {max_iters}.")
        if tol <= 0 or ridge < 0:
            raise ValueError(f"tol must be positive and ridge non-negative, but got {tol} and {ridge}.")
        self.n_tasks, self.max_norm, self.update_weights_every = n_tasks, max_norm, update_weights_every
        self.max_iters, self.tol, self.ridge = max_iters, tol, ridge
        self.register_buffer("alpha", torch.ones(n_tasks))  # TorchJD's initial weights: ones
        self.register_buffer("solved", torch.zeros(n_tasks, dtype=torch.bool))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        # Host copies of `calls` and of whether the last solve had every task (None: no solve yet), so deciding
        # whether to solve reads the device only to compare two subsets of tasks; rebuilt when a checkpoint is loaded.
        self._calls = 0
        self._solved_all: bool | None = None
        self._solved_idx: Tensor | None = None  # the tasks of the last solve when it had a subset
        self._pending: list[tuple[int, Tensor, Any]] = []  # (call, [converged, residual] on the host, CUDA event)

    def reset(self) -> None:
        """Forget the state: the next call solves from the default start, as TorchJD's ``reset``."""
        self.alpha.fill_(1.0)
        self.solved.zero_()
        self.calls.zero_()
        self._calls, self._solved_all, self._solved_idx, self._pending = 0, None, None, []

    def forward(self, gramian: Tensor, idx: Tensor | None = None) -> Tensor:
        """Weights ``(k,)`` of the present tasks ``idx`` (default: all) from their ``(k, k)`` Gramian."""
        self._report_pending()
        call = self._calls
        self._calls += 1
        self.calls.fill_(self._calls)
        all_tasks = idx is None or len(idx) == self.n_tasks
        idx = (
            torch.arange(self.n_tasks, device=self.alpha.device)
            if idx is None or all_tasks
            else idx.to(self.alpha.device)
        )
        if len(idx) != gramian.shape[0]:
            raise ValueError(f"{len(idx)} tasks for a Gramian of shape {tuple(gramian.shape)}")
        dtype = torch.float32 if gramian.device.type == "mps" else torch.float64  # no float64 on MPS
        matrix = gramian.detach().to(dtype)
        previous = self.alpha[idx].to(matrix.device, dtype)
        if not self._reuses(call, idx, all_tasks):
            alpha, converged, error = self._solve(matrix, previous, torch.finfo(gramian.dtype).eps)
            if isinstance(converged, bool):
                if not converged:
                    self._warn(call, float(error))
            else:
                self._defer(call, converged, error)
            self.alpha.index_copy_(0, idx, alpha.to(self.alpha))
            self._solved_all, self._solved_idx = all_tasks, None if all_tasks else idx.clone()
            self.solved.zero_().index_fill_(0, idx, True)
        else:
            alpha = previous
        if self.max_norm > 0:
            # ‖Jᵀ a‖ from the Gramian, where TorchJD computes ‖a @ J‖; a NaN norm (non-finite Gramian) clips nothing.
            norm = (alpha @ matrix @ alpha).clamp_min(0).sqrt()
            alpha = torch.where(norm > self.max_norm, alpha * (self.max_norm / norm), alpha)
        return alpha.to(gramian.dtype)

    def _reuses(self, call: int, idx: Tensor, all_tasks: bool) -> bool:
        """Whether this call reuses the last solve's weights: between two solves, for the same tasks only."""
        if call % self.update_weights_every == 0 or self._solved_all is None:
            return False
        if all_tasks or self._solved_all:
            return all_tasks and self._solved_all
        # Two subsets: compare them (a host read; never with update_weights_every = 1, which returns above).
        assert self._solved_idx is not None  # set with every solve of a subset
        return len(idx) == len(self._solved_idx) and torch.equal(idx, self._solved_idx)

    # ------------------------------------------------------------------------------------------------ the solve
    def _solve(self, gramian: Tensor, previous: Tensor, input_eps: float) -> tuple[Tensor, bool | Tensor, Tensor]:
        """``(alpha, converged, relative residual)``, ``alpha`` being ``previous`` where the solve did not converge.

        ``converged`` is a bool on the CPU and a 0-d tensor on an accelerator (not read here: no sync).
        """
        size = gramian.shape[0]
        scale = gramian.diagonal().mean()
        finite = torch.isfinite(gramian).all()
        # An all-zero Gramian is solved as the identity, whose solution is equal weights (the clipping then uses the
        # real Gramian); a non-finite one too, but as a failure. The ridge keeps zero rows and cones containing 0
        # solvable.
        usable = finite & (scale > 0)
        eye = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        matrix = torch.where(usable, gramian + (self.ridge * scale) * eye, eye)
        # The input's entries carry relative rounding errors of its precision, which can leave a singular Gramian
        # slightly indefinite (f unbounded below): where the Jacobi-scaled matrix is not positive definite to working
        # precision, T times that precision of each diagonal entry is added, which leaves every task's own scale
        # alone (no sync: a select).
        inv_sqrt = matrix.diagonal().rsqrt()
        definite = _positive_definite(matrix * torch.outer(inv_sqrt, inv_sqrt))
        matrix = matrix + torch.diag(torch.where(definite, 0.0, size * input_eps) * matrix.diagonal())
        magnitude = matrix.abs()
        alpha = _start(matrix, previous)
        if gramian.device.type == "cpu":
            alpha, converged, error = _host_loop(matrix, magnitude, alpha, self.max_iters, self.tol)
            converged = converged and bool(finite)
            return (alpha if converged else previous), converged, error
        alpha, done, error = _device_loop(matrix, magnitude, alpha, self.max_iters, self.tol)
        done = done & finite
        return torch.where(done, alpha, previous), done, error

    # ---------------------------------------------------------------------------------------------- reporting
    def _warn(self, call: int, residual: float) -> None:
        warnings.warn(
            f"NashMTL (impl: fast): the Nash bargaining solve did not converge within {self.max_iters} Newton "
            f"iterations at step {call} (call {call + 1} of the weighting; relative residual {residual:.3g} > tol "
            f"{self.tol:g}, or a non-finite Gramian); using the previous weights of these tasks (equal weights for "
            "tasks never solved)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _defer(self, call: int, converged: Tensor, error: Tensor) -> None:
        """Queue an accelerator solve's outcome: copied to the host without waiting, read at a later call."""
        flags = torch.stack([converged.to(error.dtype), error])
        if flags.device.type == "cuda":
            host = flags.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((call, host, event))
        else:  # no event to poll on other accelerators: read (and wait) at the next call
            self._pending.append((call, flags, None))

    def _report_pending(self) -> None:
        """Warn for the queued accelerator solves that did not converge, once their outcome is on the host."""
        still = []
        for call, flags, event in self._pending:
            if event is not None and not event.query():
                still.append((call, flags, event))
                continue
            converged, error = flags.cpu().tolist()
            if not converged:
                self._warn(call, error)
        self._pending = still

    # ------------------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Checkpoints written with impl: torchjd (or before impl existed) hold no Nash state: start afresh then.
        for name, buffer in self.named_buffers(recurse=False):
            state_dict.setdefault(prefix + name, buffer.detach().clone())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._calls = int(self.calls)
        solved = self.solved.nonzero().flatten()
        self._solved_all = None if len(solved) == 0 else len(solved) == self.n_tasks
        self._solved_idx = solved if self._solved_all is False else None
        self._pending = []

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (EMA or SWA copies of the model, spawn) drop the queued outcomes: CUDA events do not copy.
        state = super().__getstate__()
        state["_pending"] = []
        return state

    def extra_repr(self) -> str:
        return (
            f"n_tasks={self.n_tasks}, max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
            f"max_iters={self.max_iters}, tol={self.tol:g}, ridge={self.ridge:g}"
        )


def _row(rows: Tensor, index: Tensor) -> Tensor:
    """``rows[index]`` for a 0-d index tensor without reading it on the host (plain indexing would)."""
    return rows.index_select(0, index.reshape(1)).squeeze(0)


def _positive_definite(matrix: Tensor) -> Tensor:
    """Whether a symmetric matrix with unit diagonal is positive definite to working precision (0-d bool, no sync).

    On the CPU its smallest eigenvalue: Cholesky's ``tril`` runs in parallel there, which takes milliseconds on a
    busy CPU. Elsewhere ``cholesky_ex``, which does not check (eigvalsh checks its result, a host sync).
    """
    if matrix.device.type == "cpu":
        return torch.linalg.eigvalsh(matrix)[0] > matrix.shape[0] * torch.finfo(matrix.dtype).eps
    return torch.linalg.cholesky_ex(matrix)[1] == 0


def _objective(matrix: Tensor, alphas: Tensor) -> Tensor:
    """``f`` at each row of ``alphas`` (k, T); ``+inf`` where a row is not positive."""
    positive = (alphas > 0).all(-1)
    quadratic = 0.5 * ((alphas @ matrix) * alphas).sum(-1)
    logs = torch.where(alphas > 0, alphas, torch.ones_like(alphas)).log().sum(-1)
    return torch.where(positive, quadratic - logs, torch.full_like(quadratic, torch.inf))


def _start(matrix: Tensor, previous: Tensor) -> Tensor:
    """The better (lower ``f``) of the diagonal start and the warm start, each rescaled optimally."""
    size = matrix.shape[0]
    candidates = torch.stack([matrix.diagonal().rsqrt(), previous.clamp_min(torch.finfo(matrix.dtype).tiny)])
    quadratic = ((candidates @ matrix) * candidates).sum(-1)
    # f(s a) is minimal at s = sqrt(T / aᵀ G a); a non-finite warm start (never stored, but cheap to guard) loses.
    candidates = candidates * (size / quadratic).sqrt()[:, None]
    values = _objective(matrix, candidates)
    values = torch.where(torch.isfinite(values), values, torch.full_like(values, torch.inf))
    return _row(candidates, values.argmin())


def _newton_direction(matrix: Tensor, alpha: Tensor, residual: Tensor, sync_free: bool) -> tuple[Tensor, Tensor]:
    """``u`` with ``(D G D + I) u = r`` and the squared Newton decrement ``rᵀ u``.

    The matrix is >= I. ``sync_free`` (the accelerator loop): Cholesky without its check and two triangular solves,
    which read nothing on the host (``solve_ex``'s and ``cholesky_solve``'s checks do). On the CPU, LU: Cholesky's
    ``tril`` runs in parallel there, which takes milliseconds on a busy CPU, and host reads cost nothing.
    """
    system = torch.outer(alpha, alpha).mul_(matrix)
    system.diagonal().add_(1.0)
    if sync_free:
        factor, _ = torch.linalg.cholesky_ex(system)
        half = torch.linalg.solve_triangular(factor, residual[:, None], upper=False)
        direction = torch.linalg.solve_triangular(factor.mT, half, upper=True).squeeze(1)
    else:
        direction, _ = torch.linalg.solve_ex(system, residual)
    return direction, residual @ direction


def _trial_steps(like: Tensor) -> Tensor:
    exponents = torch.arange(*_STEP_EXPONENTS, -1, dtype=like.dtype, device=like.device)
    return torch.exp2(exponents)


def _line_search(matrix: Tensor, alpha: Tensor, direction: Tensor, decrement: Tensor, steps: Tensor) -> Tensor:
    """The iterate of lowest ``f`` among the trial ``steps`` and the damped step (always feasible and descent)."""
    steps = torch.cat([steps, (1.0 / (1.0 + decrement)).reshape(1)])
    trials = alpha * (1.0 - steps[:, None] * direction)
    return _row(trials, _objective(matrix, trials).argmin())


def _relative_residual(matrix: Tensor, magnitude: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """``r = a * (G a) - 1`` and ``max_i (|r_i| - floor_i)``, ``floor_i`` the rounding that ``r_i`` carries.

    ``floor_i = 4 T eps a_i (|G| a)_i``: the rounding of the products that ``(G a)_i`` sums, which cancel in a badly
    scaled or nearly singular Gramian (opposed gradients), so that ``r`` cannot get below it.
    """
    residual = alpha * (matrix @ alpha) - 1.0
    floor = (4 * matrix.shape[0] * torch.finfo(matrix.dtype).eps) * alpha * (magnitude @ alpha)
    return residual, (residual.abs() - floor).max()


def _host_loop(
    matrix: Tensor, magnitude: Tensor, alpha: Tensor, max_iters: int, tol: float
) -> tuple[Tensor, bool, Tensor]:
    """Newton on the CPU: host branches (free there) skip the line search near the solution and stop early."""
    steps = _trial_steps(alpha)
    residual, error = _relative_residual(matrix, magnitude, alpha)
    for _ in range(max_iters):
        if float(error) <= tol:
            break
        direction, decrement2 = _newton_direction(matrix, alpha, residual, sync_free=False)
        if float(decrement2) < _FULL_STEP_DECREMENT**2:
            alpha = alpha * (1.0 - direction)
        else:
            alpha = _line_search(matrix, alpha, direction, decrement2.clamp_min(0).sqrt(), steps)
        residual, error = _relative_residual(matrix, magnitude, alpha)
    finite = bool(torch.isfinite(alpha).all())
    return alpha, finite and float(error) <= tol, error


def _device_loop(
    matrix: Tensor, magnitude: Tensor, alpha: Tensor, max_iters: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Newton with no host synchronisation: ``max_iters`` iterations, iterates frozen once converged."""
    steps = _trial_steps(alpha)
    residual, error = _relative_residual(matrix, magnitude, alpha)
    done = error <= tol
    for _ in range(max_iters):
        direction, decrement2 = _newton_direction(matrix, alpha, residual, sync_free=True)
        searched = _line_search(matrix, alpha, direction, decrement2.clamp_min(0).sqrt(), steps)
        step = torch.where(decrement2 < _FULL_STEP_DECREMENT**2, alpha * (1.0 - direction), searched)
        alpha = torch.where(done, alpha, step)
        residual, error = _relative_residual(matrix, magnitude, alpha)
        done = done | (error <= tol)
    return alpha, done & torch.isfinite(alpha).all(), error
