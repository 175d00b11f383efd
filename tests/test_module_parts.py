"""The parts the LightningModule delegates to, tested without a Trainer: heads, per-stage metrics, the step-logging
policy, checkpoint hooks, the FSDP1 unit policy, and the one source of the evaluation loss's weights."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint

from mtl_lightning import checkpoint_hooks
from mtl_lightning.balancers import EqualWeighting, StaticWeighting, UncertaintyWeighting
from mtl_lightning.encoders import MLPEncoder, TransformerEncoder
from mtl_lightning.heads import TaskHeads
from mtl_lightning.module import MultiTaskModule
from mtl_lightning.sharding import encoder_units, encoder_units_policy, register_units
from mtl_lightning.stage_metrics import StageMetrics
from mtl_lightning.step_logging import every_step, log_this_step
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

SPECS = {
    s.name: s
    for s in [TaskSpec("a", "binary"), TaskSpec("m", "multiclass", num_outputs=3), TaskSpec("r", "regression")]
}


def test_task_heads_keep_the_weights_of_kept_tasks_and_follow_the_task_order() -> None:
    heads = TaskHeads()
    heads.sync(SPECS, dict.fromkeys(SPECS, 4))
    kept = heads["m"].net[0].weight.detach().clone()
    specs = {"r": SPECS["r"], "m": SPECS["m"], "new": TaskSpec("new", "multilabel", num_outputs=2)}
    heads.sync(specs, dict.fromkeys(specs, 4))
    assert list(heads) == ["r", "m", "new"]
    assert torch.equal(heads["m"].net[0].weight, kept)
    out = heads.outputs(specs, dict.fromkeys(specs, torch.randn(5, 4)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"r": (5,), "m": (5, 3), "new": (5, 2)}


def test_stage_metrics_take_steps_with_missing_tasks_and_give_the_logged_names() -> None:
    stage = StageMetrics("val", SPECS)
    # step 1: every task; step 2: "m" absent from the batch and "a" unlabelled
    out1 = {"a": torch.tensor([2.0, -2.0]), "m": torch.tensor([[3.0, 0, 0], [0, 0, 3.0]]), "r": torch.tensor([1.0, 2])}
    stage.add(
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([2, 2, 2]),
        out1,
        {"a": torch.tensor([1.0, 0]), "m": torch.tensor([0, 2]), "r": torch.tensor([1.0, 2])},
    )
    out2 = {"a": torch.tensor([0.5]), "m": torch.zeros(1, 3), "r": torch.tensor([0.0])}
    stage.add(
        torch.tensor([0.0, 0.0, 1.0]),
        torch.tensor([0, 0, 1]),
        out2,
        {"a": torch.tensor([float("nan")]), "r": torch.tensor([1.0])},
    )
    logs = stage.epoch_values(torch.tensor([1.0, 1.0, 2.0]))
    assert set(logs) == set(stage.names())
    assert float(logs["val/a/accuracy"]) == 1.0 and float(logs["val/m/accuracy"]) == 1.0
    means = torch.tensor([1.0 / 2, 2.0 / 2, 4.0 / 3], dtype=torch.float64)
    torch.testing.assert_close(logs["val/r/loss"], means[2])
    torch.testing.assert_close(logs["val/loss"], (means * torch.tensor([1.0, 1, 2], dtype=torch.float64)).sum() / 4)
    # reset after the epoch: an epoch without rows logs no metric
    assert "val/a/accuracy" not in stage.epoch_values(torch.ones(3))


def test_stage_metrics_prime_a_task_this_rank_never_saw_with_a_masked_row() -> None:
    stage = StageMetrics("val", SPECS)
    stage.add(
        torch.tensor([1.0, 0, 0]), torch.tensor([1, 0, 0]), {"a": torch.tensor([1.0])}, {"a": torch.tensor([1.0])}
    )
    stage._prime_idle(torch.tensor([True, True, True]), "cpu")
    for metric in stage["m"].values(copy_state=False):
        assert metric.update_count == 1  # primed
    target = SPECS["m"].task_kind.missing_targets(SPECS["m"], 1)
    assert target.tolist() == [IGNORE_INDEX]


def _trainer(callbacks: list[Any], **flags: Any) -> Any:
    connector = SimpleNamespace(should_update_logs=flags.get("update", False))
    return SimpleNamespace(
        callbacks=callbacks, _logger_connector=connector, fast_dev_run=False, is_last_batch=flags.get("last", False)
    )


def test_the_step_logging_option_is_explicit_and_auto_reads_the_callbacks() -> None:
    plain = _trainer([ModelCheckpoint(monitor="val/loss")])
    watching = _trainer([ModelCheckpoint(monitor="train/loss")])
    assert not every_step("auto", plain, None) and every_step("auto", watching, None)
    assert every_step("auto", plain, "train/a/loss")
    assert every_step("every", plain, None) and not every_step("logger", watching, None)
    assert not log_this_step(plain, every=False)
    assert log_this_step(_trainer([], update=True), every=False) and log_this_step(_trainer([], last=True), every=False)
    assert log_this_step(None, every=False) and log_this_step(plain, every=True)


def test_static_weight_overrides_are_also_the_weights_of_the_evaluation_loss() -> None:
    specs = [TaskSpec("a", "regression", weight=1.0), TaskSpec("b", "regression", weight=1.0)]
    model = MultiTaskModule(MLPEncoder((4,), hidden=[8]), specs, balancer=StaticWeighting({"b": 3.0}))
    assert model.static_weights.tolist() == [1.0, 3.0] == model.balancer.weights.tolist()
    assert MultiTaskModule(MLPEncoder((4,)), specs, balancer=EqualWeighting()).static_weights.tolist() == [1.0, 1.0]
    weighted = [TaskSpec("a", "regression", weight=2.0), TaskSpec("b", "regression")]
    dynamic = MultiTaskModule(MLPEncoder((4,)), weighted, balancer=UncertaintyWeighting())
    assert dynamic.static_weights.tolist() == [2.0, 1.0]  # changing weights: the specs' weights score val/loss


def test_checkpoint_hooks_run_for_the_keys_a_checkpoint_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_lightning.compression.checkpoint import on_load

    assert checkpoint_hooks.hooks() == {"compression": on_load}  # this package's own entry point
    seen: list[tuple[str, bool]] = []
    plugin = SimpleNamespace(
        name="acme", load=lambda: lambda model, ckpt, fitting: seen.append((ckpt["acme"], fitting))
    )
    monkeypatch.setattr(
        checkpoint_hooks, "entry_points", lambda group: [plugin] if group == "mtl_lightning.checkpoint_hooks" else []
    )
    checkpoint_hooks.run_load_hooks(nn.Linear(1, 1), {"state_dict": {}, "acme": "v1"}, fitting=True)
    checkpoint_hooks.run_load_hooks(nn.Linear(1, 1), {"state_dict": {}}, fitting=False)
    assert seen == [("v1", True)]


def test_the_fsdp1_policy_wraps_exactly_the_units_of_built_encoders() -> None:
    encoder = TransformerEncoder((16,), vocab_size=32, d_model=16, num_heads=2, num_layers=2)
    units = encoder_units(encoder)
    assert len(units) == 2 and not any(encoder_units_policy(u, False, 0) for u in units)
    register_units(encoder)
    assert all(encoder_units_policy(u, False, 0) for u in units)
    assert not encoder_units_policy(encoder, False, 0) and encoder_units_policy(encoder, True, 0)
    assert "_mtl_fsdp_unit" not in units[0].state_dict()  # a plain mark: no parameter, buffer or submodule


def test_objects_given_in_python_stay_out_of_the_hyperparameters_the_loggers_write() -> None:
    # hparams_initial is what Lightning's loggers write to hparams.yaml: an encoder object there was pickled into
    # YAML with its weights (7 MB and seconds per run start for an MLP of a million parameters).
    model = MultiTaskModule(
        MLPEncoder((8,), hidden=[16]),
        [TaskSpec("y", "binary")],
        balancer=UncertaintyWeighting(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    for hparams in (model.hparams, model.hparams_initial):
        assert not {"encoder", "balancer", "optimizer"} & set(hparams)
        assert hparams["train_metrics"] is True
    assert model._hparams_name == "kwargs"  # load_from_checkpoint passes the hparams as keyword arguments
