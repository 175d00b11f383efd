"""Loss-weighting balancers (reference values and properties) and the epoch-level per-task loss means."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_lightning.balancers import BalanceInput, EqualWeighting, StaticWeighting, weighted_mean
from mtl_lightning.loss_tracker import TaskLossMean
from mtl_lightning.tasks import TaskSpec

NAMES = ["a", "b", "c", "d"]


def specs(weights=(1.0, 1.0, 1.0, 1.0)):
    return [TaskSpec(n, "regression", weight=w) for n, w in zip(NAMES, weights, strict=True)]


def bound(balancer, tasks):
    balancer.bind(tasks)
    return balancer


def run(balancer, losses, present=None):
    losses = torch.as_tensor(losses, dtype=torch.float32)
    present = torch.ones(len(losses), dtype=torch.bool) if present is None else torch.as_tensor(present)
    return balancer(BalanceInput(losses=losses, present=present))


# ---------------------------------------------------------------------------------------- reference values
def test_equal_weighting_is_mean():
    out = run(bound(EqualWeighting(), specs()), [1.0, 2.0, 3.0, 6.0])
    assert out.loss.item() == pytest.approx(3.0)
    torch.testing.assert_close(out.weights, torch.full((4,), 0.25))


def test_equal_weighting_mean_over_present_tasks():
    out = run(bound(EqualWeighting(), specs()), [1.0, 100.0, 3.0, 0.0], present=[True, False, True, False])
    assert out.loss.item() == pytest.approx(2.0)
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_static_weighting_uses_spec_weights():
    out = run(bound(StaticWeighting(), specs((1.0, 3.0, 0.0, 4.0))), [2.0, 1.0, 50.0, 0.5])
    # (1*2 + 3*1 + 0*50 + 4*0.5) / 8
    assert out.loss.item() == pytest.approx(7.0 / 8.0)
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 3.0, 0.0, 4.0]) / 8)


def test_static_weighting_renormalises_over_present_tasks():
    out = run(
        bound(StaticWeighting(), specs((1.0, 3.0, 2.0, 4.0))),
        [2.0, 1.0, 5.0, 0.0],
        present=[True, True, True, False],
    )
    assert out.loss.item() == pytest.approx((2.0 + 3.0 + 10.0) / 6.0)
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 3.0, 2.0, 0.0]) / 6)
    assert out.weights.sum().item() == pytest.approx(1.0)


def test_static_weighting_overrides():
    bal = bound(StaticWeighting(weights={"b": 0.0, "d": 2.0}), specs((1.0, 3.0, 1.0, 4.0)))
    torch.testing.assert_close(bal.weights, torch.tensor([1.0, 0.0, 1.0, 2.0]))
    out = run(bal, [1.0, 9.0, 2.0, 3.0])
    assert out.loss.item() == pytest.approx((1.0 + 2.0 + 6.0) / 4.0)


@pytest.mark.parametrize("balancer", [EqualWeighting, StaticWeighting], ids=lambda c: c.__name__)
def test_all_absent_gives_zero_loss_and_no_nan(balancer):
    bal = bound(balancer(), specs())
    losses = torch.zeros(4, requires_grad=True)  # absent tasks carry a zero tied to their head
    out = bal(BalanceInput(losses=losses, present=torch.zeros(4, dtype=torch.bool)))
    assert out.loss.item() == 0.0
    assert torch.isfinite(out.weights).all() and out.weights.sum().item() == 0.0
    out.loss.backward()
    assert losses.grad is not None
    assert torch.isfinite(losses.grad).all()


def test_gradient_is_the_weights():
    bal = bound(StaticWeighting(), specs((1.0, 3.0, 2.0, 2.0)))
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = bal(BalanceInput(losses=losses, present=torch.tensor([True, True, False, True])))
    out.loss.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 3.0, 0.0, 2.0]) / 6)
    assert not out.weights.requires_grad


def test_weighted_mean_keeps_dtype():
    out = weighted_mean(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.ones(2), torch.tensor([True, True]))
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == 2.0


# -------------------------------------------------------------------------------------------------- errors
def test_static_unknown_task():
    with pytest.raises(ValueError, match=r"weights given for unknown tasks \['x', 'y'\]; tasks are \['a', 'b'"):
        bound(StaticWeighting(weights={"a": 1.0, "y": 1.0, "x": 2.0}), specs())


@pytest.mark.parametrize(
    ("spec_weights", "overrides"),
    [((0.0, 0.0, 0.0, 0.0), None), ((1.0, 1.0, 0.0, 0.0), {"a": 0.0, "b": 0.0}), ((1.0,) * 4, {"c": -1.0})],
)
def test_static_bad_weights(spec_weights, overrides):
    with pytest.raises(ValueError, match="weights must be >= 0 with at least one > 0"):
        bound(StaticWeighting(weights=overrides), specs(spec_weights))


# ----------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", range(5))
def test_permuting_tasks_permutes_weights(seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(4, generator=g) + 0.1
    losses = torch.rand(4, generator=g) * 5
    present = torch.tensor([True, False, True, True])
    perm = torch.randperm(4, generator=g)
    tasks = specs(weights.tolist())
    ref = run(bound(StaticWeighting(), tasks), losses, present)
    permuted = run(bound(StaticWeighting(), [tasks[i] for i in perm]), losses[perm], present[perm])
    torch.testing.assert_close(permuted.weights, ref.weights[perm])
    torch.testing.assert_close(permuted.loss, ref.loss)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_scaling_all_weights_leaves_loss_unchanged(scale):
    weights = [0.2, 1.5, 3.0, 0.7]
    losses = [0.3, 2.0, 1.1, 4.0]
    present = [True, True, False, True]
    ref = run(bound(StaticWeighting(), specs(weights)), losses, present)
    scaled = run(bound(StaticWeighting(), specs([w * scale for w in weights])), losses, present)
    overridden = run(
        bound(StaticWeighting(weights={n: w * scale for n, w in zip(NAMES, weights, strict=True)}), specs()),
        losses,
        present,
    )
    torch.testing.assert_close(scaled.loss, ref.loss)
    torch.testing.assert_close(scaled.weights, ref.weights)
    torch.testing.assert_close(overridden.loss, ref.loss)


def test_equal_weights_match_equal_weighting():
    losses, present = [0.3, 2.0, 1.1, 4.0], [True, False, True, True]
    eq = run(bound(EqualWeighting(), specs()), losses, present)
    st = run(bound(StaticWeighting(), specs((2.0,) * 4)), losses, present)
    torch.testing.assert_close(eq.loss, st.loss)
    torch.testing.assert_close(eq.weights, st.weights)


def test_weights_are_not_checkpoint_state():
    # Weights follow the specs, so a checkpoint saved with other weights still loads.
    assert "weights" not in bound(StaticWeighting(), specs()).state_dict()


# ------------------------------------------------------------------------------------------ TaskLossMean
def test_task_loss_mean_exact_over_labelled_counts():
    tracker = TaskLossMean(3)
    # step 1: task 0 sum 6 over 3 rows, task 1 sum 1 over 1 row, task 2 unlabelled
    tracker.update(torch.tensor([6.0, 1.0, 0.0]), torch.tensor([3, 1, 0]))
    # step 2: task 0 sum 2 over 1 row, task 1 sum 9 over 3 rows
    tracker.update(torch.tensor([2.0, 9.0, 0.0]), torch.tensor([1, 3, 0]))
    means, counts = tracker.compute()
    # exact over rows (8/4 and 10/4), not the mean of the per-step means (1.5 and 2.0)
    assert means[0].item() == pytest.approx(2.0)
    assert means[1].item() == pytest.approx(2.5)
    assert math.isnan(means[2].item())
    assert counts.tolist() == [4.0, 4.0, 0.0]


def test_task_loss_mean_reset_and_grad_free():
    tracker = TaskLossMean(2)
    sums = torch.tensor([1.0, 2.0], requires_grad=True)
    tracker.update(sums * 2, torch.tensor([1, 2]))
    means, _ = tracker.compute()
    assert not means.requires_grad
    torch.testing.assert_close(means, torch.tensor([2.0, 2.0], dtype=torch.float64))
    tracker.reset()
    tracker.update(torch.tensor([0.0, 3.0]), torch.tensor([0, 3]))
    means, counts = tracker.compute()
    assert math.isnan(means[0].item())
    assert means[1].item() == pytest.approx(1.0)
    assert counts.tolist() == [0.0, 3.0]
