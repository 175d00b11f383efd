"""Transfer learning and dynamic tasks: init_from a checkpoint (what matches is loaded and reported), adding and
removing tasks (YAML and Python API), and a task schedule that enables tasks later."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUICKSTART, QUIET_TRAINER, SMALL_DATA, run_cli
from lightning.pytorch import Callback, Trainer

from mtl_lightning import MultiTaskModule
from mtl_lightning.balancers import UPGrad
from mtl_lightning.callbacks import TaskSchedule
from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

AB = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_outputs=3)]
C = TaskSpec("c", "regression")


def _model(tasks: list[TaskSpec], hidden: tuple[int, ...] = (16, 8), **kwargs) -> MultiTaskModule:
    return MultiTaskModule(encoder=MLPEncoder((6,), hidden=hidden), tasks=tasks, **kwargs)


def _save(model: MultiTaskModule, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_init_from_reuses_encoder_and_kept_heads_and_reports_the_new_one(tmp_path: Path) -> None:
    old = _model(AB)
    new = _model([*AB, C], init_from=str(_save(old, tmp_path / "ab.ckpt")))
    assert _same(new.encoder, old.encoder) and _same(new.heads["a"], old.heads["a"])
    report = new.init_report
    assert report is not None
    assert all(n.startswith("heads.c.") for n in report.new) and report.new
    assert not report.unused and not report.mismatched
    assert "heads.c (2)" in report.summary()


def test_init_from_with_a_task_removed_reports_the_unused_head(tmp_path: Path) -> None:
    old = _model([*AB, C])
    new = _model(AB, init_from=str(_save(old, tmp_path / "abc.ckpt")))
    assert sorted(new.init_report.unused) == ["heads.c.net.0.bias", "heads.c.net.0.weight"]
    assert _same(new.heads["b"], old.heads["b"])


def test_shape_mismatch_fails_unless_told_to_skip(tmp_path: Path) -> None:
    path = _save(_model(AB, hidden=(16, 8)), tmp_path / "ab.ckpt")
    with pytest.raises(ConfigError, match=r"shapes differ for .*encoder.net.2.weight.*init_strict: false"):
        _model(AB, hidden=(16, 4), init_from=str(path))
    model = _model(AB, hidden=(16, 4), init_from=str(path), init_strict=False)
    assert any(m.startswith("encoder.net.2.weight") for m in model.init_report.mismatched)
    assert "encoder.net.0.weight" in model.init_report.loaded  # the first layer still matches


def test_bare_encoder_state_dict_and_include(tmp_path: Path) -> None:
    donor = _model(AB)
    torch.save(donor.encoder.state_dict(), tmp_path / "encoder.pt")
    model = _model([C], init_from=str(tmp_path / "encoder.pt"))
    assert _same(model.encoder, donor.encoder)
    only_encoder = _model(AB, init_from=str(_save(donor, tmp_path / "ab.ckpt")), init_include=["encoder."])
    assert _same(only_encoder.encoder, donor.encoder) and not _same(only_encoder.heads["a"], donor.heads["a"])
    assert all(n.startswith("heads.") for n in only_encoder.init_report.excluded)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "is not a file"), ("not a checkpoint", "cannot read"), ({"x": 1}, "holds no state dict")],
)
def test_unreadable_init_files_give_one_clear_error(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "bad.ckpt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=match):
        _model(AB, init_from=str(path))


def test_add_then_remove_a_task_between_fits(tmp_path: Path) -> None:
    data = SyntheticDataModule(tasks=AB, num_samples=400, num_features=6, batch_size=64)
    model = _model(AB)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_a = {k: v.clone() for k, v in model.heads["a"].state_dict().items()}

    model.add_task(C)
    assert model.task_names == ["a", "b", "c"] and list(model.heads) == ["a", "b", "c"]
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert all(torch.equal(v, model.heads["a"].state_dict()[k]) for k, v in head_a.items())
    data3 = SyntheticDataModule(tasks=[*AB, C], num_samples=400, num_features=6, batch_size=64)
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data3)
    assert "val/c/loss" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "abc.ckpt")
    # Built in Python, the encoder is an object the checkpoint cannot hold: pass it (from a config, it is saved).
    loaded = MultiTaskModule.load_from_checkpoint(tmp_path / "abc.ckpt", encoder=MLPEncoder((6,), hidden=(16, 8)))
    assert loaded.task_names == ["a", "b", "c"] and _same(loaded.heads["c"], model.heads["c"])

    model.remove_task("b")
    assert model.task_names == ["a", "c"] and "b" not in model.heads and "b" not in model.val_metrics
    with pytest.raises(ValueError, match="unknown task 'zzz'"):
        model.remove_task("zzz")
    with pytest.raises(ValueError, match=r"already|duplicate"):
        model.add_task(TaskSpec("a", "binary"))


def test_add_a_task_from_yaml_with_init_from(tmp_path: Path) -> None:
    """The README's flow: fit on two tasks, then fit on three from the first run's checkpoint."""
    two = '[{"name": "purchase", "kind": "binary"}, {"name": "segment", "kind": "multiclass", "num_outputs": 4}]'
    base = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, "--trainer.max_epochs", "1"]
    base += ["--trainer.enable_progress_bar", "false"]
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    first = run_cli([*base, "--data.init_args.tasks", two, *logs], tmp_path / "first")
    ckpt = first.trainer.checkpoint_callback.best_model_path
    second = run_cli([*base, *QUIET_TRAINER, "--model.init_args.init_from", ckpt], tmp_path / "second")
    report = second.model.init_report
    assert report is not None and all(n.startswith("heads.spend.") for n in report.new)
    assert second.model.task_names == ["purchase", "segment", "spend"]


def test_schedule_keeps_a_task_off_until_its_epoch(tmp_path: Path) -> None:
    data = SyntheticDataModule(tasks=[*AB, C], num_samples=400, num_features=6, batch_size=64)
    model = _model([*AB, C], balancer=UPGrad())  # a gradient method: the disabled task has no gradient at all
    head_c = {k: v.clone() for k, v in model.heads["c"].state_dict().items()}
    seen: list[dict[str, float]] = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer: Trainer, pl_module: MultiTaskModule) -> None:
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
        callbacks=[TaskSchedule(start={"c": 1}), Record()],
    )
    trainer.fit(model, datamodule=data)
    logged_c = [k for k in seen[0] if "c" in k.split("/")]
    assert not logged_c, f"task c logged while disabled: {logged_c}"
    assert "train/c/loss" in seen[1] and "val/c/loss" in seen[1]
    assert any(not torch.equal(v, model.heads["c"].state_dict()[k]) for k, v in head_c.items())
    assert model.active_tasks == ["a", "b", "c"]  # reset after fit


def test_schedule_bad_input() -> None:
    with pytest.raises(ConfigError, match=r"stops .* before it starts"):
        TaskSchedule(start={"a": 3}, stop={"a": 2})
    model = _model(AB)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[TaskSchedule(start={"x": 1})])
    data = SyntheticDataModule(tasks=AB, num_samples=200, num_features=6, batch_size=64)
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['x'\]"):
        trainer.fit(model, datamodule=data)
