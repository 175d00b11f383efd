"""The trainer presets end to end through the ``mtl`` CLI: DDP and FSDP2 on 2 CPU processes, two "nodes" on
localhost, resume after a kill, bf16 on CPU. Each multi-process run is a subprocess (DDP inside the pytest process
would re-launch pytest); ``tests/mp_callbacks.py`` makes every rank write its logged values and rank 0 the weights.

Every run trains the quickstart model on the same data, deterministically: no dropout, plain SGD, no shuffling
(``data.shuffle: false``), so one process with batches of 64 rows and two processes with 32 rows each see the same
global batches step by step (Lightning's DistributedSampler gives rank r rows r, r+2, ... of the unshuffled set).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (
    CONFIGS,
    QUICKSTART,
    QUIET_TRAINER,
    REPO,
    SMALL_DATA,
    mp_callback,
    mtl_subprocess,
    run_cli,
    subprocess_env,
)

from mtl_lightning.cli import main
from mtl_lightning.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
TRAINER = CONFIGS / "trainer"
EPOCHS = 3
DETERMINISTIC = """
model:
  init_args:
    encoder: {init_args: {dropout: 0.0}}
    optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}
data:
  init_args: {num_samples: 640, shuffle: false}
trainer:
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 2
"""
PRESETS = {
    "single": ["--data.init_args.batch_size", "64"],
    "ddp": ["--trainer", str(TRAINER / "ddp_cpu.yaml"), "--data.init_args.batch_size", "32"],
    "fsdp2": [
        *("--trainer", str(TRAINER / "fsdp2.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2"),
        *("--data.init_args.batch_size", "32"),
    ],
}


# Variables a surrounding launcher may have set; a child that sees them would think it is one rank of a job.
def _fit_args(root: Path, preset: str, epochs: int = EPOCHS) -> list[str]:
    cfg = root.parent / "deterministic.yaml"
    cfg.write_text(DETERMINISTIC)
    return [
        *("fit", "--config", str(QUICKSTART), "--config", str(cfg), *PRESETS[preset]),
        *("--trainer.max_epochs", str(epochs), "--trainer.logger.init_args.save_dir", str(root / "runs")),
        *mp_callback("DumpRun", out=str(root / "dump")),
        # `spend` joins at epoch 1: before that its head is not run, only touched, and DDP must not see unused
        # parameters (FSDP2: its sharded parameters get zero gradients).
        "--trainer.callbacks+",
        json.dumps({"class_path": "mtl_lightning.callbacks.TaskSchedule", "init_args": {"start": {"spend": 1}}}),
    ]


def _mtl(args: list[str], expect: int = 0, timeout: int = 300) -> str:
    cmd = [sys.executable, "-m", "mtl_lightning", *args]
    try:
        proc = mtl_subprocess(args, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hung (killed after {err.timeout} s): {' '.join(cmd)}")
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}: {' '.join(cmd)}\n{log}"
    assert "unused parameters" not in log, log
    return log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(root: Path) -> None:
    """Two torchrun launchers, one rank each, meeting at 127.0.0.1: Lightning reads the ranks from torchelastic."""
    port = str(_free_port())
    args = [*_fit_args(root, "single"), "--trainer", str(TRAINER / "multinode.yaml")]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--data.init_args.batch_size", "32"]
    procs = []
    for node in ("0", "1"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        launcher += ["--node_rank", node, "--master_addr", "127.0.0.1", "--master_port", port]
        launcher += ["-m", "mtl_lightning", *args]
        procs.append(
            subprocess.Popen(launcher, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        logs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two-node run hung")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run once: single, ddp, fsdp2, each of the two killed at epoch 2 and resumed, and two nodes."""
    out = {}
    for preset in PRESETS:
        out[preset] = tmp_path_factory.mktemp(preset)
        _mtl(_fit_args(out[preset], preset))
    for preset in ("ddp", "fsdp2"):
        root = out[f"{preset}_resumed"] = tmp_path_factory.mktemp(f"{preset}_resumed")
        _mtl(_fit_args(root, preset) + mp_callback("ExitAtEpoch", epoch=2), expect=17)
        assert not (root / "dump").exists(), "the killed run should not have finished"
        _mtl([*_fit_args(root, preset), "--ckpt_path", "last"])
    out["two_nodes"] = tmp_path_factory.mktemp("two_nodes")
    _two_nodes(out["two_nodes"])
    return out


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "dump" / "weights.pt", weights_only=True)


def _info(root: Path, rank: int = 0) -> dict:
    return json.loads((root / "dump" / f"rank{rank}.json").read_text())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a if a[k].is_floating_point())


@pytest.mark.integration  # the `runs` fixture: 8 CLI runs in subprocesses, 2 processes each (~70 s on 2 CPU cores)
@pytest.mark.parametrize("run", ["ddp", "fsdp2", "two_nodes", "ddp_resumed", "fsdp2_resumed"])
def test_weights_equal_a_single_process(runs: dict[str, Path], run: str) -> None:
    diff, name = _max_diff(_weights(runs["single"]), _weights(runs[run]))
    assert diff <= 1e-6, f"{run} differs from one process by {diff:.3g} in {name}"
    assert _info(runs[run])["global_step"] == _info(runs["single"])["global_step"] == EPOCHS * 8


@pytest.mark.integration
@pytest.mark.parametrize("run", ["ddp", "fsdp2", "two_nodes"])
def test_every_rank_logs_the_metrics_of_one_process(runs: dict[str, Path], run: str) -> None:
    # torchmetrics syncs the per-task metric states across ranks at compute(): the validation metrics of the two
    # ranks (each saw half the validation rows) equal those of one process that saw them all.
    single = _info(runs["single"])["metrics"]
    for rank in (0, 1):
        metrics = _info(runs[run], rank)["metrics"]
        assert metrics.keys() == single.keys()
        off = {k: (metrics[k], single[k]) for k in single if abs(metrics[k] - single[k]) > 1e-5 * (1 + abs(single[k]))}
        assert not off, f"{run} rank {rank}: {off}"
    assert any(k.startswith("val/segment/") for k in single)


@pytest.mark.integration
def test_resumed_runs_continue_in_the_same_folder(runs: dict[str, Path]) -> None:
    for run in ("ddp_resumed", "fsdp2_resumed"):
        versions = sorted(p.name for p in (runs[run] / "runs" / "quickstart").iterdir())
        assert versions == ["version_0"], f"{run}: --ckpt_path last opened a new run folder: {versions}"


# The default run's `fit` of the presets that start several processes, here in one process of one rank (two ranks
# and two launchers are the integration tests above, which test_cli.py leaves these presets to).
@pytest.mark.parametrize(
    ("preset", "one_rank"),
    [
        ("ddp_cpu.yaml", ["--trainer.devices", "1"]),
        ("fsdp2.yaml", ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]),
        ("multinode.yaml", ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]),
    ],
    ids=["ddp_cpu", "fsdp2", "multinode"],
)
def test_multi_process_presets_fit_in_one_process(
    preset: str, one_rank: list[str], tmp_path: Path, one_process_group: None
) -> None:
    args = ["fit", "--config", str(QUICKSTART), "--trainer", str(TRAINER / preset), *one_rank, *SMALL_DATA]
    cli = run_cli([*args, "--trainer.fast_dev_run", "2"], tmp_path)
    assert cli.trainer.state.finished and cli.trainer.world_size == 1
    assert type(cli.trainer.strategy).__name__ == {"fsdp2.yaml": "FSDP2Strategy"}.get(preset, "DDPStrategy")


def test_ckpt_path_last_without_a_run_is_refused(tmp_path: Path) -> None:
    args = ["fit", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path"]
    with pytest.raises(ConfigError, match=r"no run under .* has a checkpoints/last\.ckpt"):
        main([*args, "last"])


def test_bf16_on_cpu_trains_like_fp32(tmp_path: Path) -> None:
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        args = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, *QUIET_TRAINER, "--trainer.max_epochs", "4"]
        cli = run_cli([*args, "--trainer.precision", precision], tmp_path / precision)
        losses[precision] = float(cli.trainer.callback_metrics["val/loss"])
    fp32, bf16 = losses["32-true"], losses["bf16-mixed"]
    assert abs(bf16 - fp32) <= 0.03 * fp32, losses


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--trainer", str(TRAINER / "fp16.yaml")], r"float16\) needs a GPU.*configs/trainer/bf16.yaml"),
        (["--trainer.num_nodes", "2"], r"no launcher started this process.*torchrun"),
        (["--trainer.strategy", "fsdp"], r"FSDP strategy .* needs GPUs; on CPU use FSDP2"),
    ],
)
def test_presets_that_cannot_run_here_say_what_to_use(extra: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        run_cli(["fit", "--config", str(QUICKSTART), *extra], tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_preset_without_a_gpu_says_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no usable CUDA GPU.*configs/trainer/cpu.yaml"):
        run_cli(["fit", "--config", str(QUICKSTART), "--trainer", str(TRAINER / "gpu.yaml")], tmp_path)


def test_more_gpus_than_exist_says_how_many(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_lightning.launch_checks import check_trainer_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"asks for 8 GPUs but this machine has 2; use --trainer.devices 2"):
        check_trainer_config({"accelerator": "gpu", "devices": 8})
    check_trainer_config({"accelerator": "gpu", "devices": 2})  # fits: no error
