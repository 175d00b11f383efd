"""Missing labels: masked losses, target shapes and values, and masked metrics.

Every check compares against the same quantity computed by hand on the labelled rows only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics.functional as TMF

from mtl_lightning.losses import build_loss, masked_loss
from mtl_lightning.metrics import build_metrics, metric_inputs, metric_update, predictions
from mtl_lightning.targets import TargetError, canonical_target, check_targets, check_values, label_mask
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

NAN = float("nan")
INF = float("inf")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def drop(target: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """A copy of ``target`` with the entries where ``missing`` is True marked as missing."""
    target = target.clone()
    target[missing] = IGNORE_INDEX if not target.is_floating_point() else NAN
    return target


def loss_and_grad(spec: TaskSpec, output: torch.Tensor, target: torch.Tensor):
    output = output.clone().requires_grad_(True)
    total, count = masked_loss(build_loss(spec), spec, output, target)
    total.backward()
    return total.detach(), count, output.grad


def hand_loss_and_grad(fn, output: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor):
    """``fn(output[labelled], target[labelled])`` summed, and its gradient w.r.t. the full output."""
    output = output.clone().requires_grad_(True)
    total = fn(output[labelled], target[labelled])
    total.backward()
    return total.detach(), output.grad


# ------------------------------------------------------------------------------------------------ losses
N = 32


def _binary_case():
    out = torch.randn(N, generator=gen(1))
    missing = torch.rand(N, generator=gen(2)) < 0.4
    target = drop((torch.rand(N, generator=gen(3)) < 0.5).float(), missing)
    return (
        TaskSpec("clicks", "binary"),
        out,
        target,
        ~missing,
        lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum"),
    )


def _multiclass_case():
    out = torch.randn(N, 4, generator=gen(1))
    missing = torch.rand(N, generator=gen(2)) < 0.4
    target = drop(torch.randint(0, 4, (N,), generator=gen(3)), missing)
    return (
        TaskSpec("topic", "multiclass", num_outputs=4),
        out,
        target,
        ~missing,
        lambda o, t: F.cross_entropy(o, t, reduction="sum"),
    )


def _multilabel_case():
    out = torch.randn(N, 5, generator=gen(1))
    missing = torch.rand(N, 5, generator=gen(2)) < 0.4  # element level: a row may be partly labelled
    target = drop((torch.rand(N, 5, generator=gen(3)) < 0.5).float(), missing)
    return (
        TaskSpec("tags", "multilabel", num_outputs=5),
        out,
        target,
        ~missing,
        lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum"),
    )


def _regression_case():
    out = torch.randn(N, generator=gen(1))
    missing = torch.rand(N, generator=gen(2)) < 0.4
    target = drop(3 * torch.randn(N, generator=gen(3)), missing)
    return (
        TaskSpec("price", "regression"),
        out,
        target,
        ~missing,
        lambda o, t: F.mse_loss(o, t, reduction="sum"),
    )


def _multi_regression_case():
    out = torch.randn(N, 3, generator=gen(1))
    missing = torch.rand(N, 3, generator=gen(2)) < 0.4
    target = drop(3 * torch.randn(N, 3, generator=gen(3)), missing)
    return (
        TaskSpec("pos", "regression", num_outputs=3),
        out,
        target,
        ~missing,
        lambda o, t: F.mse_loss(o, t, reduction="sum"),
    )


CASES = {
    "binary": _binary_case,
    "multiclass": _multiclass_case,
    "multilabel": _multilabel_case,
    "regression": _regression_case,
    "regression-multi": _multi_regression_case,
}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_loss_equals_loss_on_labelled_entries(case):
    spec, out, target, labelled, fn = CASES[case]()
    assert 0 < int(labelled.sum()) < labelled.numel()  # the case really mixes labelled and missing entries
    total, count, grad = loss_and_grad(spec, out, target)
    want, want_grad = hand_loss_and_grad(fn, out, target, labelled)
    assert int(count) == int(labelled.sum())
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(grad, want_grad)
    # Missing rows get exactly no gradient.
    assert grad[~labelled].abs().sum() == 0


@pytest.mark.parametrize("case", list(CASES))
def test_masked_loss_ignores_values_at_missing_outputs(case):
    """Whatever a head outputs on unlabelled entries (here inf) changes neither the loss nor its gradient."""
    spec, out, target, labelled, fn = CASES[case]()
    poisoned = out.clone()
    poisoned[~labelled] = INF
    total, count, grad = loss_and_grad(spec, poisoned, target)
    assert int(count) == int(labelled.sum())
    want, want_grad = hand_loss_and_grad(fn, out, target, labelled)
    assert torch.isfinite(total)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(grad, want_grad)


def test_huge_output_at_missing_row_does_not_give_nan():
    # Were the missing entry fed to the loss, (1e30 - 0)^2 would overflow float32 to inf and 0 * inf be NaN.
    spec = TaskSpec("price", "regression")
    out = torch.tensor([1.0, 1e30, 2.0])
    total, count, grad = loss_and_grad(spec, out, torch.tensor([2.0, NAN, 0.0]))
    assert total.item() == pytest.approx(1.0 + 4.0)
    assert int(count) == 2
    torch.testing.assert_close(grad, torch.tensor([-2.0, 0.0, 4.0]))


@pytest.mark.parametrize(
    ("spec", "shape", "missing"),
    [
        (TaskSpec("clicks", "binary"), (8,), NAN),
        (TaskSpec("topic", "multiclass", num_outputs=3), (8, 3), IGNORE_INDEX),
        (TaskSpec("tags", "multilabel", num_outputs=2), (8, 2), NAN),
        (TaskSpec("pos", "regression", num_outputs=2), (8, 2), NAN),
    ],
    ids=lambda v: v.kind if isinstance(v, TaskSpec) else None,
)
def test_all_missing_batch_gives_zero_loss_connected_to_head(spec, shape, missing):
    head = nn.Linear(4, shape[1] if len(shape) > 1 else 1)
    out = head(torch.randn(8, 4, generator=gen()))
    if len(shape) == 1:
        out = out.squeeze(-1)
    dtype = torch.long if spec.integer_targets else torch.float32
    target_shape = (8,) if spec.kind == "multiclass" else shape
    target = torch.full(target_shape, missing, dtype=dtype)
    total, count = masked_loss(build_loss(spec), spec, out, target)
    assert int(count) == 0
    assert torch.isfinite(total) and total.item() == 0.0
    assert total.requires_grad
    total.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


@pytest.mark.parametrize(("name", "fn"), [("l1", F.l1_loss), ("huber", F.huber_loss), ("smooth_l1", F.smooth_l1_loss)])
def test_short_regression_losses(name, fn):
    spec, out, target, labelled, _ = _regression_case()
    spec = TaskSpec("price", "regression", loss=name)
    total, _, _ = loss_and_grad(spec, out, target)
    torch.testing.assert_close(total, fn(out[labelled], target[labelled], reduction="sum"))


def test_dotted_loss_path():
    spec, out, target, labelled, _ = _multi_regression_case()
    spec = TaskSpec("pos", "regression", num_outputs=3, loss="torch.nn.L1Loss")
    assert isinstance(build_loss(spec), nn.L1Loss)
    total, count, _ = loss_and_grad(spec, out, target)
    torch.testing.assert_close(total, F.l1_loss(out[labelled], target[labelled], reduction="sum"))
    assert int(count) == int(labelled.sum())


def test_loss_args_lists_become_tensors():
    spec, out, target, labelled, _ = _binary_case()
    spec = TaskSpec("clicks", "binary", loss_args={"pos_weight": [3.0]})
    total, _, _ = loss_and_grad(spec, out, target)
    want = F.binary_cross_entropy_with_logits(
        out[labelled], target[labelled], pos_weight=torch.tensor([3.0]), reduction="sum"
    )
    torch.testing.assert_close(total, want)
    # and the weighting really changed the value
    assert not torch.allclose(
        total, F.binary_cross_entropy_with_logits(out[labelled], target[labelled], reduction="sum")
    )


def test_multiclass_loss_args():
    spec, out, target, labelled, _ = _multiclass_case()
    spec = TaskSpec("topic", "multiclass", num_outputs=4, loss_args={"label_smoothing": 0.2})
    total, _, _ = loss_and_grad(spec, out, target)
    torch.testing.assert_close(
        total, F.cross_entropy(out[labelled], target[labelled], label_smoothing=0.2, reduction="sum")
    )


def test_loss_without_reduction_argument():
    with pytest.raises(ValueError, match=r"task 'price': loss 'torch.nn.ReLU' could not be built.*reduction='none'"):
        build_loss(TaskSpec("price", "regression", loss="torch.nn.ReLU"))


def test_unknown_loss():
    with pytest.raises(ValueError, match="task 'price': loss 'nope' is neither a known short name nor a dotted path"):
        build_loss(TaskSpec("price", "regression", loss="nope"))
    with pytest.raises(ValueError, match=r"task 'price': loss 'torch.nn.NoSuchLoss' could not be imported"):
        build_loss(TaskSpec("price", "regression", loss="torch.nn.NoSuchLoss"))


def test_loss_returning_wrong_shape():
    # Cross-entropy reduces over the class dimension: one value per row, not per target entry.
    spec = TaskSpec("pos", "regression", num_outputs=3, loss="ce")
    with pytest.raises(ValueError, match=r"task 'pos': loss 'ce' returned shape \(4,\) for targets of shape \(4, 3\)"):
        masked_loss(build_loss(spec), spec, torch.randn(4, 3), torch.rand(4, 3))


# ------------------------------------------------------------------------------------- target shapes
@pytest.mark.parametrize(
    ("spec", "target"),
    [
        (TaskSpec("clicks", "binary"), torch.tensor([[1.0], [0.0], [NAN]])),
        (TaskSpec("topic", "multiclass", num_outputs=3), torch.tensor([[2], [0], [IGNORE_INDEX]])),
        (TaskSpec("price", "regression"), torch.tensor([[1.5], [NAN], [-2.0]])),
    ],
    ids=["binary", "multiclass", "regression"],
)
def test_canonical_target_accepts_column(spec, target):
    out = canonical_target(spec, target)
    assert out.shape == (3,)
    assert torch.equal(out.nan_to_num(123.0), target.reshape(-1).nan_to_num(123.0))


def test_canonical_target_keeps_multi_output_shapes():
    t = torch.rand(5, 3)
    assert canonical_target(TaskSpec("tags", "multilabel", num_outputs=3), t).shape == (5, 3)
    assert canonical_target(TaskSpec("pos", "regression", num_outputs=3), t).shape == (5, 3)


def test_canonical_target_bool_becomes_float():
    out = canonical_target(TaskSpec("clicks", "binary"), torch.tensor([True, False]))
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "target", "expected"),
    [
        (TaskSpec("clicks", "binary"), torch.zeros(4, 2), r"\(4, 2\), expected \(4,\)"),
        (TaskSpec("tags", "multilabel", num_outputs=3), torch.zeros(4), r"\(4,\), expected \(4, 3\)"),
        (TaskSpec("tags", "multilabel", num_outputs=3), torch.zeros(4, 2), r"\(4, 2\), expected \(4, 3\)"),
        (TaskSpec("pos", "regression", num_outputs=2), torch.zeros(4, 1), r"\(4, 1\), expected \(4, 2\)"),
        (
            TaskSpec("topic", "multiclass", num_outputs=3),
            torch.zeros(4, 3, dtype=torch.long),
            r"expected \(4,\)",
        ),
        (TaskSpec("price", "regression"), torch.tensor(1.0), r"target has shape \(\)"),
    ],
)
def test_canonical_target_rejects_wrong_shapes(spec, target, expected):
    with pytest.raises(TargetError, match=rf"task {spec.name!r} \({spec.kind}.*{expected}"):
        canonical_target(spec, target)


def test_canonical_target_rejects_float_class_indices():
    with pytest.raises(
        TargetError, match=r"task 'topic' \(multiclass\): targets must be integer class indices.*\.long\(\)"
    ):
        canonical_target(TaskSpec("topic", "multiclass", num_outputs=3), torch.tensor([0.0, 2.0]))


def test_label_mask():
    assert label_mask(TaskSpec("c", "binary"), torch.tensor([1.0, NAN, 0.0])).tolist() == [True, False, True]
    spec = TaskSpec("m", "multiclass", num_outputs=3)
    assert label_mask(spec, torch.tensor([IGNORE_INDEX, 0, 2])).tolist() == [False, True, True]


# ------------------------------------------------------------------------------------- target values
@pytest.mark.parametrize("bad", [3, -1, 7])
def test_check_values_multiclass_range(bad):
    spec = TaskSpec("topic", "multiclass", num_outputs=3)
    with pytest.raises(TargetError, match=r"task 'topic' in the train split: class labels must be in \[0, 3\)"):
        check_values(spec, torch.tensor([0, 1, 2, IGNORE_INDEX, bad]), "the train split")


@pytest.mark.parametrize("kind", ["binary", "multilabel"])
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_check_values_zero_one(kind, bad):
    spec = TaskSpec("t", kind, num_outputs=2 if kind == "multilabel" else None)
    target = torch.tensor([0.0, 1.0, NAN, bad])
    if kind == "multilabel":
        target = target.reshape(2, 2)
    with pytest.raises(TargetError, match=rf"{kind} labels must be 0 or 1.*found \[{bad}\]"):
        check_values(spec, target, "batch")


def test_check_values_regression_inf():
    with pytest.raises(TargetError, match="regression targets contain inf; use NaN for missing"):
        check_values(TaskSpec("price", "regression"), torch.tensor([1.0, NAN, -INF]), "batch")


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        (TaskSpec("topic", "multiclass", num_outputs=3), torch.tensor([0, 2, IGNORE_INDEX])),
        (TaskSpec("clicks", "binary"), torch.tensor([0.0, 1.0, NAN])),
        (TaskSpec("clicks", "binary"), torch.tensor([0, 1, IGNORE_INDEX])),
        (TaskSpec("tags", "multilabel", num_outputs=2), torch.tensor([[0.0, NAN], [1.0, 1.0]])),
        (TaskSpec("price", "regression"), torch.tensor([1e30, NAN, -3.0])),
        (TaskSpec("price", "regression"), torch.full((3,), NAN)),
    ],
)
def test_check_values_accepts_good_labels(spec, target):
    check_values(spec, target, "batch")


def test_check_targets_unknown_task():
    specs = {"a": TaskSpec("a", "binary")}
    with pytest.raises(TargetError, match=r"has targets for tasks the model does not declare: \['b'\]"):
        check_targets(specs, {"a": torch.zeros(4), "b": torch.zeros(4)}, 4, "batch", values=False)


def test_check_targets_row_count():
    specs = {"a": TaskSpec("a", "binary")}
    with pytest.raises(TargetError, match="task 'a' in batch: target has 3 rows but the inputs have 4"):
        check_targets(specs, {"a": torch.zeros(3)}, 4, "batch", values=False)


def test_check_targets_non_tensor():
    specs = {"a": TaskSpec("a", "binary")}
    with pytest.raises(TargetError, match="target must be a tensor, got list"):
        check_targets(specs, {"a": [0.0, 1.0]}, 2, "batch", values=False)


def test_check_targets_values_flag():
    specs = {"a": TaskSpec("a", "binary"), "b": TaskSpec("b", "regression")}
    targets = {"a": torch.tensor([0.0, 2.0])}  # a subset of the tasks is fine; the value is not
    check_targets(specs, targets, 2, "batch", values=False)
    with pytest.raises(TargetError, match="must be 0 or 1"):
        check_targets(specs, targets, 2, "batch", values=True)


# -------------------------------------------------------------------------------------------- metrics
def _run_metrics(spec: TaskSpec, batches):
    collection = build_metrics(spec, "val")
    for out, target in batches:
        preds, tgt = metric_inputs(spec, out, canonical_target(spec, target))
        metric_update(collection, spec, preds, tgt)
    return collection.compute()


def _batches(case, n_batches=2):
    """Two batches of one loss case (different seeds), and the labelled rows of both concatenated."""
    spec, out, target, labelled, _ = case()
    out2 = out.flip(0) * 0.5 + 0.1
    target2 = target.roll(5, 0)
    labelled2 = labelled.roll(5, 0)
    batches = [(out, target), (out2, target2)][:n_batches]
    return (
        spec,
        batches,
        torch.cat([out, out2]),
        torch.cat([target, target2]),
        torch.cat([labelled, labelled2]),
    )


def test_binary_metrics_ignore_missing_rows():
    spec, batches, out, target, labelled = _batches(_binary_case)
    got = _run_metrics(spec, batches)
    p, t = out[labelled].sigmoid(), target[labelled].long()
    torch.testing.assert_close(got["val/clicks/accuracy"], TMF.classification.binary_accuracy(p, t))
    torch.testing.assert_close(got["val/clicks/auroc"], TMF.classification.binary_auroc(p, t))
    torch.testing.assert_close(got["val/clicks/f1"], TMF.classification.binary_f1_score(p, t))
    # Sanity: treating the missing rows as labelled would change the answer.
    assert got["val/clicks/accuracy"] != TMF.classification.binary_accuracy(out.sigmoid(), target.nan_to_num(0).long())


def test_multiclass_metrics_ignore_missing_rows():
    spec, batches, out, target, labelled = _batches(_multiclass_case)
    got = _run_metrics(spec, batches)
    p, t = out[labelled], target[labelled]
    torch.testing.assert_close(
        got["val/topic/accuracy"],
        TMF.classification.multiclass_accuracy(p, t, num_classes=4, average="micro"),
    )
    torch.testing.assert_close(
        got["val/topic/f1"], TMF.classification.multiclass_f1_score(p, t, num_classes=4, average="macro")
    )


def test_multilabel_accuracy_ignores_missing_entries():
    spec, batches, out, target, labelled = _batches(_multilabel_case)
    got = _run_metrics(spec, batches)
    want = ((out[labelled] > 0).float() == target[labelled]).float().mean()
    torch.testing.assert_close(got["val/tags/accuracy"], want)


def test_regression_metrics_ignore_missing_rows():
    spec, batches, out, target, labelled = _batches(_regression_case)
    got = _run_metrics(spec, batches)
    p, t = out[labelled], target[labelled]
    torch.testing.assert_close(got["val/price/mae"], TMF.mean_absolute_error(p, t))
    torch.testing.assert_close(got["val/price/mse"], TMF.mean_squared_error(p, t))
    torch.testing.assert_close(got["val/price/r2"], TMF.r2_score(p, t))


def test_multi_output_regression_metrics_use_fully_labelled_rows():
    spec, batches, out, target, labelled = _batches(_multi_regression_case)
    rows = labelled.all(dim=1)
    assert 0 < int(rows.sum()) < len(rows)
    got = _run_metrics(spec, batches)
    p, t = out[rows], target[rows]
    torch.testing.assert_close(got["val/pos/mae"], (p - t).abs().mean())
    torch.testing.assert_close(got["val/pos/mse"], ((p - t) ** 2).mean())
    # R2 per output, then the uniform average
    r2 = torch.stack([TMF.r2_score(p[:, k], t[:, k]) for k in range(3)]).mean()
    torch.testing.assert_close(got["val/pos/r2"], r2)


def test_rmse_is_root_of_mse():
    spec, batches, *_ = _batches(_regression_case)
    spec = TaskSpec("price", "regression", metrics=["mse", "rmse"])
    got = _run_metrics(spec, batches)
    torch.testing.assert_close(got["val/price/rmse"], got["val/price/mse"].sqrt())


def test_metric_args_reach_the_metric():
    spec, batches, out, target, labelled = _batches(_multiclass_case)
    spec = TaskSpec("topic", "multiclass", num_outputs=4, metric_args={"accuracy": {"average": "macro"}})
    got = _run_metrics(spec, batches)
    want = TMF.classification.multiclass_accuracy(out[labelled], target[labelled], num_classes=4, average="macro")
    torch.testing.assert_close(got["val/topic/accuracy"], want)


@pytest.mark.parametrize(
    ("spec", "stage", "keys"),
    [
        (TaskSpec("clicks", "binary"), "val", ["val/clicks/accuracy", "val/clicks/f1", "val/clicks/auroc"]),
        (TaskSpec("topic", "multiclass", num_outputs=3), "train", ["train/topic/accuracy", "train/topic/f1"]),
        (TaskSpec("price", "regression"), "test", ["test/price/mae", "test/price/mse", "test/price/r2"]),
        (TaskSpec("x", "binary", metrics=[]), "val", []),
    ],
)
def test_build_metrics_keys(spec, stage, keys):
    collection = build_metrics(spec, stage)
    assert sorted(f"{stage}/{spec.name}/{k}" for k in collection.keys(keep_base=True)) == sorted(keys)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            TaskSpec("clicks", "binary", metrics=["mae"]),
            r"task 'clicks': metric 'mae' does not apply to a binary task",
        ),
        (
            TaskSpec("price", "regression", metrics=["auroc"]),
            r"metric 'auroc' does not apply to a regression task",
        ),
        (TaskSpec("price", "regression", metrics=["nope"]), r"metric 'nope' is neither a known short name"),
        (TaskSpec("price", "regression", metrics=["torch.nn.Linear"]), r"is not a torchmetrics.Metric class"),
        (TaskSpec("price", "regression", metrics=["torchmetrics.Nope"]), r"could not be imported"),
    ],
)
def test_bad_metric_names(spec, match):
    with pytest.raises(ValueError, match=match):
        build_metrics(spec, "val")


def test_dotted_classification_metric_with_missing_labels():
    spec, batches, out, target, labelled = _batches(_binary_case)
    path = "torchmetrics.classification.BinaryAccuracy"
    spec = TaskSpec("clicks", "binary", metrics=[path, "accuracy"], metric_args={path: {"threshold": 0.3}})
    got = _run_metrics(spec, batches)
    assert set(got) == {"val/clicks/binaryaccuracy", "val/clicks/accuracy"}
    p, t = out[labelled].sigmoid(), target[labelled].long()
    torch.testing.assert_close(
        got["val/clicks/binaryaccuracy"], TMF.classification.binary_accuracy(p, t, threshold=0.3)
    )
    torch.testing.assert_close(got["val/clicks/accuracy"], TMF.classification.binary_accuracy(p, t))


def test_dotted_regression_metric():
    spec, batches, out, target, labelled = _batches(_regression_case)
    spec = TaskSpec("price", "regression", metrics=["torchmetrics.regression.MeanAbsoluteError", "mae"])
    got = _run_metrics(spec, batches)
    torch.testing.assert_close(got["val/price/meanabsoluteerror"], got["val/price/mae"])
    torch.testing.assert_close(got["val/price/mae"], TMF.mean_absolute_error(out[labelled], target[labelled]))


def test_predictions():
    logits = torch.randn(6, 4, generator=gen())
    probs = predictions(TaskSpec("m", "multiclass", num_outputs=4), logits)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    torch.testing.assert_close(predictions(TaskSpec("t", "multilabel", num_outputs=4), logits), logits.sigmoid())
    torch.testing.assert_close(predictions(TaskSpec("r", "regression", num_outputs=4), logits), logits)
    assert predictions(TaskSpec("b", "binary"), torch.tensor([0.0])).item() == pytest.approx(0.5)
    assert math.isclose(predictions(TaskSpec("b", "binary"), torch.tensor([100.0])).item(), 1.0)
