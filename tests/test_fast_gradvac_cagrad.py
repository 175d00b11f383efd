"""FastGradVacWeighting / FastCAGradWeighting against TorchJD 0.18's weightings, plus properties."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from test_fast_pcgrad_mgda import DTYPES, FAMILIES, TASKS, _assert_close, _gramian
from torch import Tensor
from torchjd.aggregation import CAGradWeighting, GradVacWeighting

from mtl_lightning.balancers import CAGrad, GradVac
from mtl_lightning.balancers.fast_cagrad import FastCAGradWeighting, cagrad_solve
from mtl_lightning.balancers.fast_gradvac import FastGradVacWeighting, gradvac_step
from mtl_lightning.tasks import TaskSpec

# TorchJD's CAGrad solves with CLARABEL at its default tolerances; the in-project solver is exact (KKT to 1e-10). So
# the objective is compared tightly (never worse; at most 1e-8 better on the normalised problem, whose optimal value
# is O(1)), and the weights only to what CLARABEL's accuracy gives them: the aggregated direction within 1e-2 of its
# norm (measured worst: 5e-3, float32 conflicting T = 64; 2e-4 on random Gramians).
CAGRAD_OBJECTIVE_TOL = 1e-8
CAGRAD_DIRECTION_TOL = 1e-2
# TorchJD's own weightings take seconds at T = 64 (GradVac's T² Python loop, one cvxpy solve per call): that size
# runs with the integration tests.
TASKS_CHECKED = [pytest.param(t, marks=pytest.mark.integration) if t >= 64 else t for t in TASKS]


def _objective(G: np.ndarray, w: np.ndarray, c: float) -> float:
    m = len(w)
    b = G.sum(axis=1) / m
    s = c * math.sqrt(max(float(b.sum()) / m, 0.0))
    return float(b @ w + s * math.sqrt(max(float(w @ G @ w), 0.0)))


def _normalised(gramian: Tensor) -> np.ndarray:
    G = gramian.double().numpy()
    return G / np.trace(G)


def _solution_of(weights: Tensor) -> np.ndarray:
    """The simplex point w* behind CAGrad's weights 1/T + (s / ‖d‖) w* (weights that are not all zero)."""
    u = weights.double().numpy() - 1.0 / len(weights)
    return u / u.sum()


# ------------------------------------------------------------------------------------------------------- GradVac
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", TASKS_CHECKED)
def test_gradvac_matches_torchjd_over_consecutive_steps(tasks: int, family: str, dtype: torch.dtype) -> None:
    reference, fast = GradVacWeighting(beta=0.5), FastGradVacWeighting(beta=0.5)
    for step in range(3 if tasks <= 10 else 2):  # the EMA targets carry over: later steps start from non-zero ones
        gramian = _gramian(family, tasks, dtype, seed=step)
        torch.manual_seed(step)
        expected = reference(gramian)
        after_reference = torch.rand(3)
        torch.manual_seed(step)
        actual = fast(gramian)
        # The same visiting orders, drawn from the global generator: the same RNG state afterwards.
        assert torch.equal(torch.rand(3), after_reference)
        assert actual.shape == (tasks,) and actual.dtype == dtype
        _assert_close(actual, expected)
        assert fast.targets is not None and reference._phi_t is not None
        torch.testing.assert_close(fast.targets, reference._phi_t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradvac_step_is_functional_and_starts_from_the_given_targets(dtype: torch.dtype) -> None:
    gramian = _gramian("conflicting", 6, dtype)
    targets = torch.rand(6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype) * 2 - 1
    reference = GradVacWeighting(beta=0.3)
    reference._phi_t, reference._state_key = targets.clone(), (6, dtype)
    torch.manual_seed(4)
    expected = reference(gramian)
    torch.manual_seed(4)
    before = targets.clone()
    weights, updated = gradvac_step(gramian, targets, beta=0.3, eps=1e-8)
    assert torch.equal(targets, before), "the given targets are not modified"
    _assert_close(weights, expected)
    torch.testing.assert_close(updated, reference._phi_t, atol=1e-6, rtol=0)
    assert torch.equal(updated.diagonal(), before.diagonal())  # a task is never paired with itself


def test_gradvac_module_resets_when_the_task_count_changes() -> None:
    fast = FastGradVacWeighting()
    fast(_gramian("random", 4, torch.float64))
    assert fast.targets is not None and fast.targets.abs().sum() > 0
    fast(_gramian("random", 3, torch.float64))
    assert fast.targets.shape == (3, 3)
    fast.reset()
    assert fast.targets is None


def test_gradvac_balancer_keeps_its_state_in_cosine_targets_for_both_impls() -> None:
    tasks = [TaskSpec(n, "regression") for n in "abcd"]
    balancers = {impl: GradVac(impl=impl) for impl in ("fast", "torchjd")}
    for balancer in balancers.values():
        balancer.bind(tasks)
    for step, present in enumerate(([0, 1, 2, 3], [0, 2, 3], [0, 1, 2, 3])):
        idx = torch.tensor(present)
        gramian = _gramian("conflicting", 4, torch.float32, seed=step)[idx][:, idx]
        weights = {}
        for impl, balancer in balancers.items():
            torch.manual_seed(step)
            weights[impl] = balancer._weigh(gramian, idx)
        _assert_close(weights["fast"], weights["torchjd"])
        torch.testing.assert_close(
            balancers["fast"].cosine_targets, balancers["torchjd"].cosine_targets, atol=1e-6, rtol=0
        )
    # The fast weighting keeps nothing of its own, and a checkpoint of one impl loads into the other.
    assert balancers["fast"].weighting.targets is None  # type: ignore[union-attr]
    assert list(balancers["fast"].state_dict()) == ["cosine_targets"]
    balancers["torchjd"].load_state_dict(balancers["fast"].state_dict())


@pytest.mark.parametrize("kwargs", [{"beta": 1.5}, {"beta": -0.1}, {"eps": -1.0}])
def test_gradvac_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FastGradVacWeighting(**kwargs)


# -------------------------------------------------------------------------------------------------------- CAGrad
def _kkt_residual(G: np.ndarray, w: np.ndarray, c: float) -> float:
    """How far w is from the KKT conditions of CAGrad's problem (0 at the optimum), relative to the gradient."""
    m = len(w)
    b = G.sum(axis=1) / m
    s = c * math.sqrt(float(b.sum()) / m)
    t = math.sqrt(float(w @ G @ w))
    grad = b + (s / t) * (G @ w)
    nu = float(w @ grad)
    support = w > 0
    spread = float(np.abs(grad[support] - nu).max())
    below = float(max(0.0, -(grad[~support] - nu).min())) if (~support).any() else 0.0
    return max(spread, below) / float(np.abs(grad).max())


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the solver converges on every family
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", TASKS_CHECKED)
def test_cagrad_matches_torchjd(tasks: int, family: str, dtype: torch.dtype) -> None:
    gramian = _gramian(family, tasks, dtype)
    expected = CAGradWeighting(c=0.5)(gramian)
    actual = FastCAGradWeighting(c=0.5)(gramian)
    assert actual.shape == (tasks,) and actual.dtype == dtype
    if not expected.any():
        # A (near-)zero task gradient puts the optimum at d = 0: TorchJD's weights are zeros, "on the Pareto front".
        assert not actual.any()
        return
    G = _normalised(gramian)
    ours, theirs = _objective(G, _solution_of(actual), 0.5), _objective(G, _solution_of(expected), 0.5)
    assert -1e-12 <= theirs - ours <= CAGRAD_OBJECTIVE_TOL, f"objective {ours!r} vs TorchJD's {theirs!r}"
    # The aggregated direction A^T w (w's non-unique split among duplicated tasks cancels out).
    delta = (actual.double() - expected.double()).numpy()
    ref = expected.double().numpy()
    assert math.sqrt(max(float(delta @ G @ delta), 0.0)) <= CAGRAD_DIRECTION_TOL * math.sqrt(float(ref @ G @ ref))


@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
def test_cagrad_small_task_gradient_matches_torchjd(tasks: int) -> None:
    # With one gradient near zero (the near_zero_row family above) the optimum is d ~ 0 and both return zeros; a
    # gradient 1e-2 of the others' leaves d* small but above norm_eps: a large weight on that task, on both sides.
    jac = torch.randn(tasks, tasks + 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    jac[0] *= 1e-2
    gramian = jac @ jac.T
    expected, actual = CAGradWeighting(c=0.5)(gramian), FastCAGradWeighting()(gramian)
    assert expected.any() and actual.any()
    G = _normalised(gramian)
    ours, theirs = _objective(G, _solution_of(actual), 0.5), _objective(G, _solution_of(expected), 0.5)
    assert -1e-12 <= theirs - ours <= CAGRAD_OBJECTIVE_TOL
    _assert_close(actual, expected, rtol=CAGRAD_DIRECTION_TOL)


@pytest.mark.parametrize("family", ["random", "rank_deficient", "duplicated", "conflicting"])
@pytest.mark.parametrize("tasks", [2, 3, 10, 40, 64])
@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 2.0])
def test_cagrad_solution_satisfies_kkt(tasks: int, family: str, c: float) -> None:
    G = _normalised(_gramian(family, tasks, torch.float64, seed=5))
    w, converged = cagrad_solve(G, c, 4 * tasks + 20)
    assert converged
    assert (w >= 0).all() and abs(w.sum() - 1.0) <= 1e-12
    if float(w @ G @ w) <= 1e-14:
        # The optimum d = 0 (F = 0, not differentiable there): 0 is in the hull and no vertex does better.
        assert min(_objective(G, np.eye(tasks)[i], c) for i in range(tasks)) >= 0
        return
    assert _kkt_residual(G, w, c) <= 1e-9


@pytest.mark.parametrize("tasks", [3, 10, 40])
def test_cagrad_permutation_equivariant(tasks: int) -> None:
    gramian = _gramian("conflicting", tasks, torch.float64, seed=2)
    perm = torch.randperm(tasks, generator=torch.Generator().manual_seed(0))
    weights = FastCAGradWeighting()(gramian)
    _assert_close(FastCAGradWeighting()(gramian[perm][:, perm]), weights[perm], rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-2, 3.7, 1e3])
def test_cagrad_scale_invariant(scale: float) -> None:
    gramian = _gramian("random", 10, torch.float64, seed=3)
    _assert_close(FastCAGradWeighting()(scale * gramian), FastCAGradWeighting()(gramian), rtol=1e-9)


@pytest.mark.parametrize("c", [0.25, 0.5, 1.5])
def test_cagrad_update_lies_on_the_ball_and_beats_the_mean_on_the_worst_task(c: float) -> None:
    # CAGrad's update g = g0 + s u (‖u‖ = 1) maximises the worst task's improvement min_i <g_i, g> over the ball,
    # which holds the mean gradient g0.
    gramian = _gramian("random", 8, torch.float64, seed=6)
    G = _normalised(gramian)
    weights = FastCAGradWeighting(c=c)(gramian).numpy()
    mean = np.full(8, 1 / 8)
    s = c * math.sqrt(float(mean @ G @ mean))
    assert math.sqrt(float((weights - mean) @ G @ (weights - mean))) == pytest.approx(s, rel=1e-9)
    assert (G @ weights).min() > (G @ mean).min()


def test_cagrad_c_zero_gives_the_mean() -> None:
    gramian = _gramian("random", 5, torch.float64)
    torch.testing.assert_close(FastCAGradWeighting(c=0.0)(gramian), torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(FastCAGradWeighting(c=0.0)(gramian), CAGradWeighting(c=0.0)(gramian))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_single_task_and_tiny_gramian_as_torchjd(dtype: torch.dtype) -> None:
    single = torch.tensor([[2.5]], dtype=dtype)
    torch.testing.assert_close(FastCAGradWeighting()(single), CAGradWeighting(c=0.5)(single))
    tiny = 1e-3 * _gramian("random", 4, dtype)[:, :]  # trace below norm_eps: TorchJD's weights are zeros
    tiny = tiny * (0.5e-4 / float(tiny.trace()))
    assert torch.equal(FastCAGradWeighting()(tiny), torch.zeros(4, dtype=dtype))
    assert torch.equal(CAGradWeighting(c=0.5)(tiny), torch.zeros(4, dtype=dtype))


def test_cagrad_budget_exhaustion_warns_and_stays_finite() -> None:
    gramian = _gramian("random", 10, torch.float64, seed=1)
    with pytest.warns(RuntimeWarning, match=r"CAGrad: .*did not converge within 1 iterations; using its last iterate"):
        weights = FastCAGradWeighting(max_iter=1)(gramian)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    # The fallback is a feasible point that is no worse than the best vertex the solver starts from.
    G = _normalised(gramian)
    start = min(_objective(G, np.eye(10)[i], 0.5) for i in range(10))
    assert _objective(G, _solution_of(weights), 0.5) <= start + 1e-12


def test_cagrad_non_finite_gramian_falls_back_to_the_mean() -> None:
    gramian = _gramian("random", 3, torch.float64)
    gramian[0, 1] = gramian[1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = FastCAGradWeighting()(gramian)
    assert torch.isfinite(weights).all()
    assert any("CAGrad" in str(w.message) for w in caught)


@pytest.mark.parametrize("kwargs", [{"c": -1.0}, {"norm_eps": -1.0}, {"max_iter": 0}])
def test_cagrad_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FastCAGradWeighting(**kwargs)  # type: ignore[arg-type]


def test_cagrad_balancer_default_is_fast_and_needs_no_cvxpy() -> None:
    balancer = CAGrad(c=0.4)
    balancer.bind([TaskSpec(n, "regression") for n in "abc"])
    assert isinstance(balancer.weighting, FastCAGradWeighting) and balancer.weighting.c == 0.4


# ------------------------------------------------------------------------------------------------- both, devices
def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_shape_dtype_device_preserved_and_not_differentiable(device: str, dtype: torch.dtype) -> None:
    gramian = _gramian("conflicting", 5, dtype).to(device).requires_grad_()
    torch.manual_seed(0)
    for weighting in (FastGradVacWeighting(), FastCAGradWeighting()):
        weights = weighting(gramian)
        assert weights.shape == (5,) and weights.dtype == dtype and weights.device == gramian.device
        assert not weights.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_torchjd() -> None:
    gramian = _gramian("conflicting", 40, torch.float32)
    torch.manual_seed(0)
    expected = GradVacWeighting()(gramian)
    torch.manual_seed(0)
    weights, targets = gradvac_step(gramian.cuda(), torch.zeros(40, 40, device="cuda"), 0.5, 1e-8)
    assert weights.is_cuda and targets.is_cuda
    _assert_close(weights.cpu(), expected)
    cagrad = FastCAGradWeighting()(gramian.cuda())
    assert cagrad.is_cuda
    torch.testing.assert_close(cagrad.cpu(), CAGradWeighting(c=0.5)(gramian), atol=1e-3, rtol=1e-2)
