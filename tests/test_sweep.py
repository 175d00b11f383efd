"""`mtl sweep` without training: the search space, the sweep file's checks, storage, workers' claims, results, report.

The trials' own process is replaced by a function of the sampled values here; tests/test_sweep_cli.py runs real ones.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

from mtl_lightning.errors import ConfigError  # noqa: E402
from mtl_lightning.sweep import cli as sweep_cli  # noqa: E402
from mtl_lightning.sweep import report, runner  # noqa: E402
from mtl_lightning.sweep.space import as_args, parse_param, parse_space  # noqa: E402
from mtl_lightning.sweep.spec import build_spec, check_keys, load_sweep_file, spec_difference  # noqa: E402
from mtl_lightning.sweep.storage import open_storage, redact  # noqa: E402

TASKS = ["purchase", "segment", "spend"]
LOGGED = {
    "val/loss": False,
    "val/purchase/auroc": True,
    "val/segment/accuracy": True,
    "val/spend/mae": False,
    "val/spend/loss": False,
}
WEIGHTS = "model.init_args.balancer.init_args.weights"
REPO = Path(__file__).resolve().parent.parent


def spec_of(**raw: Any) -> Any:
    raw.setdefault("space", {WEIGHTS: {"type": "simplex"}})
    raw.setdefault("objectives", [{"metric": "val/purchase/auroc"}, {"metric": "val/spend/mae"}])
    return build_spec(raw, TASKS, LOGGED)


# ---------------------------------------------------------------------------------------------------- space
def test_simplex_weights_are_a_dirichlet_draw_over_the_tasks() -> None:
    param = parse_param(WEIGHTS, {"type": "simplex"}, TASKS)
    draws = {f"{WEIGHTS}[purchase]": 0.5, f"{WEIGHTS}[segment]": 0.25, f"{WEIGHTS}[spend]": 0.0}
    weights = param.sample(optuna.trial.FixedTrial(draws))
    raw = [-math.log(0.5), -math.log(0.25), -math.log(1e-12)]  # u = 0 is clamped, so every weight is finite
    assert weights == pytest.approx({t: r / sum(raw) for t, r in zip(TASKS, raw, strict=True)})
    assert sum(weights.values()) == pytest.approx(1.0)
    # Over many draws the weights cover the simplex evenly: each task's mean weight is 1/T.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    means = [0.0] * 3
    for _ in range(600):
        w = param.sample(study.ask())
        means = [m + w[t] / 600 for m, t in zip(means, TASKS, strict=True)]
    assert means == pytest.approx([1 / 3] * 3, abs=0.03)


def test_a_simplex_over_chosen_tasks_and_examples() -> None:
    param = parse_param(WEIGHTS, {"type": "simplex", "tasks": ["spend", "purchase"]}, TASKS)
    assert param.example() == {"spend": 0.5, "purchase": 0.5}
    assert parse_param("lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, TASKS).example() == (
        pytest.approx(1e-3)
    )
    assert parse_param("n", {"type": "int", "low": 1, "high": 4}, TASKS).example() == 2


def test_categorical_choices_by_name_pass_their_values() -> None:
    param = parse_param(
        "model.init_args.balancer",
        {"type": "categorical", "choices": {"pcgrad": "configs/balancer/pcgrad.yaml", "ew": {"class_path": "x.EW"}}},
        TASKS,
    )
    assert param.sample(optuna.trial.FixedTrial({"model.init_args.balancer": "ew"})) == {"class_path": "x.EW"}
    listed = parse_param("hidden", {"type": "categorical", "choices": [[256, 128], [64]]}, TASKS)
    assert listed.sample(optuna.trial.FixedTrial({"hidden": "[64]"})) == [64]


def test_values_become_mtl_fit_arguments() -> None:
    args = as_args({"a.lr": 0.01, "b": "configs/x.yaml", WEIGHTS: {"purchase": 0.25}})
    assert args == ["--a.lr=0.01", "--b=configs/x.yaml", f'--{WEIGHTS}={{"purchase": 0.25}}']


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "float", "low": 1.0, "high": 1.0}, "empty or inverted"),
        ({"type": "float", "low": 2.0, "high": 1.0}, "empty or inverted"),
        ({"type": "int", "low": 1.5, "high": 3}, "whole bounds"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log range needs low > 0"),
        ({"type": "float", "low": "a", "high": 1.0}, "`low` must be a number"),
        ({"type": "uniform", "low": 0, "high": 1}, "unknown type 'uniform'"),
        ({"low": 0, "high": 1}, "with a `type`"),
        ({"type": "float", "low": 0, "high": 1, "lo": 3}, "unknown fields ['lo']"),
        ({"type": "categorical", "choices": []}, "`choices` is empty"),
        ({"type": "categorical", "choices": [1, 1]}, "duplicates"),
        ({"type": "simplex", "tasks": ["purchase"]}, "needs two tasks or more"),
        ({"type": "simplex", "tasks": ["purchase", "nope"]}, "unknown tasks ['nope']"),
    ],
)
def test_bad_space_entries_name_the_key_and_the_fix(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="sweep space 'k'") as caught:
        parse_param("k", entry, TASKS)
    assert message in str(caught.value)


def test_a_weights_space_over_a_single_task_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs two tasks or more"):
        parse_space({WEIGHTS: {"type": "simplex"}}, ["only"])


# ---------------------------------------------------------------------------------------------------- spec
def test_objective_directions_come_from_the_metrics() -> None:
    spec = spec_of(objectives=["val/purchase/auroc", {"metric": "val/spend/mae"}, "val/loss"])
    assert spec.directions == ["maximize", "minimize", "minimize"]
    assert spec_of(objectives=[{"metric": "val/spend/mae", "direction": "maximize"}]).directions == ["maximize"]


def test_an_objective_that_is_never_logged_names_those_that_are() -> None:
    with pytest.raises(ConfigError, match="never logged") as caught:
        spec_of(objectives=["val/purchase/auc"])
    assert "did you mean 'val/purchase/auroc'" in str(caught.value)
    assert "val/spend/mae" in str(caught.value)
    with pytest.raises(ConfigError, match="not a validation metric"):
        spec_of(objectives=["test/purchase/auroc"])


def test_delta_m_objective_against_a_reference(tmp_path: Path) -> None:
    reference = {"val/purchase/auroc": 0.8, "val/spend/mae": 0.5}
    spec = spec_of(objectives=[{"delta_m": reference}])
    assert spec.directions == ["minimize"]
    # auroc +10 % (better: -10), mae -20 % (better: -20): mean -15.
    assert spec.objectives[0].value({"val/purchase/auroc": 0.88, "val/spend/mae": 0.4}) == pytest.approx(-15.0)
    (tmp_path / "ref.json").write_text(json.dumps({"state": "complete", "metrics": reference}))
    from_file = spec_of(objectives=[{"delta_m": str(tmp_path / "ref.json")}])
    assert from_file.objectives[0].reference == reference


def test_pruning_needs_one_metric_objective() -> None:
    with pytest.raises(ConfigError, match="single objective"):
        spec_of(pruner={"class_path": "optuna.pruners.MedianPruner"})
    spec_of(pruner={"class_path": "optuna.pruners.MedianPruner"}, objectives=["val/spend/mae"])


def test_sweep_file_sections_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("space: {a: {type: simplex}}\nobjectif: [val/loss]\n")
    with pytest.raises(ConfigError, match=r"unknown sections \['objectif'\]"):
        load_sweep_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_file(tmp_path / "missing.yaml")
    shipped = load_sweep_file(REPO / "configs" / "sweep" / "weights_pareto.yaml")
    assert build_spec(shipped, TASKS, LOGGED).directions == ["maximize", "maximize", "minimize"]


def test_a_key_the_config_lacks_gets_a_did_you_mean() -> None:
    from mtl_lightning.bench.resolve import parse_config

    config = parse_config(["--config", str(REPO / "configs" / "quickstart.yaml")], "t", ConfigError)
    check_keys(config, ["model.init_args.optimizer.init_args.lr", "model.init_args.encoder"], "sweep space")
    with pytest.raises(ConfigError, match=r"no key 'model\.init_args\.optimizer\.init_args\.learning_rate'") as caught:
        check_keys(config, ["model.init_args.optimizer.init_args.learning_rate"], "sweep space")
    assert "did you mean 'model.init_args.optimizer.init_args.lr'" in str(caught.value)
    # The quickstart uses no StaticWeighting: its weights are not a key until `fixed` names the class.
    with pytest.raises(ConfigError, match="needs that class in `fixed`"):
        check_keys(config, [WEIGHTS], "sweep space")


def test_the_difference_between_two_sweeps_is_named() -> None:
    old = {"space": {"a": {"type": "simplex"}, "lr": {"low": 1}}, "objectives": ["val/loss"], "trial_args": ["x"]}
    new = {"space": {"a": {"type": "simplex"}, "wd": {"low": 1}}, "objectives": ["val/loss"], "trial_args": ["y"]}
    assert spec_difference(old, new) == ["space: lr, wd", 'trial_args: ["x"] -> ["y"]']


# ---------------------------------------------------------------------------------------------------- storage
def test_an_unreachable_storage_is_one_line_naming_it_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        open_storage(f"sqlite:///{tmp_path}/no/such/dir/study.db")
    message = str(caught.value)
    assert "cannot open the study storage sqlite:///" in message and "\n" not in message
    assert redact("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    with pytest.raises(ConfigError, match="folder that does not exist"):
        open_storage(str(tmp_path / "nope" / "study.journal"))


def test_own_options_and_the_trials_arguments_are_split() -> None:
    own, rest = sweep_cli.parse_args(
        ["--config", "a.yaml", "--sweep", "s.yaml", "--trainer.max_epochs", "1", "--trials", "3", "--tr", "x"]
    )
    assert (own.config, own.trials, rest) == (["a.yaml"], 3, ["--trainer.max_epochs", "1", "--tr", "x"])
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        sweep_cli.parse_args(["--config", "a.yaml", "--sweep", "s.yaml", "--workers", "0"])


# ---------------------------------------------------------------------------------------------------- workers
def fake_train(args: list[str], run_dir: Path, study: Any = None, waiting: Any = None) -> dict[str, Any]:
    """A 'trial' whose metrics follow its weights: more weight on a task, better on it; `segment` heavy fails."""
    weights = json.loads(next(a for a in args if a.startswith(f"--{WEIGHTS}=")).split("=", 1)[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ran").write_text("x")
    if weights["segment"] > 0.8:
        return {"state": "failed", "metrics": {}, "error": "ValueError: boom"}
    metrics = {"val/purchase/auroc": 0.5 + weights["purchase"] / 2, "val/spend/mae": 1.0 - weights["spend"]}
    return {"state": "complete", "metrics": metrics, "epochs": 1, "wall_time_s": 0.0}


def make_job(tmp_path: Path, trials: int, invocation: str = "a", **raw: Any) -> runner.WorkerJob:
    spec = spec_of(fixed={"model.init_args.balancer": "mtl_lightning.balancers.StaticWeighting"}, **raw)
    storage = str(tmp_path / "study.journal")
    optuna.create_study(study_name="s", storage=open_storage(storage), directions=spec.directions)
    return runner.WorkerJob(spec, ("--config", "q.yaml"), tmp_path, storage, "s", invocation, trials, quiet=True)


def load(tmp_path: Path) -> Any:
    return optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "study.journal")))


def test_workers_share_exactly_the_trials_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "train", fake_train)
    job = make_job(tmp_path, trials=9)
    threads = [threading.Thread(target=runner.run_worker, args=(job,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = load(tmp_path).trials
    assert len(trials) == 9
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == [f"trial_{i:04d}" for i in range(9)]
    assert all((tmp_path / "trials" / f"trial_{i:04d}" / "ran").is_file() for i in range(9))
    # A second command on the same study adds its own trials.
    runner.run_worker(runner.WorkerJob(**{**job.__dict__, "invocation": "b", "trials": 2}))
    assert len(load(tmp_path).trials) == 11


def test_results_are_told_with_their_state_and_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = iter(
        [
            {"state": "complete", "metrics": {"val/purchase/auroc": 0.9, "val/spend/mae": 0.2, "train/loss": 1.0}},
            {"state": "failed", "metrics": {}, "error": "ValueError: lr must be > 0"},
            {"state": "complete", "metrics": {"val/purchase/auroc": 0.9}},
            {"state": "complete", "metrics": {"val/purchase/auroc": float("nan"), "val/spend/mae": 0.2}},
            {"state": "pruned", "metrics": {}, "epochs": 2},
        ]
    )
    monkeypatch.setattr(runner, "train", lambda args, run_dir, study=None, waiting=None: next(results))
    runner.run_worker(make_job(tmp_path, trials=5))
    trials = load(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL", "PRUNED"]
    assert trials[0].values == [0.9, 0.2]
    assert trials[0].user_attrs[runner.METRICS] == {"val/purchase/auroc": 0.9, "val/spend/mae": 0.2}
    assert trials[1].user_attrs[runner.ERROR] == "ValueError: lr must be > 0"
    assert "logged no ['val/spend/mae']" in trials[2].user_attrs[runner.ERROR]
    assert "not finite" in trials[3].user_attrs[runner.ERROR]
    assert set(trials[0].user_attrs[runner.VALUES][WEIGHTS]) == set(TASKS)


def test_an_interrupted_trial_is_failed_and_the_study_stays_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(args: list[str], run_dir: Path, study: Any = None, waiting: Any = None) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train", interrupted)
    job = make_job(tmp_path, trials=3)
    with pytest.raises(KeyboardInterrupt):
        runner.run_worker(job)
    (trial,) = load(tmp_path).trials
    assert (trial.state.name, trial.user_attrs[runner.ERROR]) == ("FAIL", "interrupted")
    monkeypatch.setattr(runner, "train", fake_train)
    runner.run_worker(runner.WorkerJob(**{**job.__dict__, "invocation": "again"}))
    trials = load(tmp_path).trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    assert all(runner.ERROR not in t.user_attrs or t.user_attrs[runner.ERROR] != "interrupted" for t in trials[1:])


def test_the_report_holds_every_trial_the_front_and_the_compare_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "train", fake_train)
    job = make_job(tmp_path, trials=12)
    runner.run_worker(job)
    study = load(tmp_path)
    compare = {"pcgrad": {"val/purchase/auroc": 0.8, "val/spend/mae": 0.5}}
    pareto = report.write_report(study, tmp_path, job.spec.objectives, compare)
    import csv

    rows = list(csv.DictReader((tmp_path / report.TRIALS_CSV).open()))
    assert len(rows) == 12 and {r["state"] for r in rows} <= {"COMPLETE", "FAIL"}
    assert {f"{WEIGHTS}[{t}]" for t in TASKS} <= set(rows[0])
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]

    # The front by hand: no other trial is at least as good on both objectives and better on one.
    def dominated(a: Any) -> bool:
        return any(b.values[0] >= a.values[0] and b.values[1] <= a.values[1] and b.values != a.values for b in complete)

    assert sorted(r["number"] for r in pareto) == sorted(t.number for t in complete if not dominated(t))
    assert len(list(csv.DictReader((tmp_path / report.PARETO_CSV).open()))) == len(pareto)
    assert (tmp_path / report.COMPARE_CSV).read_text().startswith("run,val/purchase/auroc,val/spend/mae")
    assert (tmp_path / report.FIGURE).stat().st_size > 10_000
    assert any((tmp_path / report.TENSORBOARD).iterdir())


# ---------------------------------------------------------------------------------------------------- the command
def prepare(tmp_path: Path, sweep_text: str, *extra: str) -> Any:
    (tmp_path / "s.yaml").write_text(sweep_text)
    own, rest = sweep_cli.parse_args(
        ["--config", str(REPO / "configs" / "quickstart.yaml"), "--sweep", str(tmp_path / "s.yaml"), *extra]
    )
    return sweep_cli.prepare(own, rest)


def test_the_command_checks_the_sweep_against_the_trials_config(tmp_path: Path) -> None:
    spec, base = prepare(
        tmp_path,
        "fixed: {model.init_args.balancer: mtl_lightning.balancers.StaticWeighting}\n"
        f"space: {{{WEIGHTS}: {{type: simplex}}, model.init_args.optimizer.init_args.lr: {{type: float, low: 0.001, "
        "high: 0.01, log: true}}\nobjectives: [val/purchase/auroc, val/spend/r2]\n",
        "--trainer.max_epochs",
        "1",
    )
    assert spec.params[0].tasks == ("purchase", "segment", "spend")  # the config's tasks
    assert spec.directions == ["maximize", "maximize"]
    assert base[-2:] == ["--trainer.max_epochs", "1"]
    with pytest.raises(ConfigError, match=r"did you mean 'model\.init_args\.optimizer\.init_args\.lr'"):
        prepare(tmp_path, "space: {model.init_args.optimizer.init_args.lrr: {type: float, low: 0.1, high: 1}}\n"
                "objectives: [val/loss]\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"never logged.*val/segment/accuracy"):
        prepare(tmp_path, "space: {model.init_args.optimizer.init_args.lr: {type: float, low: 0.1, high: 1}}\n"
                "objectives: [val/segment/acc]\n")  # fmt: skip
    # A value the key refuses fails before any trial (the example parse).
    with pytest.raises(ConfigError, match="checked with an example value"):
        prepare(tmp_path, "space: {trainer.max_epochs: {type: categorical, choices: [many]}}\nobjectives: [val/loss]\n")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweep").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_checks_against_the_quickstart(path: Path) -> None:
    own, rest = sweep_cli.parse_args(["--config", str(REPO / "configs" / "quickstart.yaml"), "--sweep", str(path)])
    spec, _ = sweep_cli.prepare(own, rest)
    assert spec.objectives and spec.params


def test_a_study_is_continued_by_the_same_sweep_and_refused_to_another(tmp_path: Path) -> None:
    import argparse

    own = argparse.Namespace(storage=None, study_name=None)
    base = ["--config", "q.yaml"]
    sweep_cli.open_study(own, spec_of(compare={"pcgrad": {"a": 1}}), base, tmp_path)
    # The sampler and the compare runs may change; the study goes on.
    sampler = {"class_path": "optuna.samplers.RandomSampler"}
    _, _, name = sweep_cli.open_study(own, spec_of(sampler=sampler), base, tmp_path)
    assert (
        name == tmp_path.name
        and len(optuna.get_all_study_summaries(open_storage(str(tmp_path / "study.journal")))) == 1
    )
    with pytest.raises(ConfigError, match=r"started by another sweep; differences: objectives"):
        sweep_cli.open_study(own, spec_of(objectives=["val/purchase/auroc"]), base, tmp_path)
    with pytest.raises(ConfigError, match=r"differences: trial_args"):
        sweep_cli.open_study(own, spec_of(), [*base, "--trainer.max_epochs", "3"], tmp_path)
