"""FastNashMTLWeighting (Nash-MTL by Newton's method on the Gramian) against its definition and TorchJD 0.18's NashMTL.

TorchJD's aggregator takes the Jacobian and approximates the solution by a few convex (cvxpy) steps, so the
comparison is to the accuracy either side reaches: the distance between the two is bounded by the sum of their
residuals ``max_i |a_i (G a)_i - 1|`` (measured: at most 0.74 of that sum, on every case below where TorchJD
converges). The definition ``G a = 1/a`` itself is checked to the solver's own tolerance.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from test_fast_pcgrad_mgda import _jacobian
from torch import Tensor, nn

from mtl_lightning import MultiTaskModule
from mtl_lightning.balancers import NashMTL
from mtl_lightning.balancers.base import BalanceInput
from mtl_lightning.balancers.fast_nash import FastNashMTLWeighting, _device_loop, _host_loop, _start
from mtl_lightning.balancers.gradient_methods import _fast_impls
from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

# cvxpy notes that TorchJD's problem is not DPP (re-solves are not faster): TorchJD's formulation, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")

FAMILIES = ("random", "rank_deficient", "near_zero_row", "zero_row", "duplicated", "conflicting")
SOLVABLE = ("random", "duplicated", "conflicting")  # G a = 1/a has an exact solution (checked below)
# TorchJD's residual below which it is taken to have converged (its CCP iterations stop on a step size instead).
TORCHJD_CONVERGED = 1e-4


def _residual(gramian: Tensor, weights: Tensor) -> float:
    """``max_i |a_i (G a)_i - 1|`` in float64: how far ``a`` is from the definition."""
    g, a = gramian.double(), weights.double()
    return float((a * (g @ a) - 1).abs().max())


def _floor(gramian: Tensor, weights: Tensor, eps: float) -> Tensor:
    """The rounding ``a_i (G a)_i`` carries when its products cancel (the solver's own floor, see fast_nash)."""
    g, a = gramian.double(), weights.double()
    return 4 * len(a) * eps * a * (g.abs() @ a)


def _nash(gramian: Tensor, **kwargs: object) -> Tensor:
    """The raw solution (no clipping) from a fresh weighting, with no warning allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return FastNashMTLWeighting(len(gramian), max_norm=0.0, **kwargs)(gramian)  # type: ignore[arg-type]


def _torchjd(jac: Tensor, max_norm: float = 0.0, every: int = 1) -> nn.Module:
    from torchjd.aggregation import NashMTL as TorchJDNashMTL

    return TorchJDNashMTL(n_tasks=len(jac), max_norm=max_norm, update_weights_every=every, optim_niter=20).weighting


# ------------------------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", SOLVABLE)
@pytest.mark.parametrize("tasks", [2, 3, 10, 40, 64])
def test_solution_satisfies_the_definition(tasks: int, family: str, dtype: torch.dtype) -> None:
    jac = _jacobian(family, tasks, dtype)
    gramian = jac @ jac.T
    weights = _nash(gramian)
    assert weights.shape == (tasks,) and weights.dtype == dtype and bool((weights > 0).all())
    # float64: within the default tol (1e-8) of the rounding floor. float32: the weights' own rounding adds eps32.
    eps = torch.finfo(dtype).eps
    residual = (weights.double() * (gramian.double() @ weights.double()) - 1).abs()
    bound = 1e-8 + _floor(gramian, weights, eps) + (4 * eps if dtype == torch.float32 else 0)
    assert bool((residual <= bound).all()), f"residual {float(residual.max()):.3g}"
    if family == "random" and dtype == torch.float64:
        assert _residual(gramian, weights) < 1e-9


@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
def test_zero_row_gets_a_finite_weight_and_leaves_the_others_exact(tasks: int) -> None:
    # G a = 1/a has no solution with a zero gradient; the ridge (1e-15 of the mean diagonal) gives it a finite
    # weight, and, its row and column being zero, the other tasks get the solution of their own Gramian.
    jac = _jacobian("zero_row", tasks)
    weights = _nash(jac @ jac.T)
    assert bool(torch.isfinite(weights).all() & (weights > 0).all())
    if tasks > 1:
        rest = _nash(jac[:-1] @ jac[:-1].T)
        torch.testing.assert_close(weights[:-1], rest, rtol=1e-9, atol=0)
    ridge = 1e-15 * float((jac @ jac.T).diagonal().mean())
    assert float(weights[-1]) == pytest.approx(ridge**-0.5, rel=1e-6)


@pytest.mark.parametrize("family", ["rank_deficient", "near_zero_row"])
@pytest.mark.parametrize("tasks", [2, 3, 10, 40, 64])
def test_degenerate_gramians_give_finite_positive_weights(tasks: int, family: str) -> None:
    for dtype in (torch.float32, torch.float64):
        for seed in range(3):
            jac = _jacobian(family, tasks, dtype, seed)
            weights = _nash(jac @ jac.T)  # no warning: the ridge makes every such system solvable
            assert bool(torch.isfinite(weights).all() & (weights > 0).all())


def test_all_zero_gramian_gives_equal_weights() -> None:
    weights = _nash(torch.zeros(4, 4))
    torch.testing.assert_close(weights, torch.ones(4))


def test_single_task() -> None:
    # a = 1/|g|, and |Jᵀ a| = 1 is within max_norm = 1: no clipping
    weights = FastNashMTLWeighting(1)(torch.tensor([[4.0]]))
    torch.testing.assert_close(weights, torch.tensor([0.5]))


@pytest.mark.parametrize("tasks", [2, 10, 40])
def test_scale_and_permutation_equivariant(tasks: int) -> None:
    jac = _jacobian("random", tasks, seed=2)
    gramian = jac @ jac.T
    weights = _nash(gramian)
    for scale in (1e-6, 0.3, 1e4):  # G -> cG: a -> a / sqrt(c)
        torch.testing.assert_close(_nash(scale * gramian), weights / scale**0.5, rtol=1e-9, atol=0)
    perm = torch.randperm(tasks, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_nash(gramian[perm][:, perm]), weights[perm], rtol=1e-9, atol=0)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1.0, 100.0])
def test_max_norm_clips_the_update_as_torchjd(max_norm: float) -> None:
    jac = _jacobian("random", 5)
    gramian = jac @ jac.T
    raw = _nash(gramian)
    weights = FastNashMTLWeighting(5, max_norm=max_norm)(gramian)
    # at the solution |Jᵀ a|² = aᵀ G a = sum_i a_i (G a)_i = T
    norm = float((weights @ jac).norm())
    if 0 < max_norm < 5**0.5:
        assert norm == pytest.approx(max_norm, rel=1e-9)
        torch.testing.assert_close(weights, raw * max_norm / 5**0.5, rtol=1e-8, atol=0)
    else:
        torch.testing.assert_close(weights, raw, rtol=0, atol=0)
    torch.testing.assert_close(weights, _torchjd(jac, max_norm)(jac), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ TorchJD
def _compare_with_torchjd(tasks: int, family: str, dtype: torch.dtype, seed: int = 0) -> None:
    jac = _jacobian(family, tasks, dtype, seed)
    gramian = jac @ jac.T
    ours = _nash(gramian)
    theirs = _torchjd(jac)(jac)
    ours_res, theirs_res = _residual(gramian, ours), _residual(gramian, theirs)
    assert family != "random" or theirs_res <= TORCHJD_CONVERGED  # so that the comparison is not vacuous
    if theirs_res > TORCHJD_CONVERGED:
        # TorchJD's convex problem failed (it then returns its previous weights: ones) or its 20 steps stopped short
        # (docs/benchmarks.md lists where): nothing to compare.
        assert bool(torch.isfinite(ours).all() & (ours > 0).all())
        return
    distance = float((ours.double() - theirs.double()).abs().max() / ours.double().abs().max())
    assert distance <= ours_res + theirs_res, f"{distance:.3g} vs residuals {ours_res:.3g} + {theirs_res:.3g}"


@pytest.mark.parametrize("family", ["random", "rank_deficient", "duplicated", "conflicting"])
@pytest.mark.parametrize("tasks", [2, 3, 10])
def test_matches_torchjd(tasks: int, family: str) -> None:
    _compare_with_torchjd(tasks, family, torch.float64)


def test_matches_torchjd_at_40_tasks() -> None:
    _compare_with_torchjd(40, "random", torch.float64)


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
def test_matches_torchjd_everywhere(tasks: int, family: str, dtype: torch.dtype) -> None:
    # About a minute: TorchJD takes up to 4 s per call at T = 40.
    for seed in range(2):
        _compare_with_torchjd(tasks, family, dtype, seed)


def test_reuses_weights_between_solves_like_torchjd() -> None:
    jacs = [_jacobian("random", 4, seed=s) for s in range(7)]
    ours, theirs = FastNashMTLWeighting(4, max_norm=1.0, update_weights_every=3), _torchjd(jacs[0], 1.0, every=3)
    raws = []
    for step, jac in enumerate(jacs):
        gramian = jac @ jac.T
        weights = ours(gramian)
        raws.append(ours.alpha.clone())
        if step < 3:  # a solve, then its weights reused and clipped with the current Gramian, as TorchJD does
            torch.testing.assert_close(weights, theirs(jac), rtol=1e-6, atol=0, msg=f"step {step}")
        # (TorchJD's warm-started re-solves fail on some Gramians, keeping its previous weights: not compared)
        raw = _nash(gramian) if step % 3 == 0 else raws[-1].double()
        norm = (raw @ gramian @ raw).sqrt()
        torch.testing.assert_close(weights, raw / norm.clamp_min(1.0), rtol=1e-6, atol=0, msg=f"step {step}")
    # solved at calls 0, 3, 6; reused in between
    assert torch.equal(raws[0], raws[1]) and torch.equal(raws[1], raws[2]) and not torch.equal(raws[2], raws[3])
    assert torch.equal(raws[3], raws[5]) and not torch.equal(raws[5], raws[6])
    assert int(ours.calls) == 7


# -------------------------------------------------------------------------------------------- absent tasks
def test_absent_tasks_solve_their_own_problem_and_keep_the_others_state() -> None:
    jac = _jacobian("random", 4, seed=5)
    gramian = jac @ jac.T
    weighting = FastNashMTLWeighting(4, max_norm=0.0, update_weights_every=10)
    full = weighting(gramian)
    sub = torch.tensor([0, 2, 3])
    weights = weighting(gramian[sub][:, sub], sub)  # a new set of tasks: solved now, not reused
    torch.testing.assert_close(weights, _nash(gramian[sub][:, sub]), rtol=1e-9, atol=0)
    assert weighting.alpha[1] == full[1].float() and weighting.solved.tolist() == [True, False, True, True]
    other = _jacobian("random", 4, seed=7)
    other_sub = (other @ other.T)[sub][:, sub]
    torch.testing.assert_close(weighting(other_sub, sub), weights, rtol=1e-7, atol=0)  # the same subset: reused
    assert not torch.allclose(weighting(other_sub, torch.tensor([0, 1, 3])), weights)  # another subset: solved
    # back to every task within the update period: a new set again, so a new solve (not the subset's weights)
    torch.testing.assert_close(weighting(gramian), full, rtol=1e-9, atol=0)
    # and the same set again: reused
    jac2 = _jacobian("random", 4, seed=6)
    torch.testing.assert_close(weighting(jac2 @ jac2.T), weighting.alpha.double(), rtol=1e-7, atol=0)


def test_balancer_weights_absent_tasks_zero() -> None:
    balancer = NashMTL()
    balancer.bind([TaskSpec(n, "regression") for n in "abc"])
    jac = _jacobian("random", 3, torch.float32, seed=1)
    for present in ([True, True, True], [True, False, True], [False, True, True], [True, True, True]):
        mask = torch.tensor(present)
        z = torch.randn(1, jac.shape[1], generator=torch.Generator().manual_seed(0)).requires_grad_()
        losses = (z @ jac.T)[0] * mask.float()
        out = balancer(BalanceInput(losses, mask, dict.fromkeys("abc", z)))
        out.loss.backward()
        assert z.grad is not None and bool(torch.isfinite(z.grad).all())
        assert bool((out.weights[~mask] == 0).all())
        sub = jac[mask]
        expected = FastNashMTLWeighting(len(sub))(sub @ sub.T)
        torch.testing.assert_close(out.weights[mask], expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------- checkpoints
def test_state_round_trips_through_a_checkpoint() -> None:
    jacs = [_jacobian("random", 3, seed=s) for s in range(4)]
    weighting = FastNashMTLWeighting(3, update_weights_every=2)
    weighting(jacs[0] @ jacs[0].T)
    restored = FastNashMTLWeighting(3, update_weights_every=2)
    restored.load_state_dict(weighting.state_dict())  # strict
    assert set(weighting.state_dict()) == {"alpha", "solved", "calls"}
    for jac in jacs[1:]:  # call 1 reuses the weights of call 0 on both, call 2 solves warm-started
        torch.testing.assert_close(restored(jac @ jac.T), weighting(jac @ jac.T), rtol=0, atol=0)


def test_checkpoints_without_nash_state_load() -> None:
    # impl: torchjd keeps no state in the state dict (nor did NashMTL before impl existed): start afresh.
    reference, fast = NashMTL(impl="torchjd"), NashMTL()
    tasks = [TaskSpec(n, "regression") for n in "ab"]
    reference.bind(tasks)
    fast.bind(tasks)
    assert not list(reference.state_dict()) and "weighting.alpha" in fast.state_dict()
    fast.load_state_dict(reference.state_dict())  # strict
    reference.load_state_dict(fast.state_dict(), strict=False)
    assert isinstance(fast.weighting, FastNashMTLWeighting) and int(fast.weighting.calls) == 0


# --------------------------------------------------------------------------------------- non-convergence
def test_non_convergence_warns_and_falls_back_to_equal_then_previous_weights() -> None:
    jac = _jacobian("conflicting", 6)
    gramian = jac @ jac.T
    weighting = FastNashMTLWeighting(6, max_norm=0.0, max_iters=1)
    with pytest.warns(RuntimeWarning, match=r"NashMTL \(impl: fast\).*within 1 Newton iterations at step 0.*equal"):
        weights = weighting(gramian)
    torch.testing.assert_close(weights, torch.ones(6, dtype=torch.float64))
    weighting.max_iters = 20
    solved = weighting(gramian)
    weighting.max_iters = 1
    other = _jacobian("random", 6, seed=9)
    with pytest.warns(RuntimeWarning, match="at step 2.*previous weights"):
        fallback = weighting(1e6 * (other @ other.T))
    torch.testing.assert_close(fallback, solved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gramian_never_gives_nan_weights(bad: float) -> None:
    gramian = torch.eye(3)
    gramian[0, 1] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        weights = FastNashMTLWeighting(3)(gramian)
    assert bool(torch.isfinite(weights).all())


def test_device_loop_matches_the_host_loop() -> None:
    # The accelerator path (no host sync: fixed budget, converged iterates frozen), run on the CPU.
    for family in FAMILIES:
        for tasks in (3, 12):
            jac = _jacobian(family, tasks)
            g = jac @ jac.T
            matrix = g + 1e-15 * g.diagonal().mean() * torch.eye(tasks, dtype=g.dtype)
            start = _start(matrix, torch.ones(tasks, dtype=g.dtype))
            host, converged, _ = _host_loop(matrix, matrix.abs(), start, 20, 1e-8)
            device, done, _ = _device_loop(matrix, matrix.abs(), start, 20, 1e-8)
            assert converged and bool(done)
            # The same iterates up to the rounding of two linear solvers (LU here, Cholesky there): equal where the
            # solution is well determined; elsewhere (0 in the cone of the gradients, a ridge of 1e-15 holding
            # a ~ 1e7) both are within the stopping rule of their own solution.
            if family in SOLVABLE:
                torch.testing.assert_close(device, host, rtol=1e-9, atol=0)


def test_device_loop_reads_nothing_on_the_host() -> None:
    # What would synchronise on an accelerator shows on the CPU as aten::_local_scalar_dense (item, bool, float).
    jac = _jacobian("conflicting", 10)
    matrix = jac @ jac.T
    start = _start(matrix, torch.ones(10, dtype=matrix.dtype))
    with torch.profiler.profile() as prof:
        _device_loop(matrix, matrix.abs(), start, 20, 1e-8)
    assert not [e for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::nonzero")]


def test_deferred_warning_of_an_accelerator_solve() -> None:
    # The outcome of an accelerator solve is queued and reported at the next call (here with no CUDA event).
    weighting = FastNashMTLWeighting(2)
    weighting._defer(4, torch.tensor(False), torch.tensor(0.5, dtype=torch.float64))
    assert not copy.deepcopy(weighting)._pending  # a copy of the model (EMA, SWA) leaves the queue behind
    with pytest.warns(RuntimeWarning, match="at step 4"):
        weighting(torch.eye(2))
    assert not weighting._pending


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_no_sync() -> None:
    jac = _jacobian("conflicting", 10, torch.float32)
    gramian = jac @ jac.T
    cpu = FastNashMTLWeighting(10)(gramian)
    weighting = FastNashMTLWeighting(10).cuda()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        cuda = weighting(gramian.cuda())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- balancer
def test_impl_and_mode_options() -> None:
    assert NashMTL().impl == "fast" and NashMTL().mode == "representation"
    with pytest.raises(ConfigError, match=r"impl='torchjd'.*no parameter mode; use impl: fast"):
        NashMTL(impl="torchjd", mode="parameter")
    with pytest.raises(ConfigError, match="unknown impl"):
        NashMTL(impl="cvxpy")  # type: ignore[arg-type]
    # the YAML's positional order is kept: max_norm, update_weights_every, optim_niter, ddp_exact, telemetry, ...
    balancer = NashMTL(2.0, 3, 7)
    balancer.bind([TaskSpec(n, "regression") for n in "ab"])
    weighting = balancer.weighting
    assert isinstance(weighting, FastNashMTLWeighting)
    assert (weighting.max_norm, weighting.update_weights_every, weighting.max_iters) == (2.0, 3, 7)


def test_benchmark_pair_is_sized_to_the_tasks() -> None:
    reference, fast = _fast_impls()["NashMTL"]
    assert isinstance(fast(num_tasks=5), FastNashMTLWeighting) and reference(num_tasks=5).n_tasks == 5


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(3)])
        self.x, self.y = torch.randn(16, 4), torch.randn(16, 3)

    def forward(self) -> tuple[Tensor, Tensor]:
        z = self.encoder(self.x)
        return z, torch.stack(
            [nn.functional.mse_loss(h(z).squeeze(-1), self.y[:, t]) for t, h in enumerate(self.heads)]
        )


def test_parameter_mode_weighs_the_parameter_gramian() -> None:
    model = _Tiny()
    balancer = NashMTL(mode="parameter")
    balancer.bind([TaskSpec(n, "regression") for n in "abc"], model.encoder)
    z, losses = model()
    params = list(model.encoder.parameters())
    jtheta = torch.stack(
        [torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    )
    out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))
    out.loss.backward()
    expected = FastNashMTLWeighting(3)(jtheta @ jtheta.T)
    torch.testing.assert_close(out.weights, expected, rtol=1e-5, atol=0)
    update = torch.cat([p.grad.flatten() for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(update, expected @ jtheta, rtol=1e-4, atol=1e-7)


def _train(impl: str, root: Path) -> tuple[float, dict[str, Tensor]]:
    """Six steps of a small MultiTaskModule (MLP, three tasks, one with missing labels) under NashMTL(impl)."""
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]
    data = SyntheticDataModule(tasks, num_samples=512, num_features=8, missing_rate=0.2, batch_size=64, num_workers=0)
    torch.manual_seed(0)
    module = MultiTaskModule(MLPEncoder((8,), hidden=[16]), tasks, balancer=NashMTL(impl=impl))  # type: ignore[arg-type]
    trainer = Trainer(
        default_root_dir=root,
        max_steps=6,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return float(trainer.callback_metrics["train/loss"]), module.state_dict()


def test_training_with_either_impl_gives_close_losses(tmp_path: Path) -> None:
    (fast_loss, fast), (reference_loss, reference) = (_train(impl, tmp_path / impl) for impl in ("fast", "torchjd"))
    assert fast_loss == pytest.approx(reference_loss, rel=1e-4)
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(fast[name], value, atol=1e-5, rtol=1e-4, msg=name)
