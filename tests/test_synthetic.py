"""Synthetic multi-task data: the relatedness knob, label kinds, missing labels, splits and bad settings."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtl_lightning.data import DataError, SyntheticDataModule, split_indices
from mtl_lightning.data.synthetic import task_directions
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

ALL_KINDS = [
    TaskSpec("b", "binary"),
    TaskSpec("m", "multiclass", num_outputs=4),
    TaskSpec("l", "multilabel", num_outputs=3),
    TaskSpec("r", "regression"),
    TaskSpec("r2", "regression", num_outputs=2),
]
TWO_REGRESSIONS = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]


def targets_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)) for k in a)


def missing(target: torch.Tensor) -> torch.Tensor:
    """Per-row missing flag (a multilabel or multi-output row counts as missing when any entry is)."""
    flag = torch.isnan(target) if target.is_floating_point() else target == IGNORE_INDEX
    return flag.any(dim=1) if flag.ndim > 1 else flag


# -------------------------------------------------------------------------------------- task directions
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("correlation", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_task_directions_pairwise_cosine(num_tasks, correlation):
    w = task_directions(16, num_tasks, correlation, 2.5, torch.Generator().manual_seed(num_tasks))
    assert w.shape == (num_tasks, 16)
    torch.testing.assert_close(w.norm(dim=1), torch.full((num_tasks,), 2.5), atol=1e-5, rtol=0)
    unit = w / w.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    for s, t in itertools.combinations(range(num_tasks), 2):
        assert cos[s, t].item() == pytest.approx(correlation, abs=1e-5)


def test_task_directions_exact_boundaries():
    # The boundaries accept num_features == num_tasks + 1.
    assert task_directions(4, 3, 0.5, 1.0, torch.Generator().manual_seed(0)).shape == (3, 4)


@pytest.mark.parametrize("correlation", [-0.1, 1.5])
def test_task_directions_bad_correlation(correlation):
    with pytest.raises(DataError, match=r"correlation must be in \[0, 1\]"):
        task_directions(16, 2, correlation, 1.0, torch.Generator())


def test_task_directions_too_few_features():
    with pytest.raises(DataError, match=r"num_features must be >= number of tasks \+ 1 \(4\), got 3"):
        task_directions(3, 3, 0.5, 1.0, torch.Generator())


# ------------------------------------------------------------------------------------- relatedness knob
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlation_knob_orders_target_correlation(seed):
    pearson = []
    for correlation in [0.0, 0.25, 0.5, 0.75, 1.0]:
        dm = SyntheticDataModule(TWO_REGRESSIONS, num_samples=5000, num_features=32, correlation=correlation, seed=seed)
        t = dm.generate().targets
        pearson.append(torch.corrcoef(torch.stack([t["a"], t["b"]]))[0, 1].item())
    assert all(lo < hi for lo, hi in itertools.pairwise(pearson)), pearson
    assert pearson[-1] > 0.9, pearson
    assert abs(pearson[0]) < 0.3, pearson


# ------------------------------------------------------------------------------------------ determinism
def test_generation_is_deterministic_in_seed():
    a = SyntheticDataModule(ALL_KINDS, num_samples=300, num_features=16, missing_rate=0.2, seed=7).generate()
    b = SyntheticDataModule(ALL_KINDS, num_samples=300, num_features=16, missing_rate=0.2, seed=7).generate()
    c = SyntheticDataModule(ALL_KINDS, num_samples=300, num_features=16, missing_rate=0.2, seed=8).generate()
    assert torch.equal(a.inputs, b.inputs)
    assert targets_equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    for name in a.targets:
        assert not torch.equal(a.targets[name].nan_to_num(-7.0), c.targets[name].nan_to_num(-7.0)), name


def test_splits_are_deterministic_in_seed():
    def train_x(seed):
        dm = SyntheticDataModule(TWO_REGRESSIONS, num_samples=200, num_features=8, seed=seed)
        return dm.datasets["train"].inputs

    assert torch.equal(train_x(3), train_x(3))
    assert not torch.equal(train_x(3), train_x(4))


# ------------------------------------------------------------------------------------------ label kinds
@pytest.fixture(scope="module")
def labels():
    return SyntheticDataModule(ALL_KINDS, num_samples=4000, num_features=16, seed=1).generate()


def test_inputs(labels):
    assert labels.inputs.shape == (4000, 16)
    assert labels.inputs.dtype == torch.float32


def test_binary_labels(labels):
    y = labels.targets["b"]
    assert y.shape == (4000,) and y.dtype == torch.float32
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert y.mean().item() == pytest.approx(0.5, abs=0.02)


def test_multiclass_labels(labels):
    y = labels.targets["m"]
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert y.min().item() == 0 and y.max().item() == 3
    freq = torch.bincount(y, minlength=4).float() / len(y)
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_multilabel_labels(labels):
    y = labels.targets["l"]
    assert y.shape == (4000, 3) and y.dtype == torch.float32
    assert set(y.unique().tolist()) == {0.0, 1.0}
    # every label fires sometimes and not always, each at its own rate
    rates = y.mean(0)
    assert ((rates > 0.1) & (rates < 0.9)).all(), rates
    assert len(set(rates.round(decimals=2).tolist())) == 3, rates


def test_regression_targets_standardised(labels):
    for name, shape in [("r", (4000,)), ("r2", (4000, 2))]:
        y = labels.targets[name]
        assert y.shape == shape and y.dtype == torch.float32
        torch.testing.assert_close(y.mean(0), torch.zeros(shape[1:]), atol=1e-4, rtol=0)
        torch.testing.assert_close(y.std(0), torch.ones(shape[1:]), atol=1e-4, rtol=0)


def test_generated_labels_pass_target_validation():
    dm = SyntheticDataModule(ALL_KINDS, num_samples=500, num_features=16, missing_rate=0.3, seed=0)
    assert set(dm.datasets) == {"train", "val", "test", "predict"}  # built and validated without error


# ---------------------------------------------------------------------------------------- missing labels
@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_missing_rate_per_task(rate):
    data = SyntheticDataModule(ALL_KINDS, num_samples=4000, num_features=16, missing_rate=rate, seed=0).generate()
    rows = {}
    for spec in ALL_KINDS:
        y = data.targets[spec.name]
        rows[spec.name] = missing(y)
        assert rows[spec.name].float().mean().item() == pytest.approx(rate, abs=0.04), spec.name
        if y.ndim > 1:  # a missing row is missing as a whole
            flag = torch.isnan(y)
            assert torch.equal(flag.all(dim=1), flag.any(dim=1))
        if spec.integer_targets:
            labelled = y[y != IGNORE_INDEX]
            assert labelled.min() >= 0 and labelled.max() < spec.num_outputs
        else:
            assert not torch.isinf(y).any()
    # Each task drops its own rows.
    assert not torch.equal(rows["b"], rows["m"])


def test_no_missing_labels_by_default(labels):
    for name, y in labels.targets.items():
        assert not missing(y).any(), name


# --------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize(
    ("n", "val", "test", "sizes"),
    [(1000, 0.1, 0.1, (800, 100, 100)), (1000, 0.15, 0.05, (800, 150, 50)), (500, 0.2, 0.0, (400, 100, 0))],
)
def test_split_indices_sizes_disjoint_and_cover(n, val, test, sizes):
    parts = split_indices(n, (val, test), seed=0)
    assert tuple(len(p) for p in parts) == sizes
    together = torch.cat(parts)
    assert torch.equal(together.sort().values, torch.arange(n))  # disjoint and covering


def test_split_indices_depends_on_seed():
    assert torch.equal(split_indices(100, (0.1, 0.1), 5)[1], split_indices(100, (0.1, 0.1), 5)[1])
    assert not torch.equal(split_indices(100, (0.1, 0.1), 5)[1], split_indices(100, (0.1, 0.1), 6)[1])


def test_datamodule_splits_disjoint_and_cover():
    dm = SyntheticDataModule(ALL_KINDS, num_samples=1000, num_features=16, val_fraction=0.15, test_fraction=0.05)
    ds = dm.datasets
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (800, 150, 50)
    full = dm.generate()
    # rows are identified by their (continuous, hence distinct) first input feature
    split_keys = torch.cat([ds[s].inputs[:, 0] for s in ("train", "val", "test")])
    assert torch.equal(split_keys.sort().values, full.inputs[:, 0].sort().values)
    assert len(split_keys.unique()) == 1000
    # targets travel with their rows
    order = full.inputs[:, 0].argsort()
    val_rows = torch.searchsorted(full.inputs[order, 0].contiguous(), ds["val"].inputs[:, 0].contiguous())
    assert torch.equal(ds["val"].targets["m"], full.targets["m"][order][val_rows])


def test_input_shape():
    assert SyntheticDataModule(TWO_REGRESSIONS, num_features=12).input_shape == (12,)


# ---------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"correlation": 1.5}, r"correlation must be in \[0, 1\], got 1.5"),
        ({"correlation": -0.5}, r"correlation must be in \[0, 1\]"),
        ({"num_features": 2}, r"num_features must be >= number of tasks \+ 1 \(3\), got 2"),
        ({"missing_rate": 1.0}, r"missing_rate must be in \[0, 1\), got 1.0"),
        ({"missing_rate": -0.1}, r"missing_rate must be in \[0, 1\)"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            r"split fractions must be >= 0 and sum to < 1, got \[0.5, 0.5\]",
        ),
        ({"val_fraction": 0.7, "test_fraction": 0.4}, r"split fractions must be >= 0 and sum to < 1"),
        ({"val_fraction": -0.1}, r"split fractions must be >= 0"),
        ({"num_samples": 0}, r"num_samples must be >= 1"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(DataError, match=match):
        SyntheticDataModule(TWO_REGRESSIONS, **kwargs)


def test_bad_task_list_fails_at_construction():
    with pytest.raises(ValueError, match="no tasks declared"):
        SyntheticDataModule([])
