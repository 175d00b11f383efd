"""FastPCGradWeighting / FastMGDAWeighting against TorchJD 0.18's weightings, plus properties."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import MGDAWeighting, PCGradWeighting

from mtl_lightning.balancers.fast_mgda import FastMGDAWeighting
from mtl_lightning.balancers.fast_pcgrad import FastPCGradWeighting

TASKS = (2, 3, 10, 40, 64)
FAMILIES = ("random", "rank_deficient", "near_zero_row", "zero_row", "duplicated", "conflicting")
DTYPES = (torch.float32, torch.float64)
# Both sides run the same floating-point operations (bit-identical for MGDA with T > 2; PCGrad differs only in the
# summation order of its dot products), so 1e-6 of the weights' scale holds in float32 as well as float64.
RTOL = 1e-6


def _jacobian(family: str, tasks: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """A Jacobian of the named family (shared by the fast weightings' tests)."""
    gen = torch.Generator().manual_seed(seed)
    dim = tasks + 5

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if family == "rank_deficient":
        jac = randn(tasks, max(1, tasks // 2))  # T > d
    elif family == "duplicated":
        base = randn((tasks + 1) // 2, dim)
        jac = base.repeat(2, 1)[:tasks]
    else:
        jac = randn(tasks, dim)
        if family == "near_zero_row":
            jac[0] *= 1e-6
        elif family == "zero_row":
            jac[-1] = 0.0
        elif family == "conflicting":
            # g_{2k+1} = -g_{2k} + small noise: strong pairwise conflicts.
            jac[1::2] = -jac[0::2][: tasks // 2] + 0.01 * randn(tasks // 2, dim)
    return jac.to(dtype)


def _gramian(family: str, tasks: int, dtype: torch.dtype, seed: int = 0) -> Tensor:
    jac = _jacobian(family, tasks, dtype, seed)
    return jac @ jac.T


def _assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL) -> None:
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rtol * max(scale, 1e-30), f"max error {err:.3g} vs weights' scale {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", TASKS)
def test_pcgrad_matches_torchjd(tasks: int, family: str, dtype: torch.dtype) -> None:
    gramian = _gramian(family, tasks, dtype)
    torch.manual_seed(123)
    expected = PCGradWeighting()(gramian)
    after_reference = torch.rand(3)
    torch.manual_seed(123)
    actual = FastPCGradWeighting()(gramian)
    # Same permutations drawn from the same global generator, hence the same RNG state afterwards.
    assert torch.equal(torch.rand(3), after_reference)
    assert actual.shape == (tasks,) and actual.dtype == dtype
    _assert_close(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", TASKS)
@pytest.mark.parametrize("loop", ["forward", "device_loop"])
def test_mgda_matches_torchjd(tasks: int, family: str, dtype: torch.dtype, loop: str) -> None:
    gramian = _gramian(family, tasks, dtype)
    expected = MGDAWeighting(epsilon=0.001, max_iters=100)(gramian)
    fast = FastMGDAWeighting(epsilon=0.001, max_iters=100)
    if loop == "forward":
        actual = fast(gramian)
    else:  # the accelerator path (masked iterations, periodic checks), exercised on the CPU
        actual = fast._device_loop(gramian, torch.full((tasks,), 1.0 / tasks, dtype=dtype))
    assert actual.shape == (tasks,) and actual.dtype == dtype
    if family == "duplicated":
        # Duplicated tasks tie in G @ alpha, so which copy Frank-Wolfe moves towards is decided by the last bit of
        # a float32 product (it varied between CPUs); the weights are then not unique, but the update J^T w is: compare
        # it in Gramian space (G w = J J^T w) and the objective w^T G w.
        _assert_close(gramian @ actual, gramian @ expected, rtol=1e-5)
        _assert_close(actual @ gramian @ actual, expected @ gramian @ expected, rtol=1e-5)
    else:
        _assert_close(actual, expected)


@pytest.mark.parametrize("epsilon,max_iters", [(1e-1, 5), (1e-5, 7), (1e-8, 300)])
@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_mgda_stopping_rule_matches_torchjd(epsilon: float, max_iters: int, check_every: int) -> None:
    gramian = _gramian("random", 10, torch.float64, seed=1)
    expected = MGDAWeighting(epsilon=epsilon, max_iters=max_iters)(gramian)
    fast = FastMGDAWeighting(epsilon=epsilon, max_iters=max_iters, check_every=check_every)
    _assert_close(fast(gramian), expected)
    _assert_close(fast._device_loop(gramian, torch.full((10,), 0.1, dtype=torch.float64)), expected)


@pytest.mark.parametrize("tasks", [3, 10, 40])
def test_mgda_permutation_equivariant(tasks: int) -> None:
    gramian = _gramian("random", tasks, torch.float64, seed=2)
    perm = torch.randperm(tasks, generator=torch.Generator().manual_seed(0))
    weights = FastMGDAWeighting()(gramian)
    permuted = FastMGDAWeighting()(gramian[perm][:, perm])
    _assert_close(permuted, weights[perm])


@pytest.mark.parametrize("tasks", [2, 3, 10, 40])
@pytest.mark.parametrize("scale", [1e-4, 0.25, 3.7, 1e3])
def test_mgda_scale_invariant(tasks: int, scale: float) -> None:
    gramian = _gramian("random", tasks, torch.float64, seed=3)
    _assert_close(FastMGDAWeighting()(scale * gramian), FastMGDAWeighting()(gramian))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tasks", TASKS)
def test_mgda_on_simplex(tasks: int, family: str, dtype: torch.dtype) -> None:
    weights = FastMGDAWeighting()(_gramian(family, tasks, dtype))
    assert bool((weights >= 0).all())
    assert abs(float(weights.sum()) - 1.0) <= 10 * torch.finfo(dtype).eps * tasks


@pytest.mark.parametrize("weighting", [FastPCGradWeighting(), FastMGDAWeighting()], ids=["pcgrad", "mgda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_task(weighting: torch.nn.Module, dtype: torch.dtype) -> None:
    weights = weighting(torch.tensor([[2.5]], dtype=dtype))
    assert weights.dtype == dtype and torch.equal(weights, torch.ones(1, dtype=dtype))


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tasks", [2, 5])
def test_shape_dtype_device_preserved(device: str, dtype: torch.dtype, tasks: int) -> None:
    gramian = _gramian("random", tasks, dtype).to(device)
    torch.manual_seed(0)
    for weighting in (FastPCGradWeighting(), FastMGDAWeighting()):
        weights = weighting(gramian)
        assert weights.shape == (tasks,) and weights.dtype == dtype and weights.device == gramian.device


@pytest.mark.parametrize("device", _devices())
def test_mgda_requires_grad_path(device: str) -> None:
    # A Gramian that requires grad takes the tensor-only loop, which stays differentiable like TorchJD's.
    gramian = _gramian("random", 5, torch.float64).to(device).requires_grad_()
    weights = FastMGDAWeighting()(gramian)
    _assert_close(weights.detach().cpu(), MGDAWeighting()(gramian.detach().cpu()))
    assert weights.requires_grad


def test_pcgrad_not_differentiable() -> None:
    gramian = _gramian("random", 4, torch.float64).requires_grad_()
    assert not FastPCGradWeighting()(gramian).requires_grad


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"max_iters": 0}, {"check_every": 0}])
def test_mgda_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FastMGDAWeighting(**kwargs)  # type: ignore[arg-type]
