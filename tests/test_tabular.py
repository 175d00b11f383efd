"""TabularDataModule: encoding with train statistics, targets per task kind, split modes and input errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mtl_lightning.data.tabular as tabular
from mtl_lightning.data import DataError, TabularDataModule
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

REPO = Path(__file__).resolve().parent.parent
BINARY = {"name": "y", "kind": "binary"}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def trio(tmp_path: Path, train: str, val: str, test: str | None = None) -> dict[str, str]:
    paths = {"train_path": write(tmp_path, "train.csv", train), "val_path": write(tmp_path, "val.csv", val)}
    if test is not None:
        paths["test_path"] = write(tmp_path, "test.csv", test)
    return paths


def random_table(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "row": np.arange(n),
            "x": rng.normal(5.0, 2.0, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "y": rng.integers(0, 2, n),
        }
    )


# ------------------------------------------------------------------------------------------------ features
def test_numeric_features_are_standardised_with_train_statistics_only(tmp_path):
    paths = trio(
        tmp_path,
        train="x,const,y\n1,4,0\n2,4,1\n3,4,0\n",
        val="x,const,y\n5,6,1\n,4,0\n",
        test="x,const,y\n-1,,1\n",
    )
    dm = TabularDataModule([BINARY], **paths)
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    assert dm.feature_names == ["x", "const"]
    assert dm.feature_stats["x"] == pytest.approx((2.0, std))
    assert dm.feature_stats["const"] == (4.0, 1.0)  # std 0 -> 1
    ds = dm.datasets
    torch.testing.assert_close(ds["train"].inputs[:, 0], torch.tensor([-1 / std, 0.0, 1 / std]))
    torch.testing.assert_close(ds["train"].inputs[:, 1], torch.zeros(3))
    # val/test use the train mean/std: 5 -> 3/std, missing -> the train mean -> 0; constant column 6 -> 2
    torch.testing.assert_close(ds["val"].inputs, torch.tensor([[3 / std, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(ds["test"].inputs, torch.tensor([[-3 / std, 0.0]]))
    assert ds["val"].inputs.dtype == torch.float32


def test_single_file_statistics_come_from_the_train_rows(tmp_path):
    table = random_table()
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    dm = TabularDataModule([BINARY], path=str(path), drop=["row"], val_fraction=0.2, test_fraction=0.1, seed=3)
    rows = dm.split_rows
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(len(table)))
    assert [len(rows[s]) for s in ("train", "val", "test")] == [140, 40, 20]
    x_train = table["x"].to_numpy()[rows["train"]]
    mean, std = dm.feature_stats["x"]
    assert mean == pytest.approx(x_train.mean()) and std == pytest.approx(x_train.std())
    assert mean != pytest.approx(table["x"].mean())  # not the whole file's
    x_val = table["x"].to_numpy()[rows["val"]]
    torch.testing.assert_close(dm.datasets["val"].inputs[:, 0], torch.tensor((x_val - mean) / std).float())
    # the split's inputs are its rows: the colour one-hot matches the file's colours
    colours = np.array(dm.categories["colour"])[dm.datasets["val"].inputs[:, 1:].argmax(1).numpy()]
    assert colours.tolist() == table["colour"].to_numpy()[rows["val"]].tolist()


def test_categorical_one_hot_uses_train_categories_and_unseen_or_missing_give_zeros(tmp_path):
    paths = trio(
        tmp_path,
        train="colour,flag,x,y\nred,True,1,0\nblue,False,2,1\nred,True,3,0\n",
        val="colour,flag,x,y\ngreen,True,1,1\n,False,2,0\nblue,,3,1\n",
    )
    dm = TabularDataModule([BINARY], **paths)
    assert dm.input_shape == (5,)
    assert dm.categories == {
        "colour": ["blue", "red"],
        "flag": ["False", "True"],
    }  # bool columns are categorical
    assert dm.feature_names == ["colour=blue", "colour=red", "flag=False", "flag=True", "x"]
    val = dm.datasets["val"].inputs[:, :4]
    expected = [[0, 0, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]]  # green unseen, colour missing, flag missing
    torch.testing.assert_close(val, torch.tensor(expected, dtype=torch.float32))


def test_explicit_categorical_numeric_codes_match_across_int_and_float_files(tmp_path):
    # "zip" is read as int in train but as float in val (a missing cell): 94110 and 94110.0 are one category
    paths = trio(tmp_path, train="zip,x,y\n94110,1,0\n10001,2,1\n", val="zip,x,y\n94110,1,0\n,2,1\n")
    dm = TabularDataModule([BINARY], categorical=["zip"], **paths)
    assert dm.categories == {"zip": ["10001", "94110"]}
    torch.testing.assert_close(dm.datasets["val"].inputs[:, :2], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_explicit_features_and_drop(tmp_path):
    paths = trio(tmp_path, train="id,a,b,y\nu1,1,5,0\nu2,2,6,1\n", val="id,a,b,y\nu3,3,7,1\n")
    assert TabularDataModule([BINARY], drop=["id", "b"], **paths).feature_names == ["a"]
    assert TabularDataModule([BINARY], features=["b", "a"], **paths).feature_names == ["b", "a"]


def test_identifier_left_as_a_feature_warns_and_tsv_files_are_tab_separated(tmp_path):
    rows = "".join(f"u{i}\t{i % 7}\t{i % 2}\n" for i in range(120))
    path = write(tmp_path, "t.tsv", "id\tx\ty\n" + rows)
    with pytest.warns(UserWarning, match="'id' has 84 distinct values.*add it to drop"):
        assert TabularDataModule([BINARY], path=path).input_shape == (84 + 1,)
    assert TabularDataModule([BINARY], path=path, drop=["id"]).feature_names == ["x"]


# ------------------------------------------------------------------------------------------------- targets
def test_string_classes_are_mapped_in_sorted_train_order_and_missing_cells_are_missing_labels(tmp_path):
    paths = trio(
        tmp_path,
        train="x,animal,ok,size\n1,dog,yes,1.5\n2,cat,no,\n3,,yes,2.0\n4,bird,,3.0\n",
        val="x,animal,ok,size\n1,cat,no,0.5\n2,,,\n",
    )
    tasks = [
        {"name": "animal", "kind": "multiclass", "num_outputs": 4},
        {"name": "ok", "kind": "binary"},
        {"name": "size", "kind": "regression"},
    ]
    dm = TabularDataModule(tasks, **paths)
    assert dm.class_names == {"animal": ["bird", "cat", "dog"], "ok": ["no", "yes"]}
    train = dm.datasets["train"].targets
    assert train["animal"].dtype == torch.int64
    assert train["animal"].tolist() == [2, 1, IGNORE_INDEX, 0]
    assert train["ok"].dtype == torch.float32
    torch.testing.assert_close(train["ok"], torch.tensor([1.0, 0.0, 1.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(train["size"], torch.tensor([1.5, math.nan, 2.0, 3.0]), equal_nan=True)
    val = dm.datasets["val"].targets  # rows with missing labels are kept, not dropped
    assert len(dm.datasets["val"]) == 2
    assert val["animal"].tolist() == [1, IGNORE_INDEX]
    torch.testing.assert_close(val["ok"], torch.tensor([0.0, math.nan]), equal_nan=True)


def test_numeric_and_bool_labels(tmp_path):
    paths = trio(
        tmp_path,
        train="x,b,c\n1,True,2\n2,False,0\n3,,\n",
        val="x,b,c\n1,1,1\n2,0,\n",
    )
    tasks = [{"name": "b", "kind": "binary"}, {"name": "c", "kind": "multiclass", "num_outputs": 3}]
    dm = TabularDataModule(tasks, **paths)
    train, val = dm.datasets["train"].targets, dm.datasets["val"].targets
    assert dm.class_names == {}
    torch.testing.assert_close(train["b"], torch.tensor([1.0, 0.0, math.nan]), equal_nan=True)
    assert train["c"].tolist() == [2, 0, IGNORE_INDEX] and val["c"].tolist() == [1, IGNORE_INDEX]
    torch.testing.assert_close(val["b"], torch.tensor([1.0, 0.0]))


def test_multilabel_and_multi_output_regression_read_one_column_per_output(tmp_path):
    paths = trio(
        tmp_path,
        train="x,l1,l2,l3,r1,r2\n1,1,0,,0.5,1.5\n2,0,1,1,,2.5\n",
        val="x,l1,l2,l3,r1,r2\n3,0,0,0,1,2\n",
    )
    tasks = [
        {"name": "tags", "kind": "multilabel", "num_outputs": 3},
        {"name": "pos", "kind": "regression", "num_outputs": 2},
    ]
    dm = TabularDataModule(tasks, target_columns={"tags": ["l1", "l2", "l3"], "pos": ["r1", "r2"]}, **paths)
    assert dm.feature_names == ["x"]
    train = dm.datasets["train"].targets
    nan = math.nan
    torch.testing.assert_close(train["tags"], torch.tensor([[1.0, 0.0, nan], [0.0, 1.0, 1.0]]), equal_nan=True)
    torch.testing.assert_close(train["pos"], torch.tensor([[0.5, 1.5], [nan, 2.5]]), equal_nan=True)
    assert dm.datasets["val"].targets["tags"].shape == (1, 3)


def test_target_columns_rename(tmp_path):
    paths = trio(tmp_path, train="x,label\n1,0\n2,1\n", val="x,label\n3,1\n")
    dm = TabularDataModule([{"name": "churn", "kind": "binary"}], target_columns={"churn": "label"}, **paths)
    assert dm.feature_names == ["x"]
    assert dm.datasets["train"].targets["churn"].tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------------------- split modes
def test_trio_of_files_gives_the_splits_and_predict_uses_test(tmp_path):
    paths = trio(tmp_path, train="x,y\n1,0\n2,1\n3,0\n4,1\n", val="x,y\n5,1\n6,0\n", test="x,y\n7,1\n8,0\n9,1\n")
    dm = TabularDataModule([BINARY], batch_size=2, **paths)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 4, "val": 2, "test": 3, "predict": 3}
    assert dm.split_rows["test"].tolist() == [0, 1, 2]
    batch = next(iter(dm.test_dataloader()))
    assert batch["targets"]["y"].tolist() == [1.0, 0.0]


def test_trio_without_test_file_has_no_test_split(tmp_path):
    dm = TabularDataModule([BINARY], **trio(tmp_path, train="x,y\n1,0\n2,1\n", val="x,y\n5,1\n"))
    dm.setup("fit")
    with pytest.raises(DataError, match="no 'test' split"):
        dm.setup("test")


def test_input_shape_is_available_before_setup_and_files_are_read_once(tmp_path, monkeypatch):
    calls = []
    read = tabular.read_table
    monkeypatch.setattr(tabular, "read_table", lambda path: calls.append(path) or read(path))
    path = tmp_path / "t.csv"
    random_table(50).to_csv(path, index=False)
    dm = TabularDataModule([BINARY], path=str(path), batch_size=8)
    assert calls == []  # lazy: nothing read at construction
    assert dm.input_shape == (5,)  # row, x and three colours
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (8, 5)
    assert dm.input_shape == (5,)
    assert calls == [str(path)]


def test_split_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    path = tmp_path / "t.csv"
    random_table(100).to_csv(path, index=False)

    def splits(seed):
        dm = TabularDataModule([BINARY], path=str(path), seed=seed)
        return {k: (dm.split_rows[k], dm.datasets[k].inputs) for k in ("train", "val", "test")}

    first, again, other = splits(1), splits(1), splits(2)
    for split in first:
        assert np.array_equal(first[split][0], again[split][0])
        assert torch.equal(first[split][1], again[split][1])
    assert not np.array_equal(first["val"][0], other["val"][0])


def test_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    table = random_table(40)
    table["colour"] = table["colour"].astype("category")
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    dm = TabularDataModule([BINARY], path=str(path), drop=["row"], val_fraction=0.25, test_fraction=0.25)
    assert dm.input_shape == (4,)
    assert dm.categories["colour"] == ["blue", "green", "red"]
    assert len(dm.datasets["train"]) == 20


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    dm = TabularDataModule([BINARY], path=write(tmp_path, "t.pq", "not really parquet"))
    with pytest.raises(DataError, match=r'pip install "mtl_lightning\[parquet\]"'):
        dm.input_shape  # noqa: B018


# ------------------------------------------------------------------------------------------------- errors
def test_missing_file_names_the_path_and_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"'nope\.csv' does not exist.*working directory.*{tmp_path.name}"):
        TabularDataModule([BINARY], path="nope.csv")
    with pytest.raises(DataError, match=r"'val\.csv' does not exist"):
        TabularDataModule([BINARY], train_path=write(tmp_path, "train.csv", "x,y\n1,0\n"), val_path="val.csv")


@pytest.mark.parametrize(("text", "match"), [("", "is empty"), ("x,y\n", r"has no rows.*\['x', 'y'\]")])
def test_empty_file(tmp_path, text, match):
    dm = TabularDataModule([BINARY], path=write(tmp_path, "t.csv", text))
    with pytest.raises(DataError, match=match):
        dm.input_shape  # noqa: B018


def test_absent_columns_are_listed_with_the_available_ones(tmp_path):
    path = write(tmp_path, "t.csv", "a,b,y\n1,2,0\n")
    with pytest.raises(DataError, match=r"lacks feature columns \['c', 'd'\].*Available columns: \['a', 'b', 'y'\]"):
        TabularDataModule([BINARY], path=path, features=["a", "c", "d"]).input_shape  # noqa: B018
    with pytest.raises(DataError, match=r"lacks target columns \['z'\].*Available columns"):
        TabularDataModule([{"name": "z", "kind": "binary"}], path=path).input_shape  # noqa: B018
    # a val file without a column of the train file
    paths = trio(tmp_path, train="a,b,y\n1,2,0\n", val="a,y\n1,0\n")
    with pytest.raises(DataError, match=r"val\.csv' lacks feature columns \['b'\]"):
        TabularDataModule([BINARY], **paths).input_shape  # noqa: B018


@pytest.mark.parametrize(
    ("task", "column", "match"),
    [
        ({"name": "t", "kind": "regression"}, "1.5,abc,2", r"non-numeric values \['abc'\]"),
        ({"name": "t", "kind": "binary"}, "a,b,c", "3 distinct value.*binary target needs"),
        ({"name": "t", "kind": "binary"}, "0,1,2", r"values \[2\.0\].*0/1"),
        ({"name": "t", "kind": "multiclass", "num_outputs": 3}, "0,3,1", r"values \[3\.0\].*\[0, 3\)"),
        ({"name": "t", "kind": "multiclass", "num_outputs": 3}, "0,1.5,1", r"integers in \[0, 3\)"),
        (
            {"name": "t", "kind": "multiclass", "num_outputs": 2},
            "a,b,c",
            "3 distinct classes.*num_outputs: 3",
        ),
        ({"name": "t", "kind": "multilabel", "num_outputs": 2}, "x,0,1", "non-numeric"),
    ],
)
def test_target_values_that_do_not_fit_the_kind(tmp_path, task, column, match):
    # the column under test is "t" (for multilabel: "t0", with a valid second label column "t1")
    columns = {"t": ["t0", "t1"]} if task["kind"] == "multilabel" else None
    rows = [f"{i},{v}" + (",1" if columns else "") for i, v in enumerate(column.split(","))]
    text = "x," + ("t0,t1" if columns else "t") + "\n" + "\n".join(rows) + "\n"
    paths = trio(tmp_path, train=text, val=text)
    with pytest.raises(DataError, match=match):
        TabularDataModule([task], target_columns=columns, **paths).input_shape  # noqa: B018


def test_unseen_class_label_in_val(tmp_path):
    paths = trio(tmp_path, train="x,t\n1,a\n2,b\n", val="x,t\n1,c\n")
    with pytest.raises(DataError, match=r"labels \['c'\] that the train split lacks"):
        TabularDataModule([{"name": "t", "kind": "multiclass", "num_outputs": 3}], **paths).input_shape  # noqa: B018


def test_non_numeric_feature_not_listed_as_categorical(tmp_path):
    paths = trio(tmp_path, train="a,b,y\n1,x,0\n2,z,1\n", val="a,b,y\n1,x,0\n")
    with pytest.raises(DataError, match=r"feature column 'b'.*non-numeric.*list 'b' in categorical"):
        TabularDataModule([BINARY], categorical=[], **paths).input_shape  # noqa: B018


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": "P", "train_path": "P"}, "either path .* or train_path.*not both"),
        ({"val_path": "P"}, "val_path given without train_path"),
        ({}, "no data file given"),
        ({"path": "P", "val_fraction": 0.6, "test_fraction": 0.5}, "sum to < 1"),
        ({"path": "P", "target_columns": {"nope": "y"}}, r"not declared: \['nope'\]"),
        ({"path": "P", "drop": ["y"]}, r"\['y'\] are targets but are also listed in drop"),
    ],
)
def test_bad_settings(tmp_path, kwargs, match):
    path = write(tmp_path, "t.csv", "x,y\n1,0\n")
    kwargs = {k: path if v == "P" else v for k, v in kwargs.items()}
    with pytest.raises(DataError, match=match):
        TabularDataModule([BINARY], **kwargs)


def test_number_of_target_columns_must_match_num_outputs(tmp_path):
    path = write(tmp_path, "t.csv", "x,a,b\n1,0,1\n")
    tags = {"name": "tags", "kind": "multilabel", "num_outputs": 3}
    with pytest.raises(DataError, match=r"'tags' \(multilabel, num_outputs=3\) needs 3 target columns.*got 2"):
        TabularDataModule([tags], path=path, target_columns={"tags": ["a", "b"]})
    with pytest.raises(DataError, match=r"needs 3 target columns.*got 1: \['tags'\]"):
        TabularDataModule([tags], path=path)
    pos = {"name": "pos", "kind": "regression", "num_outputs": 2}
    with pytest.raises(DataError, match="needs 2 target columns"):
        TabularDataModule([pos], path=path, target_columns={"pos": ["a"]})


# --------------------------------------------------------------------------------------- shipped example
def test_example_config_builds_batches(monkeypatch):
    monkeypatch.chdir(REPO)  # the config's path is relative to the repository root, where users run `mtl`
    config = yaml.safe_load((REPO / "configs/data/tabular_example.yaml").read_text())
    assert config["class_path"] == "mtl_lightning.data.TabularDataModule"
    args = dict(config["init_args"])
    tasks = [TaskSpec(**t) for t in args.pop("tasks")]
    dm = TabularDataModule(tasks, **args)
    assert dm.input_shape == (6 + 4 + 3,)  # six numeric columns, four regions, three devices
    assert dm.class_names["plan"] == ["basic", "plus", "premium"]
    dm.setup("fit")
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == 1000
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == (64, 13) and batch["inputs"].dtype == torch.float32
    assert not batch["inputs"].isnan().any()
    targets = batch["targets"]
    assert set(targets) == {"churned", "plan", "lifetime_value"}
    assert targets["churned"].shape == (64,) and targets["churned"].dtype == torch.float32
    assert targets["plan"].shape == (64,) and targets["plan"].dtype == torch.int64
    assert targets["lifetime_value"].shape == (64,) and targets["lifetime_value"].dtype == torch.float32
    # about 5% of each target is missing in the file; the labelled values have the task's range
    all_targets = dm.datasets["train"].targets
    assert 0 < all_targets["churned"].isnan().float().mean() < 0.1
    assert 0 < (all_targets["plan"] == IGNORE_INDEX).float().mean() < 0.1
    assert set(all_targets["plan"].unique().tolist()) == {IGNORE_INDEX, 0, 1, 2}
