"""Bad data and bad training states: one clear error each, raised before anything is checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from mtl_lightning import MultiTaskModule, TaskSpec
from mtl_lightning.data import DataError, MultiTaskDataModule, MultiTaskTensorDataset, SyntheticDataModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.targets import TargetError


class ArrayDataModule(MultiTaskDataModule):
    """The same given tensors for every split."""

    def __init__(self, tasks: list[TaskSpec], inputs: torch.Tensor, targets: dict[str, torch.Tensor]):
        super().__init__(tasks, batch_size=8)
        self.inputs, self.targets = inputs, targets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def build_datasets(self) -> dict:
        ds = MultiTaskTensorDataset(self.inputs, self.targets)
        return {"train": ds, "val": ds, "test": ds}


def _fit(module: MultiTaskModule, dm, root: Path, **kwargs) -> Trainer:
    trainer = Trainer(
        default_root_dir=root,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", monitor="val/loss", save_last=True)],
        **kwargs,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def _module(tasks: list[TaskSpec], features: int = 4) -> MultiTaskModule:
    return MultiTaskModule(MLPEncoder((features,), hidden=[8]), tasks)


def test_nonfinite_loss_names_the_task_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    tasks = [TaskSpec("ok", "binary"), TaskSpec("huge", "regression")]
    x = torch.randn(32, 4)
    targets = {"ok": (x[:, 0] > 0).float(), "huge": torch.full((32,), 3e38)}
    with pytest.raises(FloatingPointError, match=r"task\(s\) \['huge'\] became \[inf\]"):
        _fit(_module(tasks), ArrayDataModule(tasks, x, targets), tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("task", "target", "match"),
    [
        (
            TaskSpec("c", "multiclass", num_outputs=3),
            torch.tensor([0, 1, 5, 2] * 4),
            r"must be in \[0, 3\).*\[0, 5\]",
        ),
        (TaskSpec("c", "multiclass", num_outputs=3), torch.zeros(16), "must be integer class indices"),
        (TaskSpec("b", "binary"), torch.tensor([0.0, 1.0, 2.0, 1.0] * 4), "must be 0 or 1"),
        (TaskSpec("r", "regression"), torch.zeros(16, 2), r"target has shape \(16, 2\), expected \(16,\)"),
        (
            TaskSpec("r", "regression"),
            torch.zeros(12),
            r"same number of rows, got \{'inputs': 16, 'targets.r': 12\}",
        ),
    ],
)
def test_bad_targets_are_refused_at_setup(task: TaskSpec, target: torch.Tensor, match: str, tmp_path: Path) -> None:
    dm = ArrayDataModule([task], torch.randn(16, 4), {task.name: target})
    with pytest.raises((TargetError, DataError, ValueError), match=match):
        _fit(_module([task]), dm, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_declared_task_without_data(tmp_path: Path) -> None:
    tasks = [TaskSpec("a", "binary"), TaskSpec("b", "regression")]
    dm = ArrayDataModule(tasks, torch.randn(16, 4), {"a": torch.ones(16)})
    with pytest.raises(DataError, match=r"tasks \['b'\] are declared but the training data has no targets"):
        _fit(_module(tasks), dm, tmp_path)


def test_data_task_unknown_to_the_model(tmp_path: Path) -> None:
    data_tasks = [TaskSpec("a", "binary"), TaskSpec("extra", "regression")]
    dm = ArrayDataModule(data_tasks, torch.randn(16, 4), {"a": torch.ones(16), "extra": torch.zeros(16)})
    with pytest.raises(TargetError, match=r"tasks the model does not declare: \['extra'\]"):
        _fit(_module([TaskSpec("a", "binary")]), dm, tmp_path)


def test_empty_split(tmp_path: Path) -> None:
    dm = SyntheticDataModule([TaskSpec("a", "binary")], num_samples=10, val_fraction=0.01, test_fraction=0.3)
    with pytest.raises(DataError, match="the 'val' split is empty"):
        dm.setup("fit")


class _SampleDataset(Dataset):
    """Per-sample dicts (no batch fast path), so only the module's first-batch check sees the labels."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"inputs": torch.randn(4), "targets": {"c": torch.tensor(7)}}


def test_module_checks_label_values_of_any_dataloader(tmp_path: Path) -> None:
    module = _module([TaskSpec("c", "multiclass", num_outputs=3)])
    trainer = Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(TargetError, match=r"first train batch.*\[0, 3\)"):
        trainer.fit(module, train_dataloaders=DataLoader(_SampleDataset(), batch_size=4))


def test_batch_without_targets_dict_is_explained() -> None:
    module = _module([TaskSpec("a", "binary")])
    with pytest.raises(TypeError, match=r"batch must be a dict \{'inputs'"):
        module.training_step((torch.randn(4, 4), torch.ones(4)), 0)
