"""The benchmark tool: Δm% math, suite validation, and a tiny suite end to end (run, table, CSV, resume)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import CONFIGS, QUICKSTART
from jsonargparse import Namespace

import mtl_lightning.bench.__main__ as bench_main
from mtl_lightning.bench.delta import delta_m, markdown, summarise
from mtl_lightning.bench.plan import Job, Plan, RunSpec, make_plan, restrict_args
from mtl_lightning.bench.resolve import Primary, _tasks_of_data_module, logged_test_metrics, primary_metric
from mtl_lightning.bench.results import Row
from mtl_lightning.bench.runner import RunResult
from mtl_lightning.bench.suite import SINGLE_TASK, SuiteError, TaskChoice, load_suite
from mtl_lightning.errors import ConfigError

# --------------------------------------------------------------------------------------------------- Δm% math


def test_delta_m_is_zero_when_equal() -> None:
    values = {"a": 0.8, "b": 1.5}
    assert delta_m(values, values, {"a": True, "b": False}) == 0.0


def test_delta_m_sign_follows_the_direction_of_each_metric() -> None:
    # 10% higher: a gain (negative Δm%) when higher is better, a loss (positive Δm%) when lower is better.
    assert delta_m({"a": 0.88}, {"a": 0.8}, {"a": True}) == pytest.approx(-10.0)
    assert delta_m({"a": 0.88}, {"a": 0.8}, {"a": False}) == pytest.approx(10.0)
    assert delta_m({"a": 0.45}, {"a": 0.5}, {"a": False}) == pytest.approx(-10.0)


def test_delta_m_is_the_mean_over_tasks() -> None:
    multi = {"acc": 0.88, "err": 0.45, "mse": 1.2}  # +10%, +10% (lower is better), -20% (lower is better)
    single = {"acc": 0.8, "err": 0.5, "mse": 1.0}
    directions = {"acc": True, "err": False, "mse": False}
    assert delta_m(multi, single, directions) == pytest.approx(-(10 + 10 - 20) / 3)


def test_delta_m_negative_baseline_keeps_the_direction() -> None:
    # An R² of -0.5 raised to -0.25 is a gain: relative to |baseline| it is 50%, so Δm% = -50.
    assert delta_m({"r2": -0.25}, {"r2": -0.5}, {"r2": True}) == pytest.approx(-50.0)


def test_delta_m_refuses_mismatched_tasks_and_zero_baselines() -> None:
    with pytest.raises(ValueError, match="same tasks"):
        delta_m({"a": 1.0}, {"a": 1.0, "b": 1.0}, {"a": True, "b": True})
    with pytest.raises(ValueError, match="'a' is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})


def _rows(variant: str, run: str, task: str, metric: str, by_seed: dict[int, float], time: float = 1.0) -> list[Row]:
    return [Row(variant, run, s, task, metric, v, time, "best val/loss") for s, v in by_seed.items()]


def test_summary_compares_each_seed_with_the_single_task_means() -> None:
    primaries = {"a": Primary("a", "test/a/acc", True), "b": Primary("b", "test/b/mae", False)}
    rows = [
        *_rows(SINGLE_TASK, "single_task/a", "a", "test/a/acc", {0: 0.7, 1: 0.9}),  # mean 0.8
        *_rows(SINGLE_TASK, "single_task/b", "b", "test/b/mae", {0: 0.5, 1: 0.5}, time=2.0),  # mean 0.5
        *_rows(SINGLE_TASK, "single_task/b", "b", "test/b/loss", {0: 9.0, 1: 9.0}),  # not a primary: ignored
        *_rows("mt", "mt", "a", "test/a/acc", {0: 0.88, 1: 0.8}),
        *_rows("mt", "mt", "b", "test/b/mae", {0: 0.45, 1: 0.5}),
    ]
    lines = {line.variant: line for line in summarise(rows, primaries, ["mt", "missing"])}
    assert list(lines) == [SINGLE_TASK, "mt", "missing"]
    mt = lines["mt"]
    seed0, seed1 = -(10 + 10) / 2, (0 + 0) / 2  # per seed, against the means 0.8 and 0.5
    assert mt.seeds == 2
    assert mt.delta is not None and mt.delta.mean == pytest.approx((seed0 + seed1) / 2)
    assert mt.delta.std == pytest.approx(math.sqrt(2) * 5)  # sample std of (10, 0)
    assert mt.metrics["a"] is not None and mt.metrics["a"].mean == pytest.approx(0.84)
    st = lines[SINGLE_TASK]
    assert st.delta is not None and st.delta.mean == pytest.approx(0.0)  # (-12.5 + 12.5) / 2 on a, 0 on b
    assert st.time_s is not None and st.time_s.mean == pytest.approx(3.0)  # a seed of baselines: its runs together
    assert lines["missing"].delta is None and lines["missing"].seeds == 0
    table = markdown(list(lines.values()), primaries)
    assert "a acc ↑" in table and "b mae ↓" in table
    assert "| mt | 2 | 0.8400 ± 0.0566 | 0.4750 ± 0.0354 | -5.00 ± 7.07 |" in table


# ------------------------------------------------------------------------------------------ suite validation


def _write_suite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_unknown_keys_are_named_with_the_allowed_ones(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: []}\nseed: 3\n")
    with pytest.raises(SuiteError, match=r"unknown key\(s\) \['seed'\]; allowed keys are .*'seeds'"):
        load_suite(path)
    path = _write_suite(tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: []}\nsingle_task: {mode: data}\n")
    with pytest.raises(SuiteError, match=r"single_task: unknown key\(s\) \['mode'\].*'restrict'"):
        load_suite(path)
    path = _write_suite(tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: {arg: []}}\n")
    with pytest.raises(SuiteError, match=r"variants.ew: unknown key\(s\) \['arg'\]"):
        load_suite(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("variants: {ew: []}\n", "missing key 'config'"),
        ("config: configs/nope.yaml\nvariants: {ew: []}\n", "file 'configs/nope.yaml' not found"),
        ("config: configs/quickstart.yaml\nvariants: {ew: [--model.balancer, no.yaml]}\n", "'no.yaml' not found"),
        ("config: configs/quickstart.yaml\nvariants: {single_task: []}\n", "variant name 'single_task'"),
        ("config: configs/quickstart.yaml\nvariants: {ew: []}\nseeds: 0\n", "seeds must be a count >= 1"),
        ("config: configs/quickstart.yaml\nvariants: {ew: []}\nsingle_task: {restrict: x}\n", "restrict must be"),
    ],
)
def test_bad_suites_fail_with_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SuiteError, match=message):
        load_suite(_write_suite(tmp_path, text))


def test_a_task_without_baseline_is_named(tmp_path: Path) -> None:
    path = _write_suite(
        tmp_path,
        "config: configs/quickstart.yaml\nvariants: {ew: []}\n"
        "single_task: {restrict: none, tasks: {purchase: [--trainer.max_epochs, '1']}}\n",
    )
    with pytest.raises(SuiteError, match=r"no single-task baseline for task\(s\) \['segment', 'spend'\]"):
        make_plan(load_suite(path))


def test_a_metric_that_is_not_logged_names_the_logged_ones(tmp_path: Path) -> None:
    path = _write_suite(tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: []}\ntasks: {purchase: aucroc}\n")
    with pytest.raises(SuiteError) as err:
        make_plan(load_suite(path))
    message = str(err.value)
    assert "metric 'test/purchase/aucroc' of task 'purchase' is not logged" in message
    assert "'test/purchase/auroc'" in message and "'test/purchase/accuracy'" in message


def test_a_metric_missing_from_a_finished_run_names_what_it_logged(tmp_path: Path) -> None:
    plan = Plan(jobs=[], primaries={"a": Primary("a", "test/a/auroc", True)})
    spec = RunSpec(Job("ew", "ew", ("a",), ()), 0, tmp_path)
    result = RunResult({"test/a/loss": 0.5, "test/a/accuracy": 0.7}, 1.0, "final")
    with pytest.raises(SuiteError, match=r"did not log metric 'test/a/auroc'.*\['test/a/accuracy', 'test/a/loss'\]"):
        bench_main._check_logged(spec, result, plan)


def test_metric_directions_come_from_torchmetrics_unless_the_suite_says() -> None:
    regression = logged_test_metrics({"name": "y", "kind": "regression"})
    assert regression == {"test/y/loss": False, "test/y/mae": False, "test/y/mse": False, "test/y/r2": True}
    binary = logged_test_metrics({"name": "c", "kind": "binary"})
    assert binary["test/c/auroc"] is True
    assert primary_metric("y", TaskChoice(), regression, "here") == Primary("y", "test/y/mae", False)
    forced = primary_metric("y", TaskChoice("mse", higher_is_better=True), regression, "here")
    assert forced == Primary("y", "test/y/mse", True)
    with pytest.raises(SuiteError, match="does not say whether higher is better"):
        primary_metric("y", TaskChoice("custom"), {"test/y/custom": None}, "here")


def test_tasks_a_data_module_completes_are_read_from_it() -> None:
    # Data modules that derive their task specs (census: `tasks: null` picks a group) are asked for them.
    data = Namespace(
        class_path="mtl_lightning.data.SyntheticDataModule",
        init_args=Namespace(tasks=[{"name": "a", "kind": "multiclass", "num_outputs": 3}], num_samples=50),
    )
    (spec,) = _tasks_of_data_module(data, "here")
    assert (spec.name, spec.kind, spec.num_outputs) == ("a", "multiclass", 3)
    with pytest.raises(SuiteError, match="no data section"):
        _tasks_of_data_module(None, "here")


def test_single_task_restrictions() -> None:
    specs = {"a": {"name": "a", "kind": "binary"}, "b": {"name": "b", "kind": "regression"}}
    (arg,) = restrict_args("schedule", "a", specs)
    flag, value = arg.split("=", 1)
    assert flag == "--trainer.callbacks+"
    assert json.loads(value) == {"class_path": "mtl_lightning.callbacks.TaskSchedule", "init_args": {"stop": {"b": 0}}}
    (arg,) = restrict_args("data", "b", specs)
    assert arg.startswith("--data.init_args.tasks=") and json.loads(arg.split("=", 1)[1]) == [specs["b"]]
    assert restrict_args("none", "a", specs) == []


@pytest.mark.parametrize("path", sorted((CONFIGS / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_loads_and_plans(path: Path) -> None:
    # Parses every job's arguments (no training, no data download): names, files, tasks and metrics all check.
    suite = load_suite(path)
    plan = make_plan(suite)
    assert [j.variant for j in plan.jobs] == [SINGLE_TASK] * len(plan.primaries) + list(suite.variants)
    if suite.tune:  # every tuned key exists in every job's config (what tune_plan checks before its first trial)
        from mtl_lightning.bench.resolve import parse_config
        from mtl_lightning.sweep.spec import check_keys

        for job in plan.jobs:
            check_keys(parse_config(job.args, job.run), list(suite.tune["space"]), job.run)


# ------------------------------------------------------------------------------------------------ end to end
TINY = [
    "--data.init_args.num_samples",
    "600",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.limit_test_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
]


def _csv_runs(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # eleven short trainings: ~10 s on 2 quiet CPU cores
def test_tiny_suite_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = _write_suite(
        tmp_path,
        f"name: tiny\nconfig: {QUICKSTART}\nseeds: [0, 1]\n"
        "variants:\n  equal: [--model.balancer, configs/balancer/equal.yaml]\n"
        "  pcgrad: {args: [--model.balancer, configs/balancer/pcgrad.yaml]}\n",
    )
    out = tmp_path / "out"
    assert bench_main.main([str(suite), "--out", str(out), "--", *TINY]) == 0

    table = (out / "results.md").read_text()
    for name in (SINGLE_TASK, "equal", "pcgrad"):
        assert f"| {name} | 2 |" in table
    for label in ("purchase accuracy ↑", "segment accuracy ↑", "spend mae ↓", "Δm% ↓"):  # first metrics by default
        assert label in table
    rows = _csv_runs(out / "results.csv")
    runs = {(r["run"], r["seed"]) for r in rows}
    names = ["single_task/purchase", "single_task/segment", "single_task/spend", "equal", "pcgrad"]
    assert runs == {(n, s) for n in names for s in ("0", "1")}
    baseline = [r for r in rows if r["run"] == "single_task/spend"]
    assert {r["task"] for r in baseline} == {"spend"}  # a baseline stands only for its own task
    assert {r["metric"] for r in baseline} == {"test/spend/loss", "test/spend/mae", "test/spend/mse", "test/spend/r2"}
    assert {r["task"] for r in rows if r["run"] == "equal"} == {"purchase", "segment", "spend"}
    assert all(float(r["wall_time_s"]) > 0 and r["checkpoint"] == "best val/loss" for r in rows)
    assert (out / "runs" / "equal" / "seed_1" / "checkpoints" / "best.ckpt").is_file()

    # Without --resume an existing CSV is kept, with a clear error.
    with pytest.raises(SuiteError, match="--resume"):
        bench_main.main([str(suite), "--out", str(out), "--", *TINY])

    # An interrupted benchmark: the CSV lacks one run. --resume runs that one only.
    kept = [r for r in rows if (r["run"], r["seed"]) != ("equal", "1")]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    calls = []
    real = bench_main.run_in_process
    monkeypatch.setattr(bench_main, "run_in_process", lambda args: calls.append(args) or real(args))
    assert bench_main.main([str(suite), "--out", str(out), "--resume", "--", *TINY]) == 0
    assert len(calls) == 1 and "equal/seed_1" in " ".join(calls[0])
    again = _csv_runs(out / "results.csv")
    assert {(r["run"], r["seed"]) for r in again} == runs
    assert again[: len(kept)] == kept  # earlier results untouched
    # The same seed gives the same numbers in a later process state (every run re-seeds everything).
    values = {r["metric"]: r["value"] for r in rows if (r["run"], r["seed"]) == ("equal", "1")}
    assert {r["metric"]: r["value"] for r in again[len(kept) :]} == values


def test_keep_going_records_the_other_runs_and_fails_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = _write_suite(
        tmp_path, f"config: {QUICKSTART}\nseeds: 1\ntasks: [purchase, spend]\nvariants: {{equal: []}}\n"
    )

    def fake_run(args: list[str]) -> RunResult:  # a run's metrics without training: values from the run's name
        if "single_task/spend/seed_0" in " ".join(args):
            raise FloatingPointError("the loss of task(s) ['spend'] became [nan]")
        value = 0.6 if "equal" in " ".join(args) else 0.5
        return RunResult({"test/purchase/accuracy": value, "test/spend/mae": value}, 1.0, "final")

    monkeypatch.setattr(bench_main, "run_in_process", fake_run)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError):
        bench_main.main([str(suite), "--out", str(out)])
    assert {r["run"] for r in _csv_runs(out / "results.csv")} == {"single_task/purchase"}  # what ran before
    assert bench_main.main([str(suite), "--out", str(out), "--overwrite", "--keep-going"]) == 1
    assert {r["run"] for r in _csv_runs(out / "results.csv")} == {"single_task/purchase", "equal"}
    table = (out / "results.md").read_text()
    assert "| equal | 1 | 0.6000 | 0.6000 | — |" in table  # no Δm% without every baseline


# ------------------------------------------------------------------------------------------ intervals and tests
def test_interval_and_welch_test_against_textbook_values() -> None:
    from mtl_lightning.bench.stats import mean_interval, welch_p

    low, high = mean_interval([1.0, 2.0, 3.0])  # mean 2, s 1, t(0.975, 2) = 4.3027
    assert (low, high) == pytest.approx((2 - 4.3027 / math.sqrt(3), 2 + 4.3027 / math.sqrt(3)), abs=1e-4)
    # t = -3.674 with 4 degrees of freedom (equal spreads), two-sided p = 0.0213.
    assert welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.0213, abs=1e-4)
    # Unequal spreads: t = -2.067 with Welch-Satterthwaite's 3.37 degrees of freedom (p = 0.1205), not the pooled
    # test's 6 (Student's p = 0.0843).
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 6.0, 10.0, 14.0]
    assert welch_p(a, b) == pytest.approx(0.1205, abs=1e-3)
    assert welch_p([1.0], [2.0, 3.0]) is None and mean_interval([1.0]) is None
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0


def test_the_table_tests_each_variant_against_equal_weighting_and_single_task() -> None:
    primaries = {"a": Primary("a", "test/a/acc", True)}
    rows = [
        *_rows(SINGLE_TASK, "single_task/a", "a", "test/a/acc", {0: 0.80, 1: 0.82, 2: 0.78}),
        *_rows("ew", "ew", "a", "test/a/acc", {0: 0.81, 1: 0.80, 2: 0.82}),
        *_rows("pcgrad", "pcgrad", "a", "test/a/acc", {0: 0.90, 1: 0.91, 2: 0.89}),
    ]
    lines = summarise(rows, primaries, ["ew", "pcgrad"])
    table = markdown(lines, primaries)
    assert "| variant | seeds | a acc ↑ | Δm% ↓ | Δm% 95% CI | p vs EW | p vs STL | time/seed (s) |" in table
    from mtl_lightning.bench.stats import welch_p

    by = {line.variant: line for line in lines}
    p_ew = welch_p(by["pcgrad"].deltas, by["ew"].deltas)
    assert p_ew is not None and p_ew < 0.01  # 11 points better on every seed
    row = next(r for r in table.splitlines() if r.startswith("| pcgrad "))
    assert f"| {p_ew:.3f} |" in row
    ew_row = next(r for r in table.splitlines() if r.startswith("| ew "))
    assert ew_row.split(" | ")[5] == "—"  # equal weighting is not tested against itself


# ------------------------------------------------------------------------------------------ tuned protocol
LR = "model.init_args.optimizer.init_args.lr"


def test_every_job_gets_the_same_tuning_budget_and_its_best_config(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("optuna")
    from mtl_lightning.bench.plan import Job, Plan
    from mtl_lightning.bench.tuning import tune_plan
    from mtl_lightning.sweep import runner

    calls: list[tuple[str, ...]] = []

    def fake_train(args: list[str], run_dir: Path, study=None, waiting=None) -> dict:
        # Validation metrics peak at lr = 10^-2.5 (task a) and 10^-3 (task b); the test split is never asked for.
        lr = float(next(a for a in args if a.startswith(f"--{LR}=")).split("=", 1)[1])
        calls.append(tuple(args))
        x = math.log10(lr)
        return {"state": "complete", "metrics": {"val/a/acc": 1 - abs(x + 2.5) / 10, "val/b/mae": 0.1 + abs(x + 3)}}

    monkeypatch.setattr(runner, "train", fake_train)
    plan = Plan(
        jobs=[
            # Real config files: tune_plan checks the tuned key in each job's config before its first trial.
            Job("single_task/a", SINGLE_TASK, ("a",), ("--config", str(CONFIGS / "quickstart.yaml"))),
            Job(
                "single_task/b",
                SINGLE_TASK,
                ("b",),
                ("--config", str(CONFIGS / "quickstart.yaml")),
            ),
            Job("ew", "ew", ("a", "b"), ("--config", str(CONFIGS / "quickstart.yaml"))),
        ],
        primaries={"a": Primary("a", "test/a/acc", True), "b": Primary("b", "test/b/mae", False)},
    )
    tune = {"trials": 6, "seed": 7, "space": {LR: {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}}
    with pytest.raises(ConfigError, match=r"tune\.space of 'single_task/a'.*did you mean"):
        tune_plan(plan, {**tune, "space": {LR + "x": tune["space"][LR]}}, tmp_path)
    assert calls == []
    tuned = tune_plan(plan, tune, tmp_path)
    assert len(calls) == 18  # 6 trials for each of the 3 jobs
    assert all("--seed_everything" in c and c[c.index("--seed_everything") + 1] == "7" for c in calls)
    import optuna

    from mtl_lightning.sweep.storage import open_storage

    for job, new in zip(plan.jobs, tuned.jobs, strict=True):
        study = optuna.load_study(
            study_name=job.run, storage=open_storage(str(tmp_path / "tune" / job.run / "study.journal"))
        )
        assert len(study.trials) == 6
        best_lr = study.best_trial.user_attrs[runner.VALUES][LR]
        assert new.args == (*job.args, f"--{LR}={best_lr}")  # the best configuration, appended
    ew = optuna.load_study(study_name="ew", storage=open_storage(str(tmp_path / "tune" / "ew" / "study.journal")))
    # The multi-task job's objective is Δm% on validation against the tuned baselines' best values.
    assert ew.directions[0].name == "MINIMIZE"
    ref = {
        "a": optuna.load_study(
            study_name="single_task/a", storage=open_storage(str(tmp_path / "tune/single_task/a/study.journal"))
        ).best_value,
        "b": optuna.load_study(
            study_name="single_task/b", storage=open_storage(str(tmp_path / "tune/single_task/b/study.journal"))
        ).best_value,
    }
    trial = ew.trials[0]
    m = trial.user_attrs[runner.METRICS]
    expected = 100 / 2 * (-(m["val/a/acc"] - ref["a"]) / ref["a"] + (m["val/b/mae"] - ref["b"]) / ref["b"])
    assert trial.values[0] == pytest.approx(expected)
    # Resumed: the studies are complete, nothing is trained again.
    tune_plan(plan, tune, tmp_path)
    assert len(calls) == 18


def test_a_tune_section_is_checked(tmp_path: Path) -> None:
    path = _write_suite(
        tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: []}\ntune: {trials: 0, space: {a: 1}}\n"
    )
    with pytest.raises(SuiteError, match=r"tune\.trials must be a whole number >= 1"):
        load_suite(path)
    path = _write_suite(
        tmp_path, "config: configs/quickstart.yaml\nvariants: {ew: []}\ntune: {trials: 2, spaces: {}}\n"
    )
    with pytest.raises(SuiteError, match=r"unknown key\(s\) \['spaces'\]"):
        load_suite(path)
