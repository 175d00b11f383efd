"""Batched UPGrad / DualProj weightings (mtl_lightning.balancers.fast_projection) against TorchJD's quadprog ones."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import DualProjWeighting, UPGradWeighting

from mtl_lightning.balancers import fast_projection
from mtl_lightning.balancers.fast_projection import FastDualProjWeighting, FastUPGradWeighting, project_weights

# Both solvers are exact up to round-off: the normalised, regularised Gramian is at worst ~1e4-conditioned, so the
# float64 solutions agree to ~1e-12 of their scale; float32 outputs are float64 solutions rounded by both, same inputs.
REL_TOL = 1e-6

PAIRS: dict[str, tuple[Callable[..., torch.nn.Module], Callable[..., torch.nn.Module]]] = {
    "upgrad": (UPGradWeighting, FastUPGradWeighting),
    "dualproj": (DualProjWeighting, FastDualProjWeighting),
}


def _jacobian(family: str, T: int, gen: torch.Generator) -> Tensor:
    d = 16
    if family == "random":
        return torch.randn(T, d, generator=gen, dtype=torch.float64)
    if family == "rank_deficient":  # T > d: the Gramian is singular, only reg_eps makes it definite.
        return torch.randn(T, max(1, T // 2), generator=gen, dtype=torch.float64)
    if family == "near_zero_row":
        J = torch.randn(T, d, generator=gen, dtype=torch.float64)
        J[0] *= 1e-8
        return J
    if family == "duplicated":
        J = torch.randn(max(1, (T + 1) // 2), d, generator=gen, dtype=torch.float64)
        return J.repeat(2, 1)[:T]
    if family == "conflicting":
        J = torch.randn(T, d, generator=gen, dtype=torch.float64)
        J[1] = -J[0] + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)
        return J
    raise AssertionError(family)


def _assert_close(fast: Tensor, ref: Tensor, rel: float = REL_TOL) -> None:
    scale = ref.abs().max().clamp_min(1e-30)
    err = (fast.double() - ref.double()).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3e} > {rel}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["random", "rank_deficient", "near_zero_row", "duplicated", "conflicting"])
@pytest.mark.parametrize("T", [2, 3, 10, 40, 64])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_matches_torchjd(name: str, T: int, family: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1000 * T + len(family))
    J = _jacobian(family, T, gen).to(dtype)
    G = J @ J.T
    ref_cls, fast_cls = PAIRS[name]
    ref = ref_cls()(G)
    fast = fast_cls()(G)
    assert fast.shape == (T,) and fast.dtype == dtype
    # float32: the two solvers round differently, and on strongly conflicting Gramians the last float32 bits of the
    # products (which differ between CPUs' kernels) move the weights by a few 1e-6; float64 keeps the tight bound.
    _assert_close(fast, ref, REL_TOL if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_matches_torchjd_with_pref_vector(name: str) -> None:
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    G = J @ J.T
    pref = torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, -0.5], dtype=torch.float64)
    ref_cls, fast_cls = PAIRS[name]
    _assert_close(fast_cls(pref_vector=pref)(G), ref_cls(pref_vector=pref)(G))


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_matches_torchjd_on_tiny_gramian(name: str) -> None:
    """Below norm_eps TorchJD zeroes the normalised Gramian; only reg_eps I is left."""
    J = 1e-4 * torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G = J @ J.T
    ref_cls, fast_cls = PAIRS[name]
    _assert_close(fast_cls()(G), ref_cls()(G))


@pytest.mark.parametrize("family", ["random", "rank_deficient", "conflicting"])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_no_conflict_with_any_task(name: str, family: str) -> None:
    """G w >= 0 up to the reg_eps shift: A w >= 0 for A = G / tr(G) + reg_eps I."""
    J = _jacobian(family, 12, torch.Generator().manual_seed(5))
    G = J @ J.T
    w = PAIRS[name][1]()(G)
    slack = 1e-4 * G.trace() * w.abs() + 1e-9 * G.abs().max() * w.abs().max()
    assert torch.all(G @ w >= -slack)
    A = G / G.trace() + 1e-4 * torch.eye(12, dtype=G.dtype)
    assert torch.all(A @ w >= -1e-10 * w.abs().max())


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_permutation_equivariance(name: str) -> None:
    J = _jacobian("conflicting", 10, torch.Generator().manual_seed(6))
    G = J @ J.T
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(7))
    weighting = PAIRS[name][1]()
    _assert_close(weighting(G[perm][:, perm]), weighting(G)[perm], rel=1e-10)


@pytest.mark.parametrize("scale", [1e-2, 1e3])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_scale_invariance(name: str, scale: float) -> None:
    J = _jacobian("random", 8, torch.Generator().manual_seed(8))
    G = J @ J.T
    weighting = PAIRS[name][1]()
    _assert_close(weighting(scale * G), weighting(G), rel=1e-10)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_single_task(name: str) -> None:
    G = torch.tensor([[4.0]])
    w = PAIRS[name][1]()(G)
    _assert_close(w, PAIRS[name][0]()(G))
    torch.testing.assert_close(w, torch.tensor([1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dtype_device_and_no_graph_preserved(name: str, dtype: torch.dtype) -> None:
    J = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    w = PAIRS[name][1]()(J @ J.T)
    assert w.dtype == dtype and w.device == J.device and not w.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_cuda_matches_torchjd(name: str) -> None:
    J = _jacobian("conflicting", 40, torch.Generator().manual_seed(9))
    G = J @ J.T
    w = PAIRS[name][1]()(G.cuda())
    assert w.is_cuda
    _assert_close(w.cpu(), PAIRS[name][0]()(G))


def test_batched_preferences_match_single_rows() -> None:
    J = _jacobian("conflicting", 7, torch.Generator().manual_seed(10))
    G = J @ J.T
    U = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    V = project_weights(U, G)
    assert V.shape == U.shape
    for idx in [(0, 0), (1, 2)]:
        torch.testing.assert_close(V[idx], project_weights(U[idx], G), rtol=0, atol=1e-12)


def test_budget_exhaustion_warns_once_and_stays_feasible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_projection, "_warned_budget", False)
    J = _jacobian("conflicting", 20, torch.Generator().manual_seed(12))
    G = J @ J.T
    U = torch.eye(20, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V1 = project_weights(U, G, max_iter=1)
        V2 = project_weights(U, G, max_iter=1)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    for V in (V1, V2):
        assert torch.isfinite(V).all() and torch.all(V >= U)


def test_singular_system_never_returns_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """reg_eps = 0 on a rank-one Gramian makes the pivoting's systems singular (quadprog refuses it too)."""
    monkeypatch.setattr(fast_projection, "_warned_budget", False)
    g = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    G = torch.cat([g, -g, 2 * g]) @ torch.cat([g, -g, 2 * g]).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = FastUPGradWeighting(reg_eps=0.0)(G)
    assert torch.isfinite(w).all()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pref_vector"):
        FastUPGradWeighting(pref_vector=torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        FastDualProjWeighting(reg_eps=-1.0)
    with pytest.raises(ValueError, match="pref_vector has 3"):
        FastDualProjWeighting(pref_vector=torch.ones(3))(torch.eye(2))
    with pytest.raises(ValueError, match="square"):
        project_weights(torch.ones(3), torch.ones(3, 2))
