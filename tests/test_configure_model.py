"""``MultiTaskModule.configure_model``: the encoder is compiled, or sharded with FSDP2, once per model, so a model
fitted and then tested in one process is not wrapped twice; compiled checkpoints load into an eager model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, QUICKSTART, QUIET_TRAINER, SMALL_DATA, run_cli
from torch.distributed.fsdp import FSDPModule

from mtl_lightning import MultiTaskModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

ONE_EPOCH = ["--config", str(QUICKSTART), *SMALL_DATA, *QUIET_TRAINER, "--trainer.max_epochs", "1"]


@pytest.mark.slow  # torch.compile's first compilation: ~20 s on 2 CPU cores
def test_compiled_encoder_trains_tests_and_saves_eager_loadable_weights(tmp_path: Path) -> None:
    cli = run_cli(["fit", *ONE_EPOCH, "--model.init_args.compile", "true"], tmp_path)
    model = cli.model
    compiled = model.encoder._compiled_call_impl
    assert compiled is not None, "compile: true did not compile the encoder"
    cli.trainer.test(model, datamodule=cli.datamodule)
    assert model.encoder._compiled_call_impl is compiled, "test() compiled the encoder a second time"
    # nn.Module.compile() compiles in place: the state dict keeps its keys (no "_orig_mod." prefix), so the
    # weights load into an eager model that gives the same outputs.
    eager = MultiTaskModule(encoder=type(model.encoder)(**_mlp_args(model)), tasks=list(model.tasks.values()))
    eager.load_state_dict(model.state_dict())
    x = torch.randn(8, 64)
    model.eval()
    eager.eval()
    with torch.no_grad():
        for name, out in model(x).items():
            torch.testing.assert_close(out, eager(x)[name], rtol=1e-5, atol=1e-5)


def _mlp_args(model: MultiTaskModule) -> dict:
    enc = model.hparams["encoder"]["init_args"]
    return {k: enc[k] for k in ("input_shape", "hidden", "dropout", "norm", "activation")}


def test_fsdp2_fit_then_test_shards_once(tmp_path: Path, one_process_group: None) -> None:
    fsdp2 = ["--trainer", str(CONFIGS / "trainer" / "fsdp2.yaml"), "--trainer.accelerator", "cpu"]
    cli = run_cli(["fit", *ONE_EPOCH, *fsdp2, "--trainer.devices", "1"], tmp_path)
    model = cli.model
    assert isinstance(model.encoder, FSDPModule)
    assert all(isinstance(head, FSDPModule) for head in model.heads.values())
    cli.trainer.test(model, datamodule=cli.datamodule)
    # fully_shard swaps a module's class for an FSDP subclass; a second call would nest FSDP in FSDP again.
    assert type(model.encoder).__name__.count("FSDP") == 1
    assert cli.trainer.callback_metrics["test/loss"].isfinite()


class _TwoByTwoMesh:
    """A stand-in for a (data_parallel, tensor_parallel) device mesh of 2 x 2, which needs 4 processes."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name: str) -> _TwoByTwoMesh:
        return self

    def size(self) -> int:
        return 2


def test_tensor_parallel_mesh_is_refused() -> None:
    model = MultiTaskModule(encoder=MLPEncoder((4,), hidden=[8]), tasks=[TaskSpec("a", "binary")])
    model._device_mesh = _TwoByTwoMesh()
    with pytest.raises(ConfigError, match="tensor_parallel_size: 1"):
        model.configure_model()


@pytest.mark.gpu
def test_fsdp1_clips_gradients_by_norm(tmp_path: Path) -> None:
    # Lightning's FSDP precision plugin refuses norm clipping; the module hands it to FSDP's clip_grad_norm_.
    fsdp = ["--trainer", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.devices", "1"]
    cli = run_cli(["fit", *ONE_EPOCH, *fsdp, "--trainer.gradient_clip_val", "0.5"], tmp_path)
    assert cli.trainer.state.finished
    assert cli.trainer.callback_metrics["val/loss"].isfinite()


def test_parameter_mode_balancer_is_refused_on_a_sharded_model(tmp_path: Path, one_process_group: None) -> None:
    fsdp2 = ["--trainer", str(CONFIGS / "trainer" / "fsdp2.yaml"), "--trainer.accelerator", "cpu"]
    upgrad = ["--model.balancer", str(CONFIGS / "balancer" / "upgrad.yaml"), "--model.balancer.init_args.mode"]
    with pytest.raises(ConfigError, match="cannot run on a sharded model: mode: parameter needs the full encoder"):
        run_cli(["fit", *ONE_EPOCH, *fsdp2, "--trainer.devices", "1", *upgrad, "parameter"], tmp_path)
