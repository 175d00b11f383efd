"""Runs you can trust: ``last.ckpt`` is the newest state, resume is exact, checkpoints are checked, nothing a user
gives is silently dropped.

The fast tests run the CLI in this process (an exception stands in for a kill); the ``integration`` ones kill real
processes with SIGKILL, one process and two-process DDP, and compare the resumed run with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, QUICKSTART, REPO, mp_callback, mtl_subprocess, run_cli, subprocess_env

from mtl_lightning.callbacks.resume_state import RandomStateCheckpoint, capture, restore
from mtl_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointError
from mtl_lightning.cli import main
from mtl_lightning.errors import ConfigError
from mtl_lightning.resume import lock_run

# The quickstart as shipped (dropout 0.1, shuffled training set), on less data: 1600 training rows, 7 steps an epoch.
SMALL = ["--data.init_args.num_samples", "2000", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "3"]
STEPS_PER_EPOCH = 7
# The quickstart's checkpoint callback, saving also every 3 steps (mid-epoch checkpoints).
EVERY_3_STEPS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val/loss
        filename: best
        save_last: true
        enable_version_counter: false
        every_n_train_steps: 3
"""


def _fit(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(QUICKSTART), *SMALL, "--trainer.logger.init_args.save_dir", str(root), *extra]


def _checkpoints(root: Path) -> Path:
    return root / "quickstart" / "version_0" / "checkpoints"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)
    for i, state in a["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer_states"][0]["state"][i][key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- last.ckpt
def test_last_checkpoint_is_the_newest_state_when_validation_gets_worse(tmp_path: Path) -> None:
    # Lightning 2.6 alone would leave last.ckpt at the best epoch (0) here.
    cli = run_cli([*_fit(tmp_path), *mp_callback("WorsenFromEpoch", epoch=1, scale=1.0)], tmp_path)
    folder = _checkpoints(tmp_path)
    best, last = _load(folder / "best.ckpt"), _load(folder / "last.ckpt")
    assert best["epoch"] == 0, "the noise should make epochs 1 and 2 worse than epoch 0"
    assert (last["epoch"], last["global_step"]) == (2, 3 * STEPS_PER_EPOCH) == (cli.trainer.current_epoch - 1, 21)


def _interrupt(step: int) -> list[str]:
    return mp_callback("RaiseAfterStep", step=step)


@pytest.mark.parametrize("step", [5, 10], ids=["epoch-0-mid", "epoch-1-mid"])
def test_mid_epoch_last_checkpoint_is_written_even_without_the_monitored_value(step: int, tmp_path: Path) -> None:
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(EVERY_3_STEPS)
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*_fit(tmp_path, "--config", str(cfg)), *_interrupt(step)])
    last = _load(_checkpoints(tmp_path) / "last.ckpt")
    assert last["global_step"] == step // 3 * 3


def test_the_cli_upgrades_lightnings_model_checkpoint_and_adds_the_resume_parts(tmp_path: Path) -> None:
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(EVERY_3_STEPS)  # names lightning.pytorch.callbacks.ModelCheckpoint
    cli = run_cli([*_fit(tmp_path, "--config", str(cfg), "--trainer.max_epochs", "1")], tmp_path)
    from mtl_lightning.callbacks import ModelCheckpoint

    assert any(type(c) is ModelCheckpoint for c in cli.trainer.callbacks)
    assert sum(isinstance(c, RandomStateCheckpoint) for c in cli.trainer.callbacks) == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------------- exact resume
def test_random_state_round_trip() -> None:
    saved = capture()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


@pytest.mark.parametrize(
    ("every_3", "step"),
    [(True, 10), (False, 9)],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(every_3: bool, step: int, tmp_path: Path) -> None:
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(EVERY_3_STEPS)
    extra = ["--config", str(cfg)] if every_3 else []
    full = run_cli(_fit(tmp_path / "full", *extra), tmp_path)
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*_fit(tmp_path / "cut", *extra), *_interrupt(step)])
    saved = _load(_checkpoints(tmp_path / "cut") / "last.ckpt")["global_step"]
    assert saved == (9 if every_3 else STEPS_PER_EPOCH), "the resume would not start where this test means"
    resumed = run_cli([*_fit(tmp_path / "cut", *extra), "--ckpt_path", "last"], tmp_path)
    _assert_same_state(
        _load(_checkpoints(tmp_path / "full") / "last.ckpt"), _load(_checkpoints(tmp_path / "cut") / "last.ckpt")
    )
    final = {k: float(v) for k, v in full.trainer.callback_metrics.items() if k.startswith("val/")}
    again = {k: float(v) for k, v in resumed.trainer.callback_metrics.items() if k.startswith("val/")}
    assert final and final == again


def test_per_task_data_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(EVERY_3_STEPS)
    data = ["--data", str(CONFIGS / "data" / "per_task_example.yaml"), "--config", str(cfg)]
    fit = ["fit", "--config", str(QUICKSTART), *data, "--trainer.enable_progress_bar", "false"]
    fit += ["--trainer.max_epochs", "2", "--data.init_args.sampling", "proportional"]
    run_cli([*fit, "--trainer.logger.init_args.save_dir", str(tmp_path / "full")], tmp_path)
    cut = [*fit, "--trainer.logger.init_args.save_dir", str(tmp_path / "cut")]
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*cut, *_interrupt(4)])
    run_cli([*cut, "--ckpt_path", "last"], tmp_path)
    _assert_same_state(
        _load(_checkpoints(tmp_path / "full") / "last.ckpt"), _load(_checkpoints(tmp_path / "cut") / "last.ckpt")
    )


# ------------------------------------------------------------------------------- kill -9 (real processes)


@pytest.mark.integration
@pytest.mark.parametrize("devices", [1, 2], ids=["one-process", "ddp-2"])
@pytest.mark.parametrize(("every_3", "step"), [(True, 11), (False, 9)], ids=["mid-epoch", "epoch-boundary"])
def test_kill_9_then_ckpt_path_last_ends_like_an_uninterrupted_run(
    devices: int, every_3: bool, step: int, tmp_path: Path
) -> None:
    cfg = tmp_path / "every3.yaml"
    cfg.write_text(EVERY_3_STEPS)
    extra = ["--config", str(cfg)] if every_3 else []
    if devices == 2:  # 2 ranks of 128 rows a step: the single process's 256-row global batches, 7 steps an epoch
        extra += ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--data.init_args.batch_size", "128"]
    dumps = {}
    for name in ("full", "cut"):
        dumps[name] = tmp_path / name / "dump"
        args = [*_fit(tmp_path / name, *extra), *mp_callback("DumpRun", out=str(dumps[name]))]
        if name == "cut":
            killed = mtl_subprocess([*args, *mp_callback("KillAfterStep", step=step)])
            assert killed.returncode != 0 and not dumps[name].exists(), killed.stderr[-2000:]
            args += ["--ckpt_path", "last"]
        done = mtl_subprocess(args)
        assert done.returncode == 0, done.stderr[-3000:]
    full, cut = torch.load(dumps["full"] / "weights.pt"), torch.load(dumps["cut"] / "weights.pt")
    for name, value in full.items():
        torch.testing.assert_close(cut[name], value, rtol=0, atol=0, msg=name)
    _assert_same_state(
        _load(_checkpoints(tmp_path / "full") / "last.ckpt"), _load(_checkpoints(tmp_path / "cut") / "last.ckpt")
    )
    for rank in range(devices):
        a = json.loads((dumps["full"] / f"rank{rank}.json").read_text())
        b = json.loads((dumps["cut"] / f"rank{rank}.json").read_text())
        assert a == b


# ---------------------------------------------------------------------------------------- refused inputs
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run_cli([*_fit(root / "runs", "--trainer.max_epochs", "1")], root)
    return _checkpoints(root / "runs") / "best.ckpt"


def _eval(sub: str, ckpt: Path | str | None, root: Path, *extra: str) -> list[str]:
    # No logger: the saved config goes to default_root_dir, never the working directory.
    args = [sub, "--config", str(QUICKSTART), *SMALL[:4], "--trainer.logger", "false"]
    args += ["--trainer.callbacks", "[]", "--trainer.default_root_dir", str(root), *extra]
    return [*args, "--ckpt_path", str(ckpt)] if ckpt is not None else args


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(sub: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"mtl {sub} needs trained weights: give --ckpt_path"):
        main(_eval(sub, None, tmp_path))


def test_untrained_is_evaluated_only_when_asked_for(tmp_path: Path) -> None:
    cli = main(_eval("validate", "untrained", tmp_path))
    assert cli.trainer.state.finished


def test_compatible_command_line_model_options_apply_with_a_checkpoint(trained: Path, tmp_path: Path) -> None:
    cli = main(_eval("validate", trained, tmp_path, "--model.init_args.check_finite", "false"))
    assert cli.model.check_finite is False  # the checkpoint has True: the command line wins


def test_incompatible_command_line_model_options_are_refused(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--model\.init_args\.encoder\.init_args\.hidden \[32\] \(the checkpoint has"
    ):
        main(_eval("test", trained, tmp_path, "--model.init_args.encoder.init_args.hidden", "[32]"))


def test_a_checkpoint_of_other_tasks_is_refused(trained: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "two_tasks.yaml"
    cfg.write_text(
        "data:\n  init_args:\n    tasks:\n      - {name: purchase, kind: binary}\n      - {name: spend, kind: regression}\n"
    )
    with pytest.raises(ConfigError, match=r"checkpoint was trained for tasks \[purchase .*segment"):
        main(_eval("test", trained, tmp_path, "--config", str(cfg)))


def test_model_tasks_that_differ_from_the_data_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "model_tasks.yaml"
    cfg.write_text("model:\n  init_args:\n    tasks:\n      - {name: purchase, kind: binary}\n")
    with pytest.raises(
        ConfigError, match=r"model\.init_args\.tasks \[purchase .*\] differ from data\.init_args\.tasks"
    ):
        main([*_fit(tmp_path), "--config", str(cfg)])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\x00" + os.urandom(4999), "not a PyTorch checkpoint"),
        (None, "truncated"),
        ("dir", "is a directory"),
    ],
    ids=["empty", "random-bytes", "truncated", "directory"],
)
def test_a_broken_checkpoint_is_named_with_what_is_wrong(
    content: bytes | str | None, problem: str, trained: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.ckpt"
    if content == "dir":
        bad.mkdir()
    else:
        bad.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2] if content is None else content)
    with pytest.raises(CheckpointError, match=problem) as err:
        main(_eval("test", bad, tmp_path))
    assert "weights_only=False" not in str(err.value)


def test_ckpt_path_last_names_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    run_cli([*_fit(tmp_path, "--trainer.max_epochs", "1")], tmp_path)
    folder = _checkpoints(tmp_path)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"last\.ckpt is truncated.*--ckpt_path {folder / 'best.ckpt'}"):
        main([*_fit(tmp_path), "--ckpt_path", "last"])


def test_a_second_resume_of_a_run_is_refused_with_the_holder(tmp_path: Path) -> None:
    run_cli([*_fit(tmp_path, "--trainer.max_epochs", "1")], tmp_path)
    run = tmp_path / "quickstart" / "version_0"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from mtl_lightning.resume import lock_run; import time; "
            f"l = lock_run(Path({str(run)!r})); print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"run {run} is in use by process {holder.pid}"):
            main([*_fit(tmp_path, "--trainer.max_epochs", "2"), "--ckpt_path", "last"])
    finally:
        holder.kill()
        holder.wait()
    assert lock_run(run) is not None  # released with its holder, even killed


def test_default_root_dir_is_where_the_run_goes(tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            *SMALL,
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert Path(cli.trainer.log_dir) == tmp_path / "runs" / "quickstart" / "version_0"
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="interrupted"):
        main([*_fit(tmp_path / "runs"), *mp_callback("RaiseAfterStep", step=0), "--trainer.num_sanity_val_steps", "0"])
    # step 0 is reached only after the first step, so this run trained: its folder stays
    assert (tmp_path / "runs" / "quickstart" / "version_0").is_dir()
    cfg = tmp_path / "boom.yaml"
    cfg.write_text("data:\n  init_args:\n    missing_rate: 1.0\n")  # every label missing: refused at setup
    with pytest.raises(ConfigError):
        main([*_fit(tmp_path / "fresh"), "--config", str(cfg)])
    assert not (tmp_path / "fresh").exists()


def test_training_order_follows_the_data_seed_and_the_run_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_lightning.data.loaders import epoch_sampler, sampler_seed

    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    seeds = {sampler_seed(0), sampler_seed(1)}
    monkeypatch.setenv("PL_GLOBAL_SEED", "43")
    seeds |= {sampler_seed(0), sampler_seed(1)}
    assert len(seeds) == 4
    order = list(epoch_sampler(range(100), shuffle=True, seed=0))  # type: ignore[arg-type]
    assert order == list(epoch_sampler(range(100), shuffle=True, seed=0))  # type: ignore[arg-type]
    assert order != list(range(100)) and sorted(order) == list(range(100))


def test_only_the_launching_process_takes_the_run_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank the launcher started: it runs inside the launcher's lock
    assert lock_run(tmp_path) is None and not (tmp_path / ".mtl.lock").exists()


def test_task_names_a_data_module_resolves_are_compared_by_name() -> None:
    from mtl_lightning.cli_checks import check_same_tasks

    check_same_tasks([{"name": "income", "kind": "binary"}], ["income"], "checkpoint")  # census-income's `[income]`
    with pytest.raises(ConfigError, match=r"trained for tasks \[income\] but the data declares \[college\]"):
        check_same_tasks([{"name": "income", "kind": "binary"}], ["college"], "checkpoint")


def test_a_run_without_a_logger_writes_no_config_into_its_root(tmp_path: Path) -> None:
    args = [*_eval("validate", "untrained", tmp_path)]
    main(args)
    main(args)  # a second run in the same place is not refused because of the first one's config.yaml
    assert not (tmp_path / "config.yaml").exists()


def test_a_fast_dev_run_writes_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's own on_train_end wrote last.ckpt even under fast_dev_run, into ./checkpoints (no logger folder).
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false"]
    )
    assert cli.trainer.state.finished
    assert not list(tmp_path.rglob("*.ckpt"))
