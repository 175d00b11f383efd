"""The ``mtl`` CLI end to end: every config, fit/validate/test/predict, checkpoints, resume, TensorBoard tags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, REPO, SMALL_DATA, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_lightning import MultiTaskModule
from mtl_lightning.cli import main
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpecError

# How each folder of configs/ is used on the command line (one composition rule: a group takes its own file).
GROUP_FLAGS = {
    "trainer": "--trainer",
    "data": "--data",
    "model": "--model",
    "balancer": "--model.balancer",
    "callbacks": "--trainer.callbacks+",
    "logger": "--trainer.logger",
}
NEEDS_CUDA = {
    "trainer/gpu.yaml",
    "trainer/ddp.yaml",
    "trainer/fsdp.yaml",
    "trainer/fp16.yaml",
    "experiment/transformer_gpu.yaml",
}
# A group file that only works with a partner from another group (a token encoder needs token data) says so in a
# comment line of its own, e.g. "# pairs-with: --data configs/data/sequences.yaml"; the test adds that partner.
PAIRS_WITH = re.compile(r"^# pairs-with: (.+)$", re.MULTILINE)


def _partners(path: Path) -> list[str]:
    found = PAIRS_WITH.search(path.read_text())
    return [str(REPO / a) if a.startswith("configs/") else a for a in found.group(1).split()] if found else []


# Presets that start several processes (or need a launcher): tests/test_distributed.py runs them in subprocesses,
# since DDP inside the pytest process would re-launch pytest.
MULTI_PROCESS = {"trainer/ddp_cpu.yaml", "trainer/fsdp2.yaml", "trainer/multinode.yaml"}


def _config_cases() -> list:
    cases = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS).as_posix()
        if path.parent.name == "balancer" or rel in MULTI_PROCESS:
            continue  # tests/test_balancer_cli.py trains with every balancer (fit is what a balancer changes)
        if path.parent.name in ("bench", "sweep"):
            continue  # benchmark suites and sweep files, not CLI configs: tests/test_bench.py, test_sweep.py check them
        if rel == "quickstart.yaml":
            extra: list[str] = []
        elif path.parent.name == "experiment":
            extra = ["--config", str(path)]
        elif rel == "trainer/fp16.yaml":  # a precision preset; float16 needs a GPU preset under it
            extra = ["--trainer", str(CONFIGS / "trainer" / "gpu.yaml"), "--trainer", str(path)]
        else:
            extra = [GROUP_FLAGS[path.parent.name], str(path), *_partners(path)]
        marks = [pytest.mark.gpu] if rel in NEEDS_CUDA else []
        cases.append(pytest.param(extra, id=rel, marks=marks))
    return cases


def test_every_config_folder_has_a_composition_rule() -> None:
    folders = {p.parent.name for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS}
    folders -= {"bench", "sweep"}
    assert folders <= set(GROUP_FLAGS) | {"experiment"}, f"add a flag for {folders - set(GROUP_FLAGS)}"


def _config_args(extra: list[str]) -> list[str]:
    """The quickstart with one config on top, two batches of each loop (the quickstart's data made small)."""
    base = ["--config", str(QUICKSTART), *extra, "--trainer.fast_dev_run", "2"]
    if "--data" not in extra and not any("experiment" in e for e in extra):
        base += SMALL_DATA
    return base


# Fewer samples and smaller batches for the image data (the same encoders: a ResNet step on 64 images takes seconds
# on 2 CPU cores, and MultiMNIST builds 70,000 images). The slow twin below runs them at the configs' own sizes.
SMALL_IMAGES = ["--data.init_args.num_samples", "200"]
SMALL_MULTIMNIST = ["--data.init_args.train_size", "200", "--data.init_args.val_size", "40"]
SMALL_MULTIMNIST += ["--data.init_args.test_size", "40"]
SMALL_BATCHES = ["--data.init_args.batch_size", "16", "--data.init_args.eval_batch_size", "16"]


def _small_images(extra: list[str]) -> list[str]:
    if any(a.endswith("data/images.yaml") for a in extra):
        return [*SMALL_IMAGES, *SMALL_BATCHES]
    if any("multimnist" in a for a in extra):
        return [*SMALL_MULTIMNIST, *SMALL_BATCHES]
    return []


# The default run: every config through `fit` (two batches), and the other subcommands parsed with it. The run of
# all four subcommands is the slow twin below (`make test-all`).
@pytest.mark.parametrize("extra", _config_cases())
def test_every_config_fits(extra: list[str], tmp_path: Path) -> None:
    cli = run_cli(["fit", *_config_args(extra), *_small_images(extra)], tmp_path)
    assert cli.trainer.state.finished, "fit did not finish"
    assert cli.trainer.global_step >= 1


@pytest.mark.parametrize("extra", _config_cases())
def test_every_config_parses_for_validate_test_and_predict(extra: list[str], capsys: pytest.CaptureFixture) -> None:
    for sub in ("validate", "test", "predict"):
        with pytest.raises(SystemExit) as exit_:
            main([sub, *_config_args(extra), "--print_config"])
        assert exit_.value.code in (0, None), f"{sub} --print_config exited with {exit_.value.code}"
        printed = yaml.safe_load(capsys.readouterr().out)
        assert {"model", "data", "trainer"} <= set(printed), f"{sub}: {sorted(printed)}"


@pytest.mark.slow  # four runs with the configs' own encoders and data: ~150 s in all on 2 CPU cores
@pytest.mark.parametrize("extra", _config_cases())
def test_every_config_runs_all_subcommands(extra: list[str], tmp_path: Path) -> None:
    base = _config_args(extra)
    trained = tmp_path / "fit.ckpt"  # fast_dev_run writes no checkpoint: save the fitted model by hand
    for sub in ("fit", "validate", "test", "predict"):
        ckpt = [] if sub == "fit" else ["--ckpt_path", str(trained)]
        cli = run_cli([sub, *base, *ckpt], tmp_path / sub)
        assert cli.trainer.state.finished, f"{sub} did not finish"
        if sub == "fit":
            cli.trainer.save_checkpoint(trained)
        if sub == "predict":
            preds = cli.trainer.predict_loop.predictions
            assert preds and set(preds[0]) == set(cli.model.task_names)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One short quickstart fit shared by the tests below."""
    root = tmp_path_factory.mktemp("fit")
    args = [
        "--config",
        str(QUICKSTART),
        "--data.init_args.num_samples",
        "4000",
        "--data.init_args.batch_size",
        "64",
    ]
    args += ["--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "5"]
    args += ["--trainer.logger.init_args.save_dir", str(root / "runs")]
    cli = main(["fit", *args])
    ckpt_cb = cli.trainer.checkpoint_callback
    return {"args": args, "root": root, "cli": cli, "log_dir": Path(cli.trainer.log_dir), "ckpt": ckpt_cb}


def test_fit_writes_best_and_last_checkpoints_and_config(trained: dict) -> None:
    ckpt_dir = trained["log_dir"] / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    assert (trained["log_dir"] / "config.yaml").is_file()
    assert trained["ckpt"].best_model_path.endswith("best.ckpt")


def test_tensorboard_has_per_task_train_and_val_scalars(trained: dict) -> None:
    events = EventAccumulator(str(trained["log_dir"]))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "val/loss", "lr-AdamW"}
    for task, metrics in {
        "purchase": ["accuracy", "f1", "auroc"],
        "segment": ["accuracy", "f1"],
        "spend": ["mae", "r2"],
    }.items():
        expected |= {f"train/{task}/loss", f"val/{task}/loss"}
        expected |= {f"{stage}/{task}/{m}" for stage in ("train", "val") for m in metrics}
    assert expected <= tags, f"missing tags: {sorted(expected - tags)}"
    assert len(events.Scalars("val/loss")) == 3  # one per epoch


def test_validate_with_best_checkpoint_reproduces_recorded_metrics(trained: dict, tmp_path: Path) -> None:
    best = trained["ckpt"].best_model_path
    events = EventAccumulator(str(trained["log_dir"]))
    events.Reload()
    best_step = min(events.Scalars("val/loss"), key=lambda e: e.value).step
    recorded = {
        tag: next(e.value for e in events.Scalars(tag) if e.step == best_step)
        for tag in events.Tags()["scalars"]
        if tag.startswith("val/")
    }
    cli = run_cli(["validate", *trained["args"], "--ckpt_path", best], tmp_path)
    got = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert set(recorded) == set(got)
    for tag, value in recorded.items():
        assert got[tag] == pytest.approx(value, rel=1e-5, abs=1e-6), tag
    assert got["val/loss"] == pytest.approx(float(trained["ckpt"].best_model_score), rel=1e-6)


def test_test_subcommand_reports_per_task_test_metrics(trained: dict, tmp_path: Path) -> None:
    cli = run_cli(["test", *trained["args"], "--ckpt_path", trained["ckpt"].best_model_path], tmp_path)
    metrics = cli.trainer.callback_metrics
    for name in ("test/loss", "test/purchase/auroc", "test/segment/accuracy", "test/spend/r2"):
        assert name in metrics and torch.isfinite(metrics[name])
    assert float(metrics["test/purchase/auroc"]) > 0.8  # it learned something real


def test_load_from_checkpoint_needs_no_config_and_reproduces_predictions(trained: dict) -> None:
    model = MultiTaskModule.load_from_checkpoint(trained["ckpt"].best_model_path)
    reference = trained["cli"].model
    reference.load_state_dict(torch.load(trained["ckpt"].best_model_path, weights_only=True)["state_dict"])
    model.eval()
    reference.eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        a, b = model.predict_step(x, 0), reference.predict_step(x, 0)
    assert set(a) == {"purchase", "segment", "spend"}
    for task in a:
        torch.testing.assert_close(a[task], b[task])
    assert a["segment"].shape == (16, 4) and torch.allclose(a["segment"].sum(-1), torch.ones(16))


def test_resume_from_last_checkpoint_continues_epoch_count(trained: dict, tmp_path: Path) -> None:
    last = trained["log_dir"] / "checkpoints" / "last.ckpt"
    steps_per_epoch = trained["cli"].trainer.global_step // 3
    args = [a if a != "3" else "5" for a in trained["args"]]  # --trainer.max_epochs 5
    cli = run_cli(["fit", *args, "--ckpt_path", str(last)], tmp_path)
    assert cli.trainer.current_epoch == 5
    assert cli.trainer.global_step == 5 * steps_per_epoch


def test_overfits_one_batch_to_near_zero_loss(tmp_path: Path) -> None:
    args = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, "--data.init_args.batch_size", "32"]
    args += [
        "--data.init_args.missing_rate",
        "0",
        "--trainer.overfit_batches",
        "1",
        "--trainer.max_epochs",
        "150",
    ]
    args += ["--model.init_args.lr_scheduler", "null", "--model.init_args.encoder.init_args.dropout", "0"]
    args += [
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
    cli = run_cli(args, tmp_path)
    assert float(cli.trainer.callback_metrics["train/loss"]) < 0.02


@pytest.mark.integration  # `python -m mtl_lightning` in a subprocess
def test_python_m_and_print_config(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mtl_lightning", "fit", "--config", str(QUICKSTART), "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for key in (
        "seed_everything: 42",
        "class_path: mtl_lightning.MultiTaskModule",
        "name: purchase",
        "max_epochs:",
    ):
        assert key in out


def test_subcommand_without_config_runs_the_quickstart(tmp_path: Path) -> None:
    cli = run_cli(["fit", "--trainer.fast_dev_run", "1", *SMALL_DATA], tmp_path)
    assert cli.model.task_names == ["purchase", "segment", "spend"]


# ------------------------------------------------------------------------------------------ bad input via the CLI
@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ("[{name: a, kind: multi-class, num_outputs: 3}]", "unknown kind 'multi-class'"),
        ("[{name: a, kind: binary}, {name: a, kind: regression}]", "duplicate task names"),
        ("[{name: train, kind: binary}]", "clashes with an attribute"),
        ("[{name: a, kind: multiclass, num_outputs: 1}]", "num_outputs .* >= 2"),
    ],
)
def test_bad_task_specs_give_one_clear_error(tasks: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError, match=match):
        run_cli(["fit", "--config", str(QUICKSTART), "--data.init_args.tasks", tasks], tmp_path)


@pytest.mark.integration  # the console entry point in a subprocess
def test_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mtl_lightning.cli import console_main; console_main()",
            "fit",
            "--config",
            str(QUICKSTART),
            "--data.init_args.tasks",
            "[{name: a, kind: nope}]",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("mtl: error: task 'a': unknown kind 'nope'")
    assert "Traceback" not in proc.stderr


def test_console_main_prints_one_line_and_exits_2_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The default run's twin of the subprocess test above: the same entry point, in this process.
    from mtl_lightning.cli import console_main

    argv = ["mtl", "fit", "--config", str(QUICKSTART), "--data.init_args.tasks", "[{name: a, kind: nope}]"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        console_main()
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("mtl: error: task 'a': unknown kind 'nope'")
    assert "Traceback" not in stderr


def test_monitor_that_is_never_logged_fails_before_training(tmp_path: Path) -> None:
    early_stopping = str(CONFIGS / "callbacks" / "early_stopping.yaml")
    args = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, "--trainer.callbacks+", early_stopping]
    args += ["--trainer.callbacks.monitor", "val/acc"]  # applies to the last callback: EarlyStopping
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    with pytest.raises(ConfigError, match=r"EarlyStopping monitors 'val/acc', which this model never logs"):
        run_cli(args, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_checkpoint_with_other_tasks_is_refused(trained: dict, tmp_path: Path) -> None:
    tasks = "[{name: purchase, kind: binary}, {name: spend, kind: regression}]"
    args = [
        "validate",
        *trained["args"],
        "--data.init_args.tasks",
        tasks,
        "--ckpt_path",
        str(trained["ckpt"].best_model_path),
    ]
    with pytest.raises(
        ValueError, match=r"checkpoint was trained for tasks \[purchase .*segment .*\] but the data declares"
    ):
        run_cli(args, tmp_path)


def test_same_seed_gives_identical_runs(tmp_path: Path) -> None:
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        *SMALL_DATA,
        "--trainer.max_epochs",
        "1",
        "--trainer.logger",
        "false",
    ]
    args += QUIET_TRAINER
    first = run_cli(args, tmp_path / "a").model.state_dict()
    second = run_cli(args, tmp_path / "b").model.state_dict()
    other = run_cli([*args, "--seed_everything", "7"], tmp_path / "c").model.state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert not torch.equal(first["encoder.net.0.weight"], other["encoder.net.0.weight"])


def _bars(args: list[str], tmp_path: Path) -> list:
    from lightning.pytorch.callbacks import ProgressBar

    from mtl_lightning.cli import MTLCLI

    cli = MTLCLI(
        args=[
            "--config",
            str(QUICKSTART),
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            *args,
        ],
        run=False,
    )
    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_the_cli_adds_its_default_progress_bar(tmp_path: Path) -> None:
    from mtl_lightning.lightning_cli import default_progress_bar

    (bar,) = _bars([], tmp_path)
    default = default_progress_bar()
    assert type(bar) is type(default) and bar.refresh_rate == default.refresh_rate


@pytest.mark.parametrize("class_name", ["RichProgressBar", "TQDMProgressBar"])
def test_a_config_picks_either_progress_bar(class_name: str, tmp_path: Path) -> None:
    config = tmp_path / "bar.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: lightning.pytorch.callbacks.{class_name}\n      init_args:\n        refresh_rate: 3\n"
    )
    (bar,) = _bars(["--config", str(config)], tmp_path)
    assert type(bar).__name__ == class_name and bar.refresh_rate == 3


def test_no_progress_bar_when_disabled(tmp_path: Path) -> None:
    assert _bars(["--trainer.enable_progress_bar", "false"], tmp_path) == []
