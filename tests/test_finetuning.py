"""EncoderFinetuning: a frozen encoder (and frozen heads) while the heads train, then the encoder at a lower LR."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, REPO, SMALL_DATA, run_cli
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from mtl_lightning import MultiTaskModule
from mtl_lightning import balancers as B
from mtl_lightning.callbacks import EncoderFinetuning
from mtl_lightning.data import SyntheticImageDataModule
from mtl_lightning.encoders import SmallCNN
from mtl_lightning.errors import ConfigError

TASKS = [{"name": "top", "kind": "binary"}, {"name": "shape", "kind": "multiclass", "num_outputs": 4}]
LR = 0.1


def _model(balancer: B.Balancer | None = None) -> tuple[MultiTaskModule, SyntheticImageDataModule]:
    torch.manual_seed(0)
    data = SyntheticImageDataModule(TASKS, num_samples=200, batch_size=32)
    encoder = SmallCNN(data.input_shape, channels=[4, 8], fc_width=16)  # with BatchNorm: statistics must stay put
    model = MultiTaskModule(encoder, data.tasks, balancer, optimizer=functools.partial(torch.optim.SGD, lr=LR))
    return model, data


def _trainer(callbacks: list[Callback], epochs: int, root: Path | None = None, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=root is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


class Snapshots(Callback):
    """The model's state at the start of training and after every epoch, with the optimizer's groups."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.groups: list[list[tuple[set[str], float, str | None]]] = []

    def _take(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.groups.append(
            [({names[id(p)] for p in g["params"]}, g["lr"], g.get("name")) for g in trainer.optimizers[0].param_groups]
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take(trainer, pl_module)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


def _names(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def test_encoder_frozen_then_trained_at_a_fraction_of_the_heads_lr() -> None:
    model, data = _model()
    snaps = Snapshots()
    finetune = EncoderFinetuning(unfreeze_at_epoch=1, backbone_lr_factor=0.1, lr_growth=2.0, freeze_heads=["shape"])
    _trainer([finetune, snaps], epochs=3).fit(model, data)
    start, epoch0, epoch1, epoch2 = snaps.states
    # Epoch 0: the encoder (weights and BatchNorm statistics) is fixed, the free head learns, the frozen one not.
    assert not _changed(start, epoch0, "encoder.")
    assert _changed(start, epoch0, "heads.top.") and not _changed(start, epoch0, "heads.shape.")
    # Epoch 1: the encoder learns too, in its own group at 0.1 x the heads' LR; then the LR doubles.
    encoder_changes = _changed(epoch0, epoch1, "encoder.")
    assert any(k.endswith("weight") for k in encoder_changes) and any("running_mean" in k for k in encoder_changes)
    assert _changed(epoch1, epoch2, "encoder.") and not _changed(start, epoch2, "heads.shape.")
    heads_group = _names(model, "heads.top.")
    assert snaps.groups[1] == [(heads_group, LR, None)]  # frozen parameters are out of the optimizer
    (main, main_lr, _), (encoder, encoder_lr, name) = snaps.groups[2]
    assert main == heads_group and encoder == _names(model, "encoder.") and name == "encoder"
    assert main_lr == LR and encoder_lr == pytest.approx(0.1 * LR)
    assert snaps.groups[3][1][1] == pytest.approx(0.2 * LR)
    assert not any(p.requires_grad for p in model.heads["shape"].parameters())


def test_encoder_lr_grows_up_to_the_heads_lr_and_stays_there() -> None:
    model, data = _model()
    snaps = Snapshots()
    _trainer([EncoderFinetuning(unfreeze_at_epoch=0, backbone_lr_factor=0.25, lr_growth=3.0), snaps], 3).fit(
        model, data
    )
    lrs = [groups[-1][1] for groups in snaps.groups[1:]]
    assert lrs == pytest.approx([0.25 * LR, 0.75 * LR, LR])  # 0.75 x 3 > 1: capped at the heads' LR


def test_unknown_head_names_list_the_tasks() -> None:
    model, data = _model()
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['color'\]; the tasks are \['top', 'shape'\]"):
        _trainer([EncoderFinetuning(freeze_heads=["top", "color"])], 1).fit(model, data)


def test_never_unfreezing_with_trainable_batch_norm() -> None:
    model, data = _model()
    snaps = Snapshots()
    _trainer([EncoderFinetuning(unfreeze_at_epoch=None, train_bn=True), snaps], 2).fit(model, data)
    changed = _changed(snaps.states[0], snaps.states[-1], "encoder.")
    batch_norm = {k for k in snaps.states[0] if k.startswith("encoder.stages.") and ".1." in k}  # conv, BN, ...
    assert changed and set(changed) <= batch_norm, changed
    assert len(snaps.groups[-1]) == 1  # never unfrozen: no encoder group


def test_unfreezing_keeps_what_the_encoder_froze_itself() -> None:
    model, data = _model()
    first_conv = model.encoder.stages[0][0]
    first_conv.weight.requires_grad_(False)  # e.g. ResNetEncoder(freeze_bn=True), or a user's choice
    snaps = Snapshots()
    _trainer([EncoderFinetuning(unfreeze_at_epoch=1), snaps], 2).fit(model, data)
    assert not first_conv.weight.requires_grad and first_conv.bias is None
    assert "encoder.stages.0.0.weight" not in snaps.groups[-1][1][0]
    assert model.encoder.stages[1][0].weight.requires_grad
    assert torch.equal(snaps.states[0]["encoder.stages.0.0.weight"], snaps.states[-1]["encoder.stages.0.0.weight"])


def test_gradient_balancer_runs_on_the_frozen_encoder_output() -> None:
    # A frozen encoder's output needs no grad; the callback makes it a leaf that does, so MGDA (representation mode)
    # still gets the task gradients w.r.t. it. The heads train in epoch 0, the encoder from epoch 1.
    model, data = _model(B.MGDA())
    snaps = Snapshots()
    trainer = _trainer([EncoderFinetuning(unfreeze_at_epoch=1), snaps], 2, log_every_n_steps=1)
    trainer.fit(model, data)
    start, epoch0, epoch1 = snaps.states
    assert not _changed(start, epoch0, "encoder.") and _changed(start, epoch0, "heads.")
    assert _changed(epoch0, epoch1, "encoder.")
    assert "train/balance/weight/top" in trainer.callback_metrics


def test_parameter_mode_balancer_is_refused_while_the_encoder_is_frozen() -> None:
    model, data = _model(B.MGDA(mode="parameter"))
    with pytest.raises(ConfigError, match="mode: representation, or unfreeze_at_epoch: 0"):
        _trainer([EncoderFinetuning(unfreeze_at_epoch=1)], 1).fit(model, data)


def test_resume_after_unfreezing_keeps_training_the_encoder(tmp_path: Path) -> None:
    model, data = _model()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer([EncoderFinetuning(unfreeze_at_epoch=1), checkpoint], 2, root=tmp_path).fit(model, data)
    model, data = _model()  # a fresh process would build everything again
    snaps = Snapshots()
    _trainer([EncoderFinetuning(unfreeze_at_epoch=1), snaps], 3, root=tmp_path).fit(
        model, data, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert _changed(snaps.states[0], snaps.states[-1], "encoder.")  # set-up froze it again; resuming unfroze it
    (_, main_lr, _), (encoder, encoder_lr, _) = snaps.groups[-1]
    assert encoder == _names(model, "encoder.") and encoder_lr == pytest.approx(0.2 * LR) and main_lr == LR


def test_cli_adds_the_callback_from_its_yaml(tmp_path: Path) -> None:
    args = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, *QUIET_TRAINER]
    args += ["--trainer.callbacks+", str(CONFIGS / "callbacks" / "finetune.yaml")]
    args += ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
    cli = run_cli(args, tmp_path)
    assert any(isinstance(cb, EncoderFinetuning) for cb in cli.trainer.callbacks)
    main, encoder = cli.trainer.optimizers[0].param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for p in cli.model.encoder.parameters()}
    # The cosine schedule drives both groups: the encoder's LR stays 0.1 x the heads' as it decays.
    assert main["lr"] < 0.003 and encoder["lr"] == pytest.approx(0.1 * main["lr"])


@pytest.mark.parametrize(
    "scheduler",
    [
        functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 0.5**epoch),
        functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1),  # restarts: per-group base LRs
        functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.2, total_steps=12),
    ],
    ids=["lambda", "cosine_restart", "one_cycle"],
)
def test_lr_schedulers_drive_the_added_encoder_group(scheduler: Any) -> None:
    # torch >= 2.9 schedulers zip their per-group lists strictly: an unregistered group would crash them.
    model, data = _model()
    model.lr_scheduler = scheduler
    model.lr_scheduler_interval = "step" if scheduler.func is torch.optim.lr_scheduler.OneCycleLR else "epoch"
    snaps = Snapshots()
    _trainer([EncoderFinetuning(unfreeze_at_epoch=1, backbone_lr_factor=0.1, lr_growth=2.0), snaps], 4).fit(model, data)
    for ratio, groups in zip([0.1, 0.2, 0.4], snaps.groups[2:], strict=True):
        (_, main_lr, _), (_, encoder_lr, _) = groups
        assert encoder_lr == pytest.approx(ratio * main_lr)


# ---------------------------------------------------------------------------------------------------- DDP
DETERMINISTIC = """
model:
  init_args:
    encoder: {init_args: {dropout: 0.0}}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}
    lr_scheduler: null
data:
  init_args: {num_samples: 320, shuffle: false}
trainer:
  enable_progress_bar: false
  enable_model_summary: false
  max_epochs: 2
"""


def _fit_subprocess(root: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    (root / "deterministic.yaml").write_text(DETERMINISTIC)
    cmd = [
        sys.executable,
        "-m",
        "mtl_lightning",
        "fit",
        "--config",
        str(QUICKSTART),
        "--config",
        str(root / "deterministic.yaml"),
    ]
    cmd += ["--trainer.callbacks+", str(CONFIGS / "callbacks" / "finetune.yaml"), *extra]
    cmd += [
        "--trainer.callbacks+",
        json.dumps({"class_path": "mp_callbacks.DumpRun", "init_args": {"out": str(root / "dump")}}),
    ]
    cmd += ["--trainer.logger.init_args.save_dir", str(root / "runs")]
    dist_env = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in dist_env and not k.startswith("PL_")}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")])), OMP_NUM_THREADS="1"
    )
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(root / "dump" / "weights.pt", weights_only=True)


@pytest.mark.integration  # two CLI runs in subprocesses, one of them on 2 processes
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_trains_the_unfrozen_encoder_like_one_process(tmp_path: Path) -> None:
    # DDP ignores parameters that were frozen when it wrapped the model (Lightning issue #20340); the callback
    # all-reduces their gradients itself, so 2 processes x 32 rows make the same updates as 1 process x 64 rows.
    (tmp_path / "one").mkdir()
    (tmp_path / "ddp").mkdir()
    single = _fit_subprocess(tmp_path / "one", ["--data.init_args.batch_size", "64"])
    ddp = _fit_subprocess(
        tmp_path / "ddp", ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--data.init_args.batch_size", "32"]
    )
    assert single.keys() == ddp.keys()
    diffs = {
        k: (single[k].double() - ddp[k].double()).abs().max().item() for k in single if single[k].is_floating_point()
    }
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # The encoder did train in epoch 1 (after one epoch, all frozen, it still holds its initial weights).
    (tmp_path / "deterministic.yaml").write_text(DETERMINISTIC)
    args = ["fit", "--config", str(QUICKSTART), "--config", str(tmp_path / "deterministic.yaml"), *QUIET_TRAINER]
    args += ["--trainer.callbacks+", str(CONFIGS / "callbacks" / "finetune.yaml"), "--trainer.max_epochs", "1"]
    initial = run_cli(args, tmp_path / "initial").model.state_dict()
    moved = [k for k in single if k.startswith("encoder.") and (single[k] - initial[k]).abs().max() > 1e-4]
    assert moved
