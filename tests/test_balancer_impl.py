"""``impl: fast | torchjd``: the in-project weightings stand in for TorchJD's without changing the training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, SMALL_DATA, run_cli

from mtl_lightning.balancers import MGDA, CAGrad, DualProj, GradVac, PCGrad, UPGrad
from mtl_lightning.balancers.gradient_methods import _fast_impls, _FastOrTorchJD
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

METHODS = [MGDA, PCGrad, UPGrad, DualProj, GradVac, CAGrad]
# CAGrad's weights agree only to TorchJD's cvxpy accuracy (tests/test_fast_gradvac_cagrad.py); the others to 1e-6.
TOLERANCE = {CAGrad: {"atol": 1e-3, "rtol": 1e-3}}
TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "regression"), TaskSpec("c", "binary")]


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_either_impl_is_one_option_away_with_the_same_weights(cls: type) -> None:
    fast, reference = cls(impl="fast"), cls(impl="torchjd")
    fast.bind(TASKS)
    reference.bind(TASKS)
    assert type(fast.weighting).__module__.startswith("mtl_lightning.balancers.fast_")
    assert type(reference.weighting).__module__.startswith("torchjd")
    # A fast weighting adds no checkpoint state (old checkpoints load, and either impl loads the other's).
    assert list(fast.state_dict()) == list(reference.state_dict())
    jac = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    w_fast = fast.weighting(jac @ jac.T)
    torch.manual_seed(1)
    tolerance = TOLERANCE.get(cls, {"atol": 1e-6, "rtol": 1e-5})
    torch.testing.assert_close(w_fast, reference.weighting(jac @ jac.T), **tolerance)


def test_the_benchmarks_pairs_are_the_methods_weightings() -> None:
    import mtl_lightning.balancers as balancers

    names = set(_fast_impls())
    assert {c.__name__ for c in METHODS} <= names
    # Every pair the benchmark times is a method with both impls (more may be added beside those tested here).
    assert all(issubclass(getattr(balancers, name), _FastOrTorchJD) for name in names)


def test_defaults_are_the_faster_impl_on_a_cpu() -> None:
    # docs/benchmarks.md: the fast PCGrad, MGDA, GradVac and CAGrad win at every T; batched UPGrad/DualProj only
    # from about T = 40.
    assert (MGDA().impl, PCGrad().impl, UPGrad().impl, DualProj().impl) == ("fast", "fast", "torchjd", "torchjd")
    assert (GradVac().impl, CAGrad().impl) == ("fast", "fast")


def test_an_unknown_impl_names_the_ones_that_exist() -> None:
    with pytest.raises(ConfigError, match=r"UPGrad: unknown impl 'cuda'; choose one of \['fast', 'torchjd'\]"):
        UPGrad(impl="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", ["upgrad", "pcgrad"])
def test_training_with_either_impl_gives_the_same_model(cls: str, tmp_path: Path) -> None:
    base = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, "--trainer.max_steps", "5", "--trainer.logger", "false"]
    base += [
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.num_sanity_val_steps",
        "0",
    ]
    base += ["--model.balancer", str(QUICKSTART.parent / "balancer" / f"{cls}.yaml")]
    models = [
        run_cli([*base, "--model.balancer.init_args.impl", impl], tmp_path / impl).model for impl in ("fast", "torchjd")
    ]
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
