"""Task specs: the defaults each kind gives, and the errors a bad spec or task list raises."""

from __future__ import annotations

import pytest

from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec, TaskSpecError, parse_tasks


@pytest.mark.parametrize(
    ("kind", "num_outputs", "want_outputs", "loss", "metrics"),
    [
        ("binary", None, 1, "bce", ["accuracy", "f1", "auroc"]),
        ("binary", 1, 1, "bce", ["accuracy", "f1", "auroc"]),
        ("multiclass", 5, 5, "ce", ["accuracy", "f1"]),
        ("multilabel", 3, 3, "bce", ["accuracy", "f1"]),
        ("regression", None, 1, "mse", ["mae", "mse", "r2"]),
        ("regression", 4, 4, "mse", ["mae", "mse", "r2"]),
    ],
)
def test_defaults_per_kind(kind, num_outputs, want_outputs, loss, metrics):
    spec = TaskSpec("t", kind, num_outputs=num_outputs)
    assert spec.num_outputs == want_outputs
    assert spec.loss_name == loss
    assert spec.metric_names == metrics
    assert spec.integer_targets == (kind == "multiclass")
    assert spec.is_classification == (kind != "regression")


def test_overrides_replace_defaults():
    spec = TaskSpec("t", "regression", loss="l1", metrics=["rmse"])
    assert spec.loss_name == "l1"
    assert spec.metric_names == ["rmse"]
    assert TaskSpec("t", "binary", metrics=[]).metric_names == []


def test_metric_names_is_a_copy():
    spec = TaskSpec("t", "binary")
    spec.metric_names.append("precision")
    assert spec.metric_names == ["accuracy", "f1", "auroc"]
    assert TaskSpec("u", "binary").metric_names == ["accuracy", "f1", "auroc"]


def test_ignore_index_is_torch_default():
    assert IGNORE_INDEX == -100


def test_unknown_kind():
    with pytest.raises(TaskSpecError, match=r"unknown kind 'classification'.*binary, multiclass"):
        TaskSpec("t", "classification")


@pytest.mark.parametrize("name", ["a.b", "a/b", "", "1task", "has space", "ü", "a\n", "a\tb"])
def test_illegal_names(name):
    with pytest.raises(TaskSpecError, match=r"is not allowed.*no dots or slashes"):
        TaskSpec(name, "binary")


@pytest.mark.parametrize("name", ["a", "_private", "Task_2", "click-through"])
def test_legal_names(name):
    assert TaskSpec(name, "binary").name == name


def test_non_string_name():
    with pytest.raises(TaskSpecError, match="is not allowed"):
        TaskSpec(3, "binary")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["train", "forward", "parameters", "state_dict", "keys", "to", "cuda", "training", "_modules"]
)
def test_names_clashing_with_module_attributes(name):
    with pytest.raises(TaskSpecError, match=rf"{name!r} clashes with an attribute of torch.nn.Module.*{name}_task"):
        TaskSpec(name, "regression")


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("num_outputs", [None, 1, 0])
def test_multi_output_classification_needs_two_outputs(kind, num_outputs):
    what = "classes" if kind == "multiclass" else "labels"
    with pytest.raises(TaskSpecError, match=rf"{kind} task needs num_outputs \(the number of {what}\) >= 2"):
        TaskSpec("t", kind, num_outputs=num_outputs)


def test_binary_with_three_outputs():
    with pytest.raises(TaskSpecError, match=r"binary task has exactly one output.*num_outputs=3"):
        TaskSpec("t", "binary", num_outputs=3)


def test_regression_with_zero_outputs():
    with pytest.raises(TaskSpecError, match="regression needs num_outputs >= 1"):
        TaskSpec("t", "regression", num_outputs=0)


@pytest.mark.parametrize("weight", [-0.5, float("nan")])
def test_bad_weight(weight):
    with pytest.raises(TaskSpecError, match="weight must be >= 0"):
        TaskSpec("t", "binary", weight=weight)


def test_zero_weight_is_allowed():
    assert TaskSpec("t", "binary", weight=0.0).weight == 0.0


def test_bad_head_settings():
    with pytest.raises(TaskSpecError, match=r"head_dropout must be in \[0, 1\)"):
        TaskSpec("t", "binary", head_dropout=1.0)
    with pytest.raises(TaskSpecError, match="head_hidden widths must be >= 1"):
        TaskSpec("t", "binary", head_hidden=[8, 0])


def test_metric_args_for_unlisted_metric():
    with pytest.raises(TaskSpecError, match=r"metric_args given for metrics not in the task's metrics: \['auroc'\]"):
        TaskSpec("t", "multiclass", num_outputs=3, metric_args={"auroc": {"average": "macro"}})
    # The same argument is fine when the metric is listed (explicitly or by default).
    spec = TaskSpec("t", "multiclass", num_outputs=3, metrics=["auroc"], metric_args={"auroc": {"average": "macro"}})
    assert spec.metric_args == {"auroc": {"average": "macro"}}


def test_parse_tasks_duplicates():
    with pytest.raises(TaskSpecError, match=r"duplicate task names \['a'\]"):
        parse_tasks([{"name": "a", "kind": "binary"}, {"name": "b", "kind": "binary"}, TaskSpec("a", "regression")])


def test_parse_tasks_empty():
    with pytest.raises(TaskSpecError, match="no tasks declared"):
        parse_tasks([])


def test_parse_tasks_mixes_specs_and_mappings_in_order():
    spec = TaskSpec("b", "regression")
    specs = parse_tasks([{"name": "a", "kind": "multiclass", "num_outputs": 3}, spec])
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[0] == TaskSpec("a", "multiclass", num_outputs=3)
    assert specs[1] is spec


def test_from_any_unknown_keys():
    with pytest.raises(TaskSpecError, match=r"task 'a': unknown keys \['num_classes'\]; allowed: .*'num_outputs'"):
        TaskSpec.from_any({"name": "a", "kind": "multiclass", "num_classes": 3})


@pytest.mark.parametrize(("spec", "missing"), [({"name": "a"}, "'kind'"), ({"kind": "binary"}, "'name'")])
def test_from_any_missing_required_keys(spec, missing):
    with pytest.raises(TaskSpecError, match=rf"missing required keys \[{missing}\]"):
        TaskSpec.from_any(spec)


def test_from_any_rejects_other_types():
    with pytest.raises(TaskSpecError, match="must be a TaskSpec or a mapping, got list"):
        TaskSpec.from_any(["a", "binary"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("a", "binary"),
        TaskSpec(
            "b",
            "multiclass",
            num_outputs=4,
            weight=0.5,
            loss="ce",
            loss_args={"label_smoothing": 0.1},
            metrics=["accuracy", "f1"],
            metric_args={"f1": {"average": "weighted"}},
            head_hidden=[16, 8],
            head_dropout=0.2,
        ),
        TaskSpec("c", "regression", num_outputs=2, head="torch.nn.Linear", head_args={"bias": False}),
    ],
)
def test_to_dict_round_trip(spec):
    d = spec.to_dict()
    assert isinstance(d, dict)
    assert TaskSpec(**d) == spec
    assert TaskSpec.from_any(d) == spec
    # Plain data: mutating the dict does not reach back into the spec.
    d["loss_args"]["new"] = 1
    d["head_hidden"].append(99)
    assert "new" not in spec.loss_args
    assert 99 not in spec.head_hidden
