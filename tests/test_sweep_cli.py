"""`mtl sweep` end to end: real trials (each an `mtl fit` process) on the quickstart's small data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL_DATA, mtl_subprocess, subprocess_env

optuna = pytest.importorskip("optuna")

from mtl_lightning.sweep.storage import open_storage  # noqa: E402

pytestmark = pytest.mark.integration
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
FAST = [*SMALL_DATA, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
WEIGHTS_SPACE = """
fixed:
  model.init_args.balancer: mtl_lightning.balancers.StaticWeighting
space:
  model.init_args.balancer.init_args.weights: {type: simplex}
objectives: [val/purchase/auroc, val/spend/mae]
"""


def sweep(directory: Path, sweep_file: Path | str, *args: str) -> subprocess.CompletedProcess:
    return mtl_subprocess(
        ["sweep", "--config", QUICKSTART, "--sweep", str(sweep_file), "--dir", str(directory), *args, *FAST]
    )


def study_of(directory: Path) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(open_storage(str(directory / "study.journal")))
    return optuna.load_study(study_name=summary.study_name, storage=open_storage(str(directory / "study.journal")))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_sweep_writes_runs_and_outputs_and_the_same_command_adds_trials(tmp_path: Path) -> None:
    sweep_file = write(
        tmp_path / "w.yaml", WEIGHTS_SPACE + "compare: {ew: {model.init_args.balancer: configs/balancer/equal.yaml}}\n"
    )
    out = tmp_path / "sweep"
    first = sweep(out, sweep_file, "--trials", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    run = out / "trials" / "trial_0000"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*")), "each trial has its own TensorBoard logs"
    config = (run / "config.yaml").read_text()
    assert "StaticWeighting" in config and "max_epochs: 1" in config
    result = json.loads((run / "result.json").read_text())
    assert result["state"] == "complete" and 0.5 < result["metrics"]["val/purchase/auroc"] <= 1.0
    assert (out / "compare" / "ew" / "result.json").is_file()
    for name in ("trials.csv", "pareto.csv", "compare.csv", "pareto.png"):
        assert (out / name).is_file(), name
    again = sweep(out, sweep_file, "--trials", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # The trial's objectives are the values its run logged at the end of training.
    assert study.trials[0].values == [result["metrics"]["val/purchase/auroc"], result["metrics"]["val/spend/mae"]]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    # The compare run is not run again when its result is there.
    assert "compare run 'ew'" not in again.stdout
    # Another search space in the same folder is refused, naming the difference.
    other = write(tmp_path / "o.yaml", WEIGHTS_SPACE.replace("val/spend/mae", "val/segment/accuracy"))
    refused = sweep(out, other, "--trials", "1")
    assert refused.returncode == 2
    assert "was started by another sweep" in refused.stderr and "objectives" in refused.stderr


def test_local_workers_run_every_trial_once(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    done = sweep(out, write(tmp_path / "w.yaml", WEIGHTS_SPACE), "--trials", "4", "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    study = study_of(out)
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(p.name for p in (out / "trials").iterdir()) == [
        "trial_0000",
        "trial_0001",
        "trial_0002",
        "trial_0003",
    ]
    weights = [json.dumps(t.user_attrs["mtl_sweep.values"], sort_keys=True) for t in study.trials]
    assert len(set(weights)) == 4, "two workers drew the same configuration"


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    sweep_file = write(
        tmp_path / "lr.yaml",
        "space:\n  model.init_args.optimizer.init_args.lr: {type: categorical, choices: [-1.0, 0.003]}\n"
        "sampler: {class_path: optuna.samplers.BruteForceSampler, init_args: {seed: 0}}\n"
        "objectives: [val/spend/mae]\n",
    )
    out = tmp_path / "sweep"
    done = sweep(out, sweep_file, "--trials", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    by_lr = {t.params["model.init_args.optimizer.init_args.lr"]: t for t in study_of(out).trials}
    assert by_lr["0.003"].state.name == "COMPLETE"
    assert by_lr["-1.0"].state.name == "FAIL"
    assert "Invalid learning rate" in by_lr["-1.0"].user_attrs["mtl_sweep.error"]


def test_a_pruned_trial_stops_early(tmp_path: Path) -> None:
    sweep_file = write(
        tmp_path / "p.yaml",
        "space:\n  model.init_args.optimizer.init_args.lr: {type: float, low: 0.001, high: 0.01}\n"
        "objectives: [val/spend/mae]\n"
        "pruner: {class_path: optuna.pruners.ThresholdPruner, init_args: {upper: 0.0001}}\n",
    )
    out = tmp_path / "sweep"
    done = mtl_subprocess(
        ["sweep", "--config", QUICKSTART, "--sweep", str(sweep_file), "--dir", str(out), "--trials", "1",
         *SMALL_DATA, "--trainer.max_epochs", "5", "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = study_of(out).trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    assert json.loads((out / "trials" / "trial_0000" / "result.json").read_text())["epochs"] < 5


def test_ddp_inside_a_trial(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    trainer = str(REPO / "configs" / "trainer" / "ddp_cpu.yaml")
    done = sweep(out, write(tmp_path / "w.yaml", WEIGHTS_SPACE), "--trials", "1", "--trainer", trainer)
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = study_of(out).trials
    assert trial.state.name == "COMPLETE"
    log = (out / "trials" / "trial_0000" / "output.log").read_text()
    assert "MEMBER: 2/2" in log or "world_size=2" in log or "distributed" in log.lower()


def test_ctrl_c_leaves_the_study_resumable(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    sweep_file = write(tmp_path / "w.yaml", WEIGHTS_SPACE)
    command = [sys.executable, "-m", "mtl_lightning", "sweep", "--config", QUICKSTART, "--sweep", str(sweep_file),
               "--dir", str(out), "--trials", "1", *SMALL_DATA, "--trainer.max_epochs", "20",
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    run = out / "trials" / "trial_0000"
    while time.monotonic() < deadline and not list(run.glob("events.out.tfevents.*")):  # the trial is training
        time.sleep(0.2)
    assert process.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "the same command continues it" in stderr
    (trial,) = study_of(out).trials
    assert (trial.state.name, trial.user_attrs["mtl_sweep.error"]) == ("FAIL", "interrupted")
    resumed = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [t.state.name for t in study_of(out).trials] == ["FAIL", "COMPLETE"]
