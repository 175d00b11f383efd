"""Task kinds as plug-ins: each built-in kind's contract, the count kind, and a kind defined here by dotted path."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchmetrics
from conftest import QUICKSTART, QUIET_TRAINER, run_cli
from torch import Generator, Tensor

from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.kinds import BUILTIN, IGNORE_INDEX, KindError, TaskKind, get_kind
from mtl_lightning.kinds.regression import RegressionKind
from mtl_lightning.losses import build_loss, masked_loss
from mtl_lightning.metrics import build_metrics, metric_inputs, metric_update
from mtl_lightning.targets import TargetError, check_values
from mtl_lightning.tasks import TaskSpec, TaskSpecError

SPECS = {
    "binary": TaskSpec("b", "binary"),
    "multiclass": TaskSpec("m", "multiclass", num_outputs=3),
    "multilabel": TaskSpec("l", "multilabel", num_outputs=3),
    "regression": TaskSpec("r", "regression", num_outputs=2),
    "count": TaskSpec("c", "count"),
}


class ProportionKind(RegressionKind):
    """A test kind: a share in [0, 1] per sample; a logit out, BCE on the soft target, the sigmoid as prediction."""

    name: ClassVar[str] = ""
    default_loss: ClassVar[str] = "bce"
    default_metrics: ClassVar[tuple[str, ...]] = ("mae",)

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        if ((values < 0) | (values > 1)).any():
            raise TargetError(f"task {spec.name!r} in {where}: proportions must be in [0, 1]")

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        return output.sigmoid()

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        return torch.sigmoid((signal - signal.mean()) / signal.std())


def test_every_builtin_short_name_resolves_to_its_kind() -> None:
    assert list(BUILTIN) == ["binary", "multiclass", "multilabel", "regression", "count"]
    for name in BUILTIN:
        kind = get_kind(name)
        assert isinstance(kind, TaskKind) and kind.name == name
        assert get_kind(name) is kind  # stateless: one instance per kind


@pytest.mark.parametrize("name", list(SPECS))
def test_a_fully_missing_target_masks_every_entry_and_gives_a_zero_loss(name: str) -> None:
    spec = SPECS[name]
    kind = spec.task_kind
    target = kind.missing_targets(spec, 4)
    assert tuple(target.shape) == kind.target_shape(spec, 4)
    assert not kind.label_mask(spec, target).any()
    out = torch.randn(kind.output_shape(spec, 4), requires_grad=True)
    total, count = masked_loss(build_loss(spec), spec, out, target)
    assert float(total) == 0.0 and int(count) == 0
    total.backward()
    assert out.grad is not None and not out.grad.any()


@pytest.mark.parametrize("name", list(SPECS))
def test_labels_from_a_signal_are_valid_targets_of_the_kind(name: str) -> None:
    spec = SPECS[name]
    signal = torch.randn(500, generator=torch.Generator().manual_seed(0))
    target = spec.task_kind.label_from_signal(spec, signal, torch.Generator().manual_seed(1), noise=0.1)
    target = spec.task_kind.canonical_target(spec, target)  # the right shape and dtype, else it raises
    check_values(spec, target, "the test")  # the right values, else it raises
    assert target.shape[0] == 500 and target.unique().numel() > 1


def test_the_count_kind_is_poisson_regression_on_a_log_rate() -> None:
    spec = SPECS["count"]
    assert (spec.loss_name, spec.metric_names, spec.num_outputs) == ("poisson", ["mae", "poisson_deviance"], 1)
    log_rate = torch.tensor([0.0, 1.0, -0.5, 2.0])
    counts = torch.tensor([1.0, 3.0, float("nan"), 6.0])
    total, n = masked_loss(build_loss(spec), spec, log_rate, counts)
    labelled = ~counts.isnan()
    expected = torch.nn.functional.poisson_nll_loss(log_rate[labelled], counts[labelled], reduction="sum")
    torch.testing.assert_close(total, expected)
    assert int(n) == 3
    torch.testing.assert_close(spec.task_kind.predictions(spec, log_rate), log_rate.exp())

    collection = build_metrics(spec, "val")
    metric_update(collection, spec, *metric_inputs(spec, log_rate, counts))
    got = collection.compute()
    rate = log_rate[labelled].exp()
    torch.testing.assert_close(got["val/c/mae"], (rate - counts[labelled]).abs().mean())
    deviance = torchmetrics.functional.tweedie_deviance_score(rate, counts[labelled], power=1.0)
    torch.testing.assert_close(got["val/c/poisson_deviance"], deviance)


def test_count_targets_must_be_non_negative() -> None:
    with pytest.raises(TargetError, match="count targets must be finite and >= 0"):
        check_values(SPECS["count"], torch.tensor([1.0, -2.0]), "the first train batch")


def test_the_synthetic_data_makes_count_labels_like_every_other_kind() -> None:
    dm = SyntheticDataModule([TaskSpec("visits", "count"), TaskSpec("b", "binary")], num_samples=400, missing_rate=0.2)
    y = dm.generate().targets["visits"]
    labelled = y[~y.isnan()]
    assert y.dtype == torch.float32 and y.isnan().any()
    assert (labelled >= 0).all() and torch.equal(labelled, labelled.round()) and labelled.unique().numel() > 2


def test_an_unknown_kind_or_a_class_that_is_no_kind_is_one_clear_error() -> None:
    with pytest.raises(TaskSpecError, match=r"task 't': unknown kind 'ordinal'; use one of binary, .*count"):
        TaskSpec("t", "ordinal")
    with pytest.raises(TaskSpecError, match=r"is not a subclass of mtl_lightning\.kinds\.TaskKind"):
        TaskSpec("t", "torch.nn.Linear")
    with pytest.raises(KindError):
        get_kind("no_such_module.Kind")


def test_a_kind_by_dotted_path_gets_its_own_loss_metrics_predictions_and_columns() -> None:
    spec = TaskSpec("share", f"{__name__}.ProportionKind")
    assert isinstance(spec.task_kind, ProportionKind)
    assert (spec.loss_name, spec.metric_names, spec.num_outputs) == ("bce", ["mae"], 1)
    with pytest.raises(TargetError, match="proportions must be in"):
        check_values(spec, torch.tensor([0.2, 1.5]), "x")
    values = np.array([0.25, 0.75], dtype=np.float32)
    assert list(spec.task_kind.columns(spec, values, 0.5)) == ["share"]


def test_a_kind_defined_in_a_test_trains_predicts_and_logs_through_the_cli(tmp_path: Path) -> None:
    tasks = [{"name": "share", "kind": f"{__name__}.ProportionKind"}, {"name": "visits", "kind": "count"}]
    args = ["--data.init_args.tasks", json.dumps(tasks), "--data.init_args.num_samples", "600"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", *QUIET_TRAINER]
    cli = run_cli(["fit", "--config", str(QUICKSTART), *args, "--trainer.logger", "false"], tmp_path)
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"val/share/mae", "val/visits/mae", "val/visits/poisson_deviance", "train/share/loss"} <= set(logged)
    assert all(math.isfinite(v) for v in logged.values())
    model = cli.model
    model.eval()
    with torch.no_grad():
        predictions = model.predict_step({"inputs": torch.randn(5, 64)}, 0)
    assert ((predictions["share"] > 0) & (predictions["share"] < 1)).all()
    assert (predictions["visits"] > 0).all()


def test_missing_labels_follow_the_kinds_rule() -> None:
    assert SPECS["multiclass"].task_kind.missing_targets(SPECS["multiclass"], 2).tolist() == [IGNORE_INDEX] * 2
    assert SPECS["count"].task_kind.missing_targets(SPECS["count"], 2).isnan().all()


def test_no_core_file_tests_a_kinds_name() -> None:
    """What depends on a kind lives in its class: the core files never compare a spec's kind to a name."""
    package = Path(__file__).resolve().parents[1] / "mtl_lightning"
    core = ["module.py", "tasks.py", "targets.py", "losses.py", "metrics.py", "heads.py", "stage_metrics.py"]
    core += ["export.py", "callbacks/prediction_writer.py", "data/synthetic.py", "data/sequences.py"]
    names = "|".join(BUILTIN)
    pattern = re.compile(rf"""(?<!dtype)\.kind\s*(==|!=|\bin\b|\bnot in\b)|["']({names})["']""")
    offending = {
        f"{path}:{i}": line.strip()
        for path in core
        for i, line in enumerate((package / path).read_text().splitlines(), 1)
        if pattern.search(line)
    }
    assert not offending, offending
