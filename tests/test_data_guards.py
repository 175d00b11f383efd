"""Nothing silently dropped: text cells in a numeric feature, a task without labels in a split, a table too small
for its splits. Each is one DataError (a ConfigError, shown as one line) naming what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mtl_lightning.data import DataError, MultiTaskDataModule, MultiTaskTensorDataset, TabularDataModule
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

BINARY = {"name": "y", "kind": "binary"}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def numbers_with_text(n: int, text: dict[int, str]) -> str:
    """A CSV of ``n`` rows: numeric ``x`` (with the given text cells, by 0-based row), string ``colour``, 0/1 ``y``."""
    rows = "".join(f"{text.get(i, i * 1.5)},{'red' if i % 3 else 'blue'},{i % 2}\n" for i in range(n))
    return "x,colour,y\n" + rows


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, ConfigError)
    return message


# ------------------------------------------------------------------------------------- text in a numeric column
@pytest.mark.parametrize("bad", ["abc", "?", "12,5"])
def test_text_cells_in_a_numeric_column_are_refused_with_their_lines(tmp_path, bad):
    path = write(tmp_path, "t.csv", numbers_with_text(40, {3: f'"{bad}"', 17: "missing"}))
    with pytest.raises(DataError) as err:
        TabularDataModule([BINARY], path=path).input_shape  # noqa: B018
    message = one_line(err)
    assert "feature column 'x'" in message and repr(path) in message
    # rows 3 and 17 (0-based) are lines 5 and 19 of the file, the header being line 1
    assert f"line 5 {bad!r}, line 19 'missing'" in message
    assert "2 of its 40 filled cells are text" in message
    assert "leave a cell empty" in message
    assert "set categorical: ['x', 'colour']" in message  # every column to one-hot, as the list replaces the guess


def test_text_cell_in_the_val_file_names_that_file(tmp_path):
    train = write(tmp_path, "train.csv", "x,y\n1,0\n2,1\n3,0\n4,1\n")
    val = write(tmp_path, "val.csv", "x,y\n1,0\n2,1\nabc,0\n")
    with pytest.raises(DataError) as err:
        TabularDataModule([BINARY], train_path=train, val_path=val).input_shape  # noqa: B018
    message = one_line(err)
    assert f"'x' is mostly numbers but 1 of its 7 filled cells is text: {val!r} line 4 'abc'" in message
    assert repr(train) not in message


def test_many_text_cells_show_the_first_ones_and_the_count(tmp_path):
    path = write(tmp_path, "t.csv", numbers_with_text(40, {i: f"bad{i}" for i in range(0, 16, 2)}))
    with pytest.raises(DataError) as err:
        TabularDataModule([BINARY], path=path).input_shape  # noqa: B018
    message = one_line(err)
    assert "line 2 'bad0', line 4 'bad2', line 6 'bad4', line 8 'bad6', line 10 'bad8' … (8 in all)" in message


def test_text_cells_in_a_parquet_file_are_named_by_row(tmp_path):
    pytest.importorskip("pyarrow")
    table = pd.DataFrame({"x": [str(v) for v in range(10)], "y": [v % 2 for v in range(10)]})
    table.loc[6, "x"] = "oops"
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    with pytest.raises(DataError, match=r"t\.parquet' row 6 \(from 0\) 'oops'"):
        TabularDataModule([BINARY], path=str(path)).input_shape  # noqa: B018


def test_a_column_listed_as_categorical_is_one_hot_encoded(tmp_path):
    path = write(tmp_path, "t.csv", numbers_with_text(40, {3: "abc"}))
    dm = TabularDataModule([BINARY], path=path, categorical=["x", "colour"])
    train_cells = {"abc" if i == 3 else str(i * 1.5) for i in dm.split_rows["train"]}
    assert dm.categories["x"] == sorted(train_cells)  # one category per distinct train cell, as before
    assert dm.feature_names[-2:] == ["colour=blue", "colour=red"]


def test_text_columns_and_missing_markers_are_not_flagged(tmp_path):
    # mostly text with a few numbers: a category (as before); "n/a" and empty cells are missing values in CSV
    rows = "".join(
        f"{'7' if i < 3 else ['red', 'green'][i % 2]},{'n/a' if i == 4 else '' if i == 5 else i},{i % 2}\n"
        for i in range(20)
    )
    path = write(tmp_path, "t.csv", "colour,x,y\n" + rows)
    dm = TabularDataModule([BINARY], path=path)
    assert dm.categories["colour"] == ["7", "green", "red"]
    assert "x" in dm.feature_stats


# ---------------------------------------------------------------------------------------- no labels in a split
class SplitsDataModule(MultiTaskDataModule):
    """Given targets per split, over random inputs."""

    def __init__(self, tasks: list[TaskSpec], targets: dict[str, dict[str, torch.Tensor]]):
        super().__init__(tasks)
        self.split_targets = targets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3,)

    def build_datasets(self) -> dict:
        return {
            split: MultiTaskTensorDataset(torch.randn(next(iter(t.values())).shape[0], 3), t)
            for split, t in self.split_targets.items()
        }


TASKS = [
    TaskSpec("churn", "binary"),
    TaskSpec("segment", "multiclass", num_outputs=4),
    TaskSpec("tags", "multilabel", num_outputs=3),
    TaskSpec("spend", "regression", num_outputs=2),
    TaskSpec("visits", "count"),
]


def labelled(n: int) -> dict[str, torch.Tensor]:
    """Targets of every task in TASKS, each with one missing entry (still labelled)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for spec in TASKS:
        kind = spec.task_kind
        target = kind.label_from_signal(spec, torch.randn(n, generator=g), g)
        if spec.kind == "count":
            target = target.abs().round()
        missing = kind.missing_targets(spec, 1)
        target[0] = missing[0]
        out[spec.name] = target
    return out


@pytest.mark.parametrize("task", [t.name for t in TASKS])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_task_without_labels_in_a_split_is_refused(task, split):
    spec = next(t for t in TASKS if t.name == task)
    targets = {s: labelled(12) for s in ("train", "val", "test")}
    targets[split][task] = spec.task_kind.missing_targets(spec, 12)
    dm = SplitsDataModule(TASKS, targets)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = one_line(err)
    assert f"task {task!r} has no labels in the {split!r} split (all 12 rows missing)" in message
    assert "remove the task" in message


def test_partly_labelled_splits_and_an_unlabelled_predict_split_are_accepted():
    targets = {s: labelled(12) for s in ("train", "val", "test")}
    targets["predict"] = {spec.name: spec.task_kind.missing_targets(spec, 12) for spec in TASKS}
    dm = SplitsDataModule(TASKS, targets)
    dm.setup("fit")
    dm.setup("predict")


def test_a_table_task_without_labels_in_val_names_the_task_and_split(tmp_path):
    train = write(tmp_path, "train.csv", "x,y,churn\n1,0,1\n2,1,0\n3,0,\n")
    val = write(tmp_path, "val.csv", "x,y,churn\n1,0,\n2,1,\n")
    dm = TabularDataModule([BINARY, {"name": "churn", "kind": "binary"}], train_path=train, val_path=val)
    with pytest.raises(DataError, match=r"task 'churn' has no labels in the 'val' split \(all 2 rows missing\)"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- too few rows
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_a_table_too_small_for_its_splits_gives_the_empty_split_error(tmp_path, rows):
    # a categorical column: encoding its empty val split used to raise an IndexError
    path = write(tmp_path, "t.csv", "colour,x,y\n" + "".join(f"{'rb'[i % 2]},{i},{i % 2}\n" for i in range(rows)))
    dm = TabularDataModule([BINARY], path=path)
    assert dm.input_shape == (len({"rb"[i % 2] for i in range(rows)}) + 1,)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert "the 'val' split is empty: give more rows or change the split fractions" in one_line(err)


def test_split_fractions_that_leave_no_training_rows(tmp_path):
    path = write(tmp_path, "t.csv", "colour,x,y\nr,1,0\nb,2,1\n")
    with pytest.raises(DataError) as err:
        TabularDataModule([BINARY], path=path, val_fraction=0.4, test_fraction=0.4).input_shape  # noqa: B018
    message = one_line(err)
    assert "the 'train' split is empty" in message and "2 row(s)" in message and "split fractions" in message
