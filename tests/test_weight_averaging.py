"""SWA and EMA presets: the checkpointed and validated weights are the average (equal to torch's AveragedModel by
hand), BatchNorm statistics are recomputed for it, and ``--ckpt_path last`` continues the average exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONFIGS, QUICKSTART, mp_callback, run_cli
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from mtl_lightning import MultiTaskModule
from mtl_lightning.callbacks import EMAWeightAveraging, SWAWeightAveraging
from mtl_lightning.callbacks.weight_averaging import recompute_batchnorm
from mtl_lightning.cli import main
from mtl_lightning.errors import ConfigError

# 1200 training rows in batches of 128: 10 steps an epoch.
SMALL = ["--data.init_args.num_samples", "1500", "--data.init_args.batch_size", "128"]
STEPS_PER_EPOCH = 10
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# The quickstart's MLP with BatchNorm and no dropout (training-mode forward passes are then deterministic).
BATCHNORM = ["--model.init_args.encoder.init_args.norm", "batch", "--model.init_args.encoder.init_args.dropout", "0"]


class RecordWeights(Callback):
    """The raw parameters (and buffers) after every optimizer step (``last_batch_only``: the last step of each
    epoch), at the point of the step where the averaging callback reads them."""

    def __init__(self, last_batch_only: bool = False):
        self.last_batch_only = last_batch_only
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.buffers: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if not self.last_batch_only or trainer.is_last_batch:
            self.snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
            self.buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}


def _callback(class_name: str, **init_args: Any) -> list[str]:
    return ["--trainer.callbacks+", json.dumps({"class_path": class_name, "init_args": init_args})]


def _recorder(last_batch_only: bool = False) -> list[str]:
    # Listed before the averaging callback, so it sees the raw weights the average takes in.
    return _callback("test_weight_averaging.RecordWeights", last_batch_only=last_batch_only)


def _fit(root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        *SMALL,
        *QUIET,
        "--trainer.logger.init_args.save_dir",
        str(root),
        *extra,
    ]


def _last(root: Path) -> Path:
    return root / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _recorded(cli: Any) -> list[dict[str, torch.Tensor]]:
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordWeights)).snapshots


def _validate(model: MultiTaskModule, datamodule: Any) -> float:
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return float(trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/loss"])


def _model_with(template: MultiTaskModule, weights: dict[str, torch.Tensor]) -> MultiTaskModule:
    model = copy.deepcopy(template)
    model.load_state_dict(weights, strict=False)
    return model


# --------------------------------------------------------------------------------------------------------- EMA
def test_ema_weights_are_torchs_averaged_model_and_are_what_is_validated_and_saved(tmp_path: Path) -> None:
    decay = 0.9
    ema = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=decay)
    cli = run_cli([*_fit(tmp_path, "--trainer.max_epochs", "2"), *_recorder(), *ema], tmp_path)
    snapshots = _recorded(cli)
    assert len(snapshots) == 2 * STEPS_PER_EPOCH
    ckpt = _load(_last(tmp_path))
    loaded = MultiTaskModule.load_from_checkpoint(_last(tmp_path), map_location="cpu")

    # By hand: torch's AveragedModel with the EMA function, fed the raw weights of every step.
    by_hand = AveragedModel(copy.deepcopy(loaded), multi_avg_fn=get_ema_multi_avg_fn(decay))
    for weights in snapshots:
        by_hand.update_parameters(_model_with(loaded, weights))
    for name, value in by_hand.module.named_parameters():
        torch.testing.assert_close(ckpt["state_dict"][name], value, msg=name)
        torch.testing.assert_close(dict(loaded.named_parameters())[name], value, msg=name)
        torch.testing.assert_close(ckpt["current_model_state"][name], snapshots[-1][name], rtol=0, atol=0)
    assert int(ckpt["averaging_state"]["n_averaged"]) == len(snapshots)
    assert not torch.equal(
        ckpt["state_dict"]["encoder.net.0.weight"], ckpt["current_model_state"]["encoder.net.0.weight"]
    )

    # Validation saw the average: the last logged val/loss is the averaged model's, not the raw one's.
    logged = float(cli.trainer.callback_metrics["val/loss"])
    assert _validate(loaded, cli.datamodule) == pytest.approx(logged, rel=1e-5)
    raw = _validate(_model_with(loaded, ckpt["current_model_state"]), cli.datamodule)
    assert raw != pytest.approx(logged, rel=1e-4)
    # After fit the model itself holds the average (what `trainer.test` right after fit evaluates).
    torch.testing.assert_close(
        cli.model.state_dict()["heads.spend.net.0.weight"], ckpt["state_dict"]["heads.spend.net.0.weight"]
    )


def test_before_the_first_update_the_raw_model_is_validated_and_kept(tmp_path: Path) -> None:
    # Averaging starts at epoch 5 of a 1-epoch run: it never starts.
    ema = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=0.9, update_starting_at_epoch=5)
    with pytest.warns(UserWarning, match="never updated its average"):
        cli = run_cli([*_fit(tmp_path, "--trainer.max_epochs", "1"), *_recorder(), *ema], tmp_path)
    ckpt = _load(_last(tmp_path))
    final = _recorded(cli)[-1]
    for name, value in final.items():  # the trained weights, not the untrained copy the average started from
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=0, atol=0)
        torch.testing.assert_close(dict(cli.model.named_parameters())[name], value, rtol=0, atol=0)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 0


def test_balancer_buffers_are_not_averaged_but_follow_the_raw_model(tmp_path: Path) -> None:
    ema = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=0.9)
    famo = ["--model.balancer", str(CONFIGS / "balancer" / "famo.yaml")]
    cli = run_cli([*_fit(tmp_path, "--trainer.max_epochs", "1"), *famo, *_recorder(), *ema], tmp_path)
    ckpt = _load(_last(tmp_path))
    averaged = ckpt["state_dict"]
    # The buffers are the raw model's at the last update (FAMO updates its own after the callbacks of a step).
    at_last_update = next(c for c in cli.trainer.callbacks if isinstance(c, RecordWeights)).buffers
    buffers = [k for k in averaged if k.startswith("balancer.")]
    assert "balancer.logit_steps" in buffers  # an integer counter: averaging it would be meaningless
    for name in buffers:
        torch.testing.assert_close(averaged[name], at_last_update[name], rtol=0, atol=0, msg=name)


def test_balancer_parameters_are_averaged(tmp_path: Path) -> None:
    # Uncertainty weighting's log-variances are parameters: averaged with the model (only training reads them).
    ema = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=0.9)
    uw = ["--model.balancer", str(CONFIGS / "balancer" / "uncertainty.yaml")]
    cli = run_cli([*_fit(tmp_path, "--trainer.max_epochs", "1"), *uw, *_recorder(), *ema], tmp_path)
    ckpt = _load(_last(tmp_path))
    names = [n for n, _ in cli.model.balancer.named_parameters(prefix="balancer")]
    assert names
    loaded = MultiTaskModule.load_from_checkpoint(_last(tmp_path), map_location="cpu")
    by_hand = AveragedModel(copy.deepcopy(loaded), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for weights in _recorded(cli):
        by_hand.update_parameters(_model_with(loaded, weights))
    for name in names:
        torch.testing.assert_close(ckpt["state_dict"][name], dict(by_hand.module.named_parameters())[name])
        assert not torch.equal(ckpt["state_dict"][name], ckpt["current_model_state"][name])


# --------------------------------------------------------------------------------------------------------- SWA
def test_swa_averages_epoch_ends_and_recomputes_batchnorm_statistics(tmp_path: Path) -> None:
    swa = _callback("mtl_lightning.callbacks.SWAWeightAveraging", start_epoch=1)
    # Unshuffled: the reference below then reads the batches the callback read (the average over batches of their
    # statistics depends on how the rows are grouped).
    args = [*_fit(tmp_path, "--trainer.max_epochs", "3"), *BATCHNORM, "--data.init_args.shuffle", "false"]
    args += [*_recorder(last_batch_only=True), *swa]
    cli = run_cli(args, tmp_path)
    ends = _recorded(cli)  # the weights at the end of epochs 0, 1, 2; SWA averages those of epochs 1 and 2
    ckpt = _load(_last(tmp_path))
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    for name in ends[0]:
        torch.testing.assert_close(averaged[name], (ends[1][name] + ends[2][name]) / 2, msg=name)

    # The averaged model's BatchNorm statistics are its own: recomputed over the training data, like update_bn.
    bn = "encoder.net.1"
    assert not torch.allclose(averaged[f"{bn}.running_mean"], raw[f"{bn}.running_mean"])
    reference = MultiTaskModule.load_from_checkpoint(_last(tmp_path), map_location="cpu")
    update_bn([b["inputs"] for b in cli.datamodule.train_dataloader()], reference)
    for stat in ("running_mean", "running_var"):
        torch.testing.assert_close(averaged[f"{bn}.{stat}"], getattr(reference.encoder.net[1], stat), msg=stat)
    assert int(averaged[f"{bn}.num_batches_tracked"]) == STEPS_PER_EPOCH


def test_recompute_batchnorm_reads_dict_batches_like_update_bn_reads_tensors() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5)).eval()
    xs = [torch.randn(16, 4) * 3 + 1 for _ in range(5)]
    ours, theirs = copy.deepcopy(net), copy.deepcopy(net)
    theirs[2].p = 0.0  # update_bn runs the whole model in training mode; ours keeps dropout off
    before = torch.get_rng_state()
    assert recompute_batchnorm(ours, [{"inputs": x, "targets": {}} for x in xs]) == 5
    assert torch.equal(torch.get_rng_state(), before)  # no dropout mask drawn
    update_bn(xs, theirs)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var)
    assert not torch.allclose(ours[1].running_mean, net[1].running_mean)
    assert not any(m.training for m in ours.modules()) and ours[1].momentum == 0.1  # modes and momentum put back
    with pytest.raises(ValueError, match="gave no batch"):
        recompute_batchnorm(ours, [])


# ------------------------------------------------------------------------------------------------------ resume
# The quickstart's checkpoint callback, saving also every 4 steps: mid-epoch checkpoints of the average (each one
# recomputes the BatchNorm statistics of an average updated since the last).
EVERY_4_STEPS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val/loss
        filename: best
        save_last: true
        enable_version_counter: false
        every_n_train_steps: 4
"""
EMA = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=0.9)


@pytest.mark.parametrize(
    ("averaging", "every_4", "saved_at"),
    [
        (EMA, False, 2 * STEPS_PER_EPOCH),
        (EMA, True, 24),
        (_callback("mtl_lightning.callbacks.SWAWeightAveraging", start_epoch=1), False, 2 * STEPS_PER_EPOCH),
    ],
    ids=["ema", "ema-mid-epoch", "swa"],
)
def test_ckpt_path_last_continues_the_average_exactly(
    averaging: list[str], every_4: bool, saved_at: int, tmp_path: Path
) -> None:
    config = tmp_path / "every4.yaml"
    config.write_text(EVERY_4_STEPS)
    base = ["--trainer.max_epochs", "3", *BATCHNORM, *(["--config", str(config)] if every_4 else []), *averaging]
    run_cli(_fit(tmp_path / "full", *base), tmp_path)
    with pytest.raises(RuntimeError, match="interrupted"):  # mid-epoch 2, after the average started
        main([*_fit(tmp_path / "cut", *base), *mp_callback("RaiseAfterStep", step=2 * STEPS_PER_EPOCH + 5)])
    resumed_from = _load(_last(tmp_path / "cut"))
    assert resumed_from["global_step"] == saved_at and int(resumed_from["averaging_state"]["n_averaged"]) > 0
    run_cli([*_fit(tmp_path / "cut", *base), "--ckpt_path", "last"], tmp_path)
    full, resumed = _load(_last(tmp_path / "full")), _load(_last(tmp_path / "cut"))
    assert (full["epoch"], full["global_step"]) == (resumed["epoch"], resumed["global_step"])
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert list(full[key]) == list(resumed[key])
        for name, value in full[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0, msg=f"{key}: {name}")


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_settings_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"decay must be in \(0, 1\)"):
        EMAWeightAveraging(decay=1.5)
    with pytest.raises(ConfigError, match="update_every_n_steps must be >= 1"):
        EMAWeightAveraging(update_every_n_steps=0)
    with pytest.raises(ConfigError, match="bn_batches must be >= 1 or null"):
        SWAWeightAveraging(bn_batches=0)


def test_sharded_strategies_are_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    class Sharded:
        strategy = FSDPStrategy()

    with pytest.raises(ConfigError, match="cannot follow a sharded one"):
        EMAWeightAveraging().setup(Sharded(), LightningModule(), "fit")  # type: ignore[arg-type]


def test_swa_counted_from_the_end_needs_max_epochs(tmp_path: Path) -> None:
    swa = _callback("mtl_lightning.callbacks.SWAWeightAveraging", start_epoch=-2)
    args = [*_fit(tmp_path, "--trainer.max_epochs", "-1", "--trainer.max_steps", "3")]
    with pytest.raises(ConfigError, match=r"counts from trainer\.max_epochs"):
        run_cli([*args, *swa], tmp_path)


def test_a_model_reparametrised_during_training_is_refused(tmp_path: Path) -> None:
    # Pruning (from epoch 1) adds a mask buffer per layer: the average, matched tensor by tensor, cannot follow.
    prune = ["--trainer.callbacks+", str(CONFIGS / "callbacks" / "prune.yaml")]
    ema = _callback("mtl_lightning.callbacks.EMAWeightAveraging", decay=0.9)
    with pytest.raises(ConfigError, match="parameters or buffers changed during training"):
        run_cli([*_fit(tmp_path, "--trainer.max_epochs", "6"), *prune, *ema], tmp_path)
