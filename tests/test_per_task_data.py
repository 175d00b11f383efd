"""Per-task datasets and task sampling: sampling frequencies, round robin, determinism and reshuffling, single-task
batches with the right rows, ``all``, DDP sharding (in-process and on 2 CPU processes), sources, bad input, and
training with balancers when tasks are absent from every batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, REPO, run_cli, subprocess_env
from torch.utils.data import Dataset, TensorDataset

from mtl_lightning.data import (
    DataError,
    EvalBatchSampler,
    MultiTaskTensorDataset,
    PerTaskDataModule,
    PerTaskDataset,
    TaskBatchSampler,
    task_probabilities,
)
from mtl_lightning.targets import TargetError
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

EXAMPLE = CONFIGS / "data" / "per_task_example.yaml"
SIZES = {"a": 4000, "b": 1000, "c": 300}
TASKS = [TaskSpec("a", "binary"), TaskSpec("b", "multiclass", num_outputs=3), TaskSpec("c", "regression")]
SOURCES = {"a": {"num_samples": 400}, "b": {"num_samples": 150}, "c": {"num_samples": 50}}


def _module(**kwargs) -> PerTaskDataModule:
    args = {"tasks": TASKS, "sources": SOURCES, "num_features": 8, "batch_size": 16, **kwargs}
    return PerTaskDataModule(**args)


def _sequence(sampler: TaskBatchSampler) -> list[tuple[str, ...]]:
    return [tuple(task for task, _ in parts) for parts in sampler]


def _rows(sampler: TaskBatchSampler) -> list[list[tuple[str, list[int]]]]:
    return [[(task, rows.tolist()) for task, rows in parts] for parts in sampler]


# ------------------------------------------------------------------------------------------ probabilities
def test_task_probabilities_formulas():
    n = np.array([4000, 1000, 300])
    np.testing.assert_allclose(task_probabilities(n, "proportional"), n / n.sum())
    np.testing.assert_allclose(task_probabilities(n, "temperature", 1.0), n / n.sum())
    root = np.sqrt(n)
    np.testing.assert_allclose(task_probabilities(n, "temperature", 2.0), root / root.sum())
    np.testing.assert_allclose(task_probabilities(n, "temperature", 1e9), np.full(3, 1 / 3), atol=1e-6)
    np.testing.assert_allclose(task_probabilities(n, "round_robin"), np.full(3, 1 / 3))
    # huge sizes and a small temperature do not overflow
    p = task_probabilities([10**12, 10**11], "temperature", 0.01)
    assert np.isfinite(p).all() and p[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("sampling", "temperature"), [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)]
)
def test_sampling_frequencies_match_probabilities(sampling, temperature):
    steps = 20000
    sampler = TaskBatchSampler(SIZES, 8, sampling, temperature, steps_per_epoch=steps, seed=3)
    counts = np.bincount(sampler.task_sequence(), minlength=3)
    expected = steps * task_probabilities(list(SIZES.values()), sampling, temperature)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, expected)  # chi-square, 2 degrees of freedom, p = 0.001
    # The batches follow the sequence: one task each.
    first = _sequence(TaskBatchSampler(SIZES, 8, sampling, temperature, steps_per_epoch=50, seed=3))
    assert first == [(list(SIZES)[t],) for t in sampler.task_sequence()[:50]]


def test_round_robin_cycles_tasks_across_epochs():
    sampler = TaskBatchSampler(SIZES, 8, "round_robin", steps_per_epoch=7)
    assert [t for (t,) in _sequence(sampler)] == ["a", "b", "c", "a", "b", "c", "a"]
    sampler.set_epoch(1)  # the cycle goes on where epoch 0 stopped
    assert [t for (t,) in _sequence(sampler)] == ["b", "c", "a", "b", "c", "a", "b"]


def test_default_epoch_is_one_pass_over_the_rows():
    assert len(TaskBatchSampler(SIZES, 100, "temperature", 2.0)) == math.ceil(5300 / 100)
    assert len(TaskBatchSampler(SIZES, 100, "proportional", num_replicas=2)) == math.ceil(5300 / 200)
    assert len(TaskBatchSampler(SIZES, 100, "all")) == 40  # the largest task once
    assert len(TaskBatchSampler(SIZES, 100, "round_robin", steps_per_epoch=9)) == 9


# ------------------------------------------------------------------------------- determinism and rows
def test_seeded_deterministic_and_reshuffled_every_epoch():
    def make(seed: int) -> TaskBatchSampler:
        return TaskBatchSampler(SIZES, 16, "temperature", 2.0, steps_per_epoch=40, seed=seed)

    first = _rows(make(0))
    assert first == _rows(make(0))
    assert _sequence(make(0)) != _sequence(make(1))
    sampler = make(0)
    sampler.set_epoch(1)
    epoch1 = _rows(sampler)
    assert _sequence(sampler) != [tuple(t for t, _ in parts) for parts in first]
    first_a = next(rows for parts in first for task, rows in parts if task == "a")
    epoch1_a = next(rows for parts in epoch1 for task, rows in parts if task == "a")
    assert first_a != epoch1_a  # rows reshuffled too
    sampler.set_epoch(0)
    assert _rows(sampler) == first  # a function of (seed, epoch) only


def test_each_task_pass_covers_its_rows_once():
    sampler = TaskBatchSampler({"a": 64, "b": 32}, 8, "round_robin", steps_per_epoch=24)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for ((task, rows),) in sampler:
        assert len(rows) == 8 and len(set(rows.tolist())) == 8
        seen[task] += rows.tolist()
    assert sorted(seen["a"][:64]) == list(range(64))  # one full pass of a in the first 8 batches
    assert sorted(seen["b"][:32]) == sorted(seen["b"][32:64]) == list(range(32))  # b: three passes
    assert seen["b"][:32] != seen["b"][32:64]  # each pass reshuffled


def test_shuffle_false_keeps_row_order():
    sampler = TaskBatchSampler({"a": 20, "b": 10}, 4, "round_robin", steps_per_epoch=6, shuffle=False)
    a_then_b = [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [8, 9, 10, 11]]
    # then b's pass has ended (2 rows left over): a new pass starts
    assert [rows.tolist() for ((_, rows),) in sampler] == [*a_then_b, [0, 1, 2, 3]]


@pytest.mark.parametrize("sampling", ["round_robin", "temperature", "all"])
def test_ranks_draw_the_same_task_and_disjoint_rows(sampling):
    # Two ranks with batch 8 see, step by step, the rows of one process with batch 16.
    kwargs = {"sampling": sampling, "temperature": 2.0, "steps_per_epoch": 30, "seed": 5}
    single = _rows(TaskBatchSampler(SIZES, 16, **kwargs))
    ranks = [_rows(TaskBatchSampler(SIZES, 8, num_replicas=2, rank=r, **kwargs)) for r in (0, 1)]
    for step, (whole, r0, r1) in enumerate(zip(single, *ranks, strict=True)):
        assert [t for t, _ in r0] == [t for t, _ in r1] == [t for t, _ in whole], step
        for (_, rows), (_, rows0), (_, rows1) in zip(whole, r0, r1, strict=True):
            assert len(rows0) == len(rows1) == 8 and not set(rows0) & set(rows1)
            assert sorted(rows0 + rows1) == sorted(rows)


def test_tasks_with_fewer_rows_than_processes_are_refused():
    with pytest.raises(DataError, match=r"tasks \['c'\] have fewer training rows \(\{'c': 1\}\) than the 2"):
        TaskBatchSampler({"a": 10, "c": 1}, 4, num_replicas=2, rank=0)


# ------------------------------------------------------------------------------------- datasets, batches
def test_batches_hold_one_task_with_its_rows():
    dm = _module(sampling="temperature", temperature=2.0)
    assert dm.input_shape == (8,)
    assert dm.task_sizes["train"] == {"a": 320, "b": 120, "c": 40}
    train = dm.task_datasets
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(480 / 16)
    for parts, batch in zip(loader.sampler, loader, strict=True):
        ((task, rows),) = parts
        assert list(batch["targets"]) == [task]
        x, y = batch["inputs"], batch["targets"][task]
        source = train[task]["train"]
        torch.testing.assert_close(x, source.inputs[rows])
        torch.testing.assert_close(y, source.targets[task][rows], equal_nan=True)
        assert x.shape == (min(16, len(source)), 8)


def test_all_gives_every_task_each_step_with_other_rows_missing():
    dm = _module(sampling="all", batch_size=4, missing_rate=0.0)
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(320 / 4)
    for batch in list(loader)[:5]:
        assert set(batch["targets"]) == {"a", "b", "c"}
        assert batch["inputs"].shape == (12, 8)
        a, b, c = (batch["targets"][t] for t in "abc")
        assert (~torch.isnan(a)).nonzero().flatten().tolist() == [0, 1, 2, 3]
        assert (b != IGNORE_INDEX).nonzero().flatten().tolist() == [4, 5, 6, 7] and b.dtype == torch.long
        assert (~torch.isnan(c)).nonzero().flatten().tolist() == [8, 9, 10, 11]


def test_eval_batches_cover_every_row_once_one_task_each():
    sizes = {"a": 10, "b": 3, "c": 1}
    one = EvalBatchSampler(sizes, 4)
    assert [p[0][0] for p in one] == ["a", "b", "c", "a", "a"]  # interleaved: every task early
    assert [p[0][0] for p in EvalBatchSampler(sizes, 4, interleave=False)] == ["a", "a", "a", "b", "c"]
    ranks = [EvalBatchSampler(sizes, 2, num_replicas=2, rank=r) for r in (0, 1)]
    # Aligned: the same task at every position on both ranks, and every rank holds rows of every task.
    assert [p[0][0] for p in ranks[0]] == [p[0][0] for p in ranks[1]] == ["a", "b", "c", "a", "a"]
    for task, n in sizes.items():
        labelled = []
        for sampler in ranks:
            for ((t, rows, *masked),) in sampler:
                if t == task:
                    labelled += rows.tolist()[: len(rows) - (masked[0] if masked else 0)]
        assert sorted(labelled) == list(range(n))  # each labelled row once: padding rows are masked
    assert [p[0] for p in ranks[1]][2][2] == 1  # c's one row is rank 0's; rank 1 gets a masked copy
    # Predict: own rows only, no padding.
    predict = [EvalBatchSampler(sizes, 2, False, num_replicas=2, rank=r, aligned=False) for r in (0, 1)]
    assert sorted(r for s in predict for ((_, rows),) in s for r in rows.tolist()) == sorted([*range(10), *range(3), 0])


def test_padding_rows_of_eval_batches_are_unlabelled():
    data = PerTaskDataset(
        {
            "a": TensorDataset(torch.randn(3, 2), torch.ones(3)),
            "b": TensorDataset(torch.randn(3, 2), torch.tensor([0, 1, 2])),
        }
    )
    batch = data[(("a", torch.tensor([2, 0]), 1),)]
    assert batch["targets"]["a"].tolist()[0] == 1.0 and math.isnan(batch["targets"]["a"][1])
    assert data[(("b", torch.tensor([1, 2]), 1),)]["targets"]["b"].tolist() == [1, IGNORE_INDEX]
    assert data.datasets["a"].tensors[1].tolist() == [1.0, 1.0, 1.0]  # the dataset is untouched


def test_val_and_test_loaders_hold_each_task_own_rows():
    dm = _module()
    dm.setup("fit")
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        counts = {}
        for batch in loader:
            (task,) = batch["targets"]
            counts[task] = counts.get(task, 0) + len(batch["inputs"])
        assert counts == dm.task_sizes[split] == {"a": 40, "b": 15, "c": 5}
    predict = [next(iter(b["targets"])) for b in dm.predict_dataloader()]
    assert predict == sorted(predict, key="abc".index)  # task by task


def test_synthetic_sources_are_deterministic_and_related():
    a, b = _module().task_datasets, _module().task_datasets
    torch.testing.assert_close(a["b"]["train"].inputs, b["b"]["train"].inputs)
    assert not torch.equal(a["a"]["train"].inputs[:50], a["b"]["train"].inputs[:50])  # own rows per task
    other = _module(sources={**SOURCES, "b": {"num_samples": 150, "seed": 99}}).task_datasets
    assert not torch.equal(other["b"]["train"].inputs, a["b"]["train"].inputs)


def test_from_datasets_with_tensor_and_plain_datasets():
    class Pairs(Dataset):
        def __init__(self, n: int):
            self.x = torch.randn(n, 6, dtype=torch.float64)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int):
            return {"inputs": self.x[i], "targets": {"b": i % 3}}

    datasets = {
        "a": TensorDataset(torch.randn(50, 6), torch.randint(0, 2, (50,)).float()),  # split by the fractions
        "b": {"train": Pairs(30), "val": Pairs(7)},  # no test rows for b
        "c": {"train": MultiTaskTensorDataset(torch.randn(20, 6), {"c": torch.randn(20)})},
    }
    dm = PerTaskDataModule.from_datasets(TASKS, datasets, batch_size=4, sampling="round_robin")
    assert dm.input_shape == (6,)
    assert dm.task_sizes == {"train": {"a": 40, "b": 30, "c": 20}, "val": {"a": 5, "b": 7}, "test": {"a": 5}}
    batches = list(dm.train_dataloader())
    b = batches[1]
    assert list(b["targets"]) == ["b"] and b["inputs"].dtype == torch.float32 and b["targets"]["b"].dtype == torch.long


def test_subclass_overrides_one_method():
    class MyData(PerTaskDataModule):
        def build_task_datasets(self):
            return {t.name: TensorDataset(torch.randn(40, 5), torch.rand(40).round()) for t in self.tasks}

    tasks = [TaskSpec("x", "binary"), TaskSpec("y", "binary")]
    dm = MyData(tasks, batch_size=8)
    assert dm.input_shape == (5,) and dm.task_sizes["train"] == {"x": 32, "y": 32}


def _table(path: Path, n: int, seed: int, regions: list[str], target: str) -> str:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "id": range(n),
            "age": rng.integers(18, 80, n),
            "visits": rng.poisson(3.0, n),
            "region": rng.choice(regions, n),
            target: rng.integers(0, 2, n),
        }
    )
    frame.to_csv(path, index=False)
    return str(path)


def test_table_sources(tmp_path: Path):
    tasks = [TaskSpec("churn", "binary"), TaskSpec("promo", "binary"), TaskSpec("z", "regression")]
    sources = {
        "churn": {"path": _table(tmp_path / "churn.csv", 200, 0, ["n", "s"], "churn"), "drop": ["id"]},
        "promo": {
            "path": _table(tmp_path / "promo.csv", 60, 1, ["n", "s"], "label"),
            "drop": ["id"],
            "target": "label",
        },
        "z": {"num_samples": 100},
    }
    dm = PerTaskDataModule(tasks, sources=sources, num_features=5, batch_size=8)
    with pytest.raises(DataError, match=r"one shape and dtype.*shape \(5,\).*shape \(4,\)"):
        _ = dm.input_shape  # the tables encode to 4 columns (age, visits, region=n, region=s), the synthetic task to 5
    dm = PerTaskDataModule(tasks, sources=sources, num_features=4, batch_size=8)
    assert dm.input_shape == (4,)
    assert dm.task_sizes["train"] == {"churn": 160, "promo": 48, "z": 80}
    sources["promo"]["path"] = _table(tmp_path / "other.csv", 60, 1, ["n", "w"], "label")
    with pytest.raises(DataError, match=r"tables of tasks 'churn' and 'promo' encode to different feature columns"):
        _ = PerTaskDataModule(tasks, sources=sources, num_features=4).input_shape


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling": "uniform"}, r"unknown sampling 'uniform'; choose one of \['round_robin', 'proportional'"),
        ({"sampling": "temperature", "temperature": 0}, r"temperature must be a finite number > 0"),
        ({"temperature": -2.0}, r"temperature must be a finite number > 0"),
        ({"steps_per_epoch": 0}, r"steps_per_epoch must be >= 1"),
        ({"sources": {"a": {"num_samples": 10}, "b": {"num_samples": 10}}}, r"tasks \['c'\] are declared but have no"),
        ({"sources": {**SOURCES, "d": {"num_samples": 5}}}, r"sources names tasks that are not declared: \['d'\]"),
        ({"sources": {**SOURCES, "c": {"num_samples": 0}}}, r"task 'c' has an empty dataset"),
        ({"sources": {**SOURCES, "c": {"rows": 5}}}, r"sources.c needs num_samples .* or path/train_path"),
        ({"sources": {**SOURCES, "c": {"num_samples": 5, "path": "x.csv"}}}, r"both num_samples .* and a table"),
        (
            {"sources": {**SOURCES, "c": {"num_samples": 5, "drop": ["id"]}}},
            r"sources.c \(synthetic\) has unknown keys",
        ),
        ({"sources": {**SOURCES, "c": {"path": "nope.csv"}}}, r"data file 'nope.csv' does not exist"),
    ],
)
def test_bad_settings_raise_one_clear_error(kwargs, match):
    with pytest.raises(DataError, match=match):
        _module(**kwargs)


def test_bad_datasets_raise_one_clear_error():
    def data(**datasets):
        return PerTaskDataModule.from_datasets(TASKS, datasets)

    ok = {
        "a": TensorDataset(torch.randn(20, 4), torch.ones(20)),
        "b": TensorDataset(torch.randn(20, 4), torch.zeros(20).long()),
    }
    with pytest.raises(DataError, match=r"tasks \['c'\] are declared but have no dataset"):
        _ = data(**ok).input_shape
    with pytest.raises(DataError, match=r"one shape and dtype .* 'train' data of task 'c' has shape \(5,\)"):
        _ = data(**ok, c=TensorDataset(torch.randn(20, 5), torch.randn(20))).input_shape
    with pytest.raises(DataError, match=r"the dataset of task 'c' is empty"):
        _ = data(**ok, c=TensorDataset(torch.randn(0, 4), torch.randn(0))).input_shape
    with pytest.raises(DataError, match=r"task 'c' has an empty training set"):
        _ = data(**ok, c={"train": TensorDataset(torch.randn(0, 4), torch.randn(0))}).input_shape
    with pytest.raises(DataError, match=r"unknown splits \['valid'\]"):
        _ = data(**ok, c={"train": ok["a"], "valid": ok["a"]}).input_shape
    with pytest.raises(DataError, match="has no data: set sources"):
        _ = PerTaskDataModule(TASKS).input_shape
    with pytest.raises(TargetError, match=r"task 'b'.*class labels must be in \[0, 3\)"):
        _ = data(a=ok["a"], b=TensorDataset(torch.randn(20, 4), torch.full((20,), 7)), c=ok["a"]).input_shape


def test_cli_reports_a_bad_sampling_name(tmp_path: Path):
    with pytest.raises(DataError, match="unknown sampling 'mixed'"):
        run_cli(
            ["fit", "--config", str(QUICKSTART), "--data", str(EXAMPLE), "--data.init_args.sampling", "mixed"], tmp_path
        )


# --------------------------------------------------------------------------------- training end to end
SHORT = ["--data.init_args.steps_per_epoch", "15", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0"]
SHORT += ["--trainer.limit_val_batches", "3", "--trainer.enable_model_summary", "false"]


@pytest.mark.parametrize(
    ("balancer", "sampling"), [("upgrad", "temperature"), ("famo", "temperature"), ("upgrad", "all")]
)
def test_balancers_train_on_per_task_batches(balancer, sampling, tmp_path: Path):
    # With temperature sampling two of the three tasks are absent from every batch; with `all` every task is present.
    args = ["fit", "--config", str(QUICKSTART), "--data", str(EXAMPLE), *QUIET_TRAINER, *SHORT]
    args += ["--model.balancer", str(CONFIGS / "balancer" / f"{balancer}.yaml"), "--data.init_args.sampling", sampling]
    cli = run_cli(args, tmp_path)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 15
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    weights = [float(metrics[f"train/balance/weight/{t}"]) for t in ("purchase", "segment", "spend")]
    assert all(math.isfinite(w) for w in weights)


# ------------------------------------------------------------------------------------ two CPU processes
DDP_DATA = """
data:
  init_args:
    num_features: 16
    batch_size: 16
    eval_batch_size: 8
    steps_per_epoch: 12
    sources:
      purchase: {num_samples: 300, val_fraction: 0.004}  # one val row: rank 1 has none
      segment: {num_samples: 200}
      spend: {num_samples: 60}
trainer:
  max_epochs: 2
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  log_every_n_steps: 4
  logger: false
  callbacks: []
"""


@pytest.mark.integration  # a CLI run in a subprocess on 2 processes
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_two_processes_draw_the_same_tasks_on_disjoint_rows(tmp_path: Path):
    cfg = tmp_path / "ddp_data.yaml"
    cfg.write_text(DDP_DATA)
    callback = {"class_path": "per_task_callbacks.RecordBatches", "init_args": {"out": str(tmp_path / "dump")}}
    args = ["fit", "--config", str(QUICKSTART), "--data", str(EXAMPLE), "--config", str(cfg)]
    args += ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--trainer.callbacks+", json.dumps(callback)]
    args += ["--model.balancer", str(CONFIGS / "balancer" / "upgrad.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "mtl_lightning", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hung (killed after {err.timeout} s): {' '.join(cmd)}")
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    assert "unused parameters" not in log, log
    info = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["global_step"] == info[1]["global_step"] == 24
    steps = list(zip(info[0]["train"], info[1]["train"], strict=True))
    assert len(steps) == 24
    for i, (a, b) in enumerate(steps):
        assert a["epoch"] == b["epoch"] and len(a["tasks"]) == 1 and a["tasks"] == b["tasks"], i
        assert len(a["rows"]) == len(b["rows"]) == 16 and not set(a["rows"]) & set(b["rows"]), i
    assert len({s[0]["tasks"][0] for s in steps}) > 1  # several tasks drawn
    epochs = [[s[0]["tasks"] for s in steps if s[0]["epoch"] == e] for e in (0, 1)]
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    # Validation: the same task at each batch on both ranks, although `purchase` has one val row (rank 1 evaluates a
    # masked copy of it), and both ranks end with the same names and values.
    assert info[0]["val"] == info[1]["val"] and ["purchase"] in info[0]["val"]
    assert info[0]["metrics"].keys() == info[1]["metrics"].keys()
    assert {"val/purchase/accuracy", "val/segment/f1", "val/spend/r2"} <= info[0]["metrics"].keys()
    for key, value in info[0]["metrics"].items():
        if key.startswith("val/"):
            assert value == pytest.approx(info[1]["metrics"][key], rel=1e-5), key
