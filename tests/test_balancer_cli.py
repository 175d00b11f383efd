"""Every balancer YAML trains the quickstart through the ``mtl`` CLI, in float32 and with AMP, clipping and gradient
accumulation on (Lightning's automatic optimisation stays in charge)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, SMALL_DATA, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_lightning import MultiTaskModule
from mtl_lightning.callbacks.conflict_heatmap import TAG

pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")

BALANCERS = sorted((CONFIGS / "balancer").glob("*.yaml"))
QUIET = [
    "--trainer.max_steps",
    "6",
    *SMALL_DATA,
    *QUIET_TRAINER,
    "--trainer.enable_model_summary",
    "false",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.log_every_n_steps",
    "1",  # train/loss reaches callback_metrics on every step, and telemetry runs on every step
]
FEATURES = ["--trainer.gradient_clip_val", "1.0", "--trainer.accumulate_grad_batches", "2"]
BF16 = ["--trainer.precision", "bf16-mixed", *FEATURES]
FP16_GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "16-mixed", *FEATURES]


def _cases() -> list:
    cases = []
    for path in BALANCERS:
        # About 1 s (float32) and 2 s (bf16) a case on 2 CPU cores: all in the default run (~60 s for 19 configs).
        cases.append(pytest.param(path, [], id=f"{path.stem}-32"))
        cases.append(pytest.param(path, BF16, id=f"{path.stem}-bf16"))
        cases.append(pytest.param(path, FP16_GPU, id=f"{path.stem}-16-gpu", marks=[pytest.mark.gpu]))
    return cases


def fit(balancer: Path | str, extra: list[str], root: Path, logger: bool = False):
    args = ["fit", "--config", str(QUICKSTART), "--model.balancer", str(balancer), *QUIET]
    args += ["--trainer.logger.init_args.save_dir", str(root / "runs")] if logger else ["--trainer.logger", "false"]
    cli = run_cli([*args, *extra], root)
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 6
    assert torch.isfinite(metrics["train/loss"]), f"train/loss = {metrics['train/loss']}"
    for name in cli.model.task_names:
        assert torch.isfinite(metrics[f"train/balance/weight/{name}"])
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    return cli


def test_the_gradient_methods_have_configs():
    stems = {p.stem for p in BALANCERS}
    gradient = {"mgda", "pcgrad", "cagrad", "imtl_g", "gradvac", "aligned_mtl", "upgrad", "dualproj", "nash_mtl"}
    assert gradient | {"graddrop", "static", "equal"} <= stems


@pytest.mark.parametrize(("balancer", "extra"), _cases())
def test_every_balancer_config_trains(balancer: Path, extra: list[str], tmp_path: Path) -> None:
    if "gpu" in extra and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fit(balancer, extra, tmp_path)


@pytest.mark.parametrize("extra", [FEATURES, BF16], ids=["32", "bf16"])
def test_parameter_mode_trains(extra: list[str], tmp_path: Path) -> None:
    cli = fit(CONFIGS / "balancer" / "upgrad.yaml", ["--model.balancer.mode", "parameter", *extra], tmp_path)
    assert cli.model.balancer.mode == "parameter"


def test_conflict_heatmap_reaches_tensorboard(tmp_path: Path) -> None:
    heatmap = ["--trainer.callbacks+", str(CONFIGS / "callbacks" / "conflict_heatmap.yaml")]
    heatmap += ["--trainer.callbacks.every_n_steps", "2"]
    cli = fit(CONFIGS / "balancer" / "upgrad.yaml", heatmap, tmp_path, logger=True)
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images(TAG)] == [1, 3, 5]
    assert "train/balance/conflict_fraction" in events.Tags()["scalars"]


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl"])
def test_stateful_gradient_balancers_checkpoint_and_resume(name: str, tmp_path: Path) -> None:
    balancer = CONFIGS / "balancer" / f"{name}.yaml"
    cli = fit(balancer, [], tmp_path / "first")
    ckpt = tmp_path / "six.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    model = MultiTaskModule.load_from_checkpoint(ckpt)  # strict: every saved tensor has its place
    assert type(model.balancer).__name__ == type(cli.model.balancer).__name__
    if name == "gradvac":
        assert cli.model.balancer.cosine_targets.abs().sum() > 0
        torch.testing.assert_close(model.balancer.cosine_targets, cli.model.balancer.cosine_targets)
    args = ["fit", "--config", str(QUICKSTART), "--model.balancer", str(balancer), *QUIET, "--trainer.logger", "false"]
    resumed = run_cli([*args, "--trainer.max_steps", "8", "--ckpt_path", str(ckpt)], tmp_path / "resumed")
    assert resumed.trainer.global_step == 8
    assert torch.isfinite(resumed.trainer.callback_metrics["train/loss"])
