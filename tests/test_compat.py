"""Canaries for mtl_lightning/compat.py: one per use of another library's internals.

Each fails with the library, its installed version and what moved, so that an upgrade that breaks one says where
to look (mtl_lightning/compat.py) instead of failing somewhere downstream, or not at all.
"""

from __future__ import annotations

import inspect
import io
import pickle
from typing import Any

import numpy as np
import pytest
import torch

from mtl_lightning import compat
from mtl_lightning.errors import ConfigError, find_config_error


def canary(ok: bool, library: str, what: str) -> None:
    """Fail with compat's message (library, installed version, what moved) unless ``ok``."""
    if not ok:
        pytest.fail(compat.moved(library, what))


def test_the_message_names_the_library_its_version_and_the_file() -> None:
    message = compat.moved("lightning", "Trainer._logger_connector.should_update_logs")
    assert message == (
        f"lightning {compat.installed_version('lightning')} no longer has "
        "Trainer._logger_connector.should_update_logs; update mtl_lightning/compat.py"
    )
    assert compat.installed_version("no-such-distribution-here") == "not installed"


# ------------------------------------------------------------------------------------------------- Lightning
def _trainer() -> Any:
    from lightning.pytorch import Trainer

    return Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def test_should_update_logs() -> None:
    trainer = _trainer()
    connector = getattr(trainer, "_logger_connector", None)
    canary(connector is not None, "lightning", "Trainer._logger_connector")
    canary(
        isinstance(getattr(type(connector), "should_update_logs", None), property),
        "lightning",
        "Trainer._logger_connector.should_update_logs",
    )
    assert isinstance(compat.should_update_logs(trainer), bool)


def test_should_update_logs_logs_every_step_when_the_attribute_is_gone() -> None:
    assert compat.should_update_logs(object()) is True  # type: ignore[arg-type]


def test_model_checkpoint_internals() -> None:
    # mtl_lightning.callbacks.ModelCheckpoint overrides _save_last_checkpoint and asks these to write last.ckpt.
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(every_n_train_steps=3, save_last=True)
    for name in ("_save_last_checkpoint", "_monitor_candidates", "_should_save_on_train_epoch_end"):
        canary(callable(getattr(callback, name, None)), "lightning", f"ModelCheckpoint.{name}")
    canary(
        list(inspect.signature(callback._save_last_checkpoint).parameters) == ["trainer", "monitor_candidates"],
        "lightning",
        "ModelCheckpoint._save_last_checkpoint(trainer, monitor_candidates)",
    )
    canary(hasattr(callback, "_last_time_checked"), "lightning", "ModelCheckpoint._last_time_checked")
    assert compat.every_n_train_steps(callback) == 3
    trainer = _trainer()
    assert isinstance(compat.saves_on_train_epoch_end(callback, trainer), bool)


def test_lightning_cli_parses_the_checkpoint_in_a_hook() -> None:
    # MTLCLI overrides LightningCLI._parse_ckpt_path (check the file, keep command-line model options).
    from lightning.pytorch.cli import LightningCLI

    canary(callable(getattr(LightningCLI, "_parse_ckpt_path", None)), "lightning", "LightningCLI._parse_ckpt_path")
    source = inspect.getsource(LightningCLI.__init__)
    canary("self._parse_ckpt_path()" in source, "lightning", "LightningCLI.__init__ calling _parse_ckpt_path")


def test_argparse_actions_and_subcommands() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha")
    sub = parser.add_subparsers().add_parser("fit")
    canary(hasattr(argparse, "_SubParsersAction"), "python", "argparse._SubParsersAction")
    assert "alpha" in [a.dest for a in compat.parser_actions(parser)]
    assert compat.subcommand_parsers(parser) == {"fit": sub}


def test_attached_trainer() -> None:
    from lightning.pytorch import LightningModule

    module = LightningModule()
    canary(hasattr(module, "_trainer"), "lightning", "LightningModule._trainer")
    assert compat.attached_trainer(module) is None
    trainer = _trainer()
    module.trainer = trainer
    assert compat.attached_trainer(module) is trainer


def test_set_model_parallel_sizes() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    for name in ("_data_parallel_size", "_tensor_parallel_size"):
        canary(getattr(strategy, name, None) == "auto", "lightning", f"ModelParallelStrategy.{name} ('auto')")
        canary(name in source, "lightning", f"ModelParallelStrategy.setup_environment reading {name}")
    compat.set_model_parallel_sizes(strategy, data_parallel=4, tensor_parallel=1)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)


def test_set_model_parallel_sizes_refuses_a_strategy_without_them() -> None:
    with pytest.raises(compat.InternalsMoved, match=r"lightning \S+ no longer has ModelParallelStrategy"):
        compat.set_model_parallel_sizes(object(), 2, 1)  # type: ignore[arg-type]


def test_pruning_internals() -> None:
    from lightning.pytorch.callbacks import ModelPruning

    callback = ModelPruning("l1_unstructured", parameter_names=["weight"], use_global_unstructured=True)
    for name in ("_parameters_to_prune", "_parameter_names", "_use_global_unstructured"):
        canary(hasattr(callback, name), "lightning", f"ModelPruning.{name}")
    layer = torch.nn.Linear(2, 2)
    compat.set_pruning_targets(callback, [(layer, "weight")])
    assert compat.pruning_targets(callback) == [(layer, "weight")]
    assert compat.pruning_parameter_names(callback) == ["weight"]
    assert compat.pruning_is_global(callback) is True
    with pytest.raises(compat.InternalsMoved, match=r"ModelPruning\._parameters_to_prune"):
        compat.pruning_targets(object())


def test_weight_averaging_internals() -> None:
    # mtl_lightning/callbacks/weight_averaging.py reads the average that Lightning's WeightAveraging builds in setup.
    from lightning.pytorch import LightningModule
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import AveragedModel

    callback = WeightAveraging()
    canary(hasattr(callback, "_average_model"), "lightning", "WeightAveraging._average_model")
    assert compat.averaged_model(callback) is None
    module = LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    callback.setup(_trainer(), module, "fit")
    average = compat.averaged_model(callback)
    assert isinstance(average, AveragedModel) and isinstance(average.module.layer, torch.nn.Linear)
    with pytest.raises(compat.InternalsMoved, match=r"WeightAveraging\._average_model"):
        compat.averaged_model(object())


# ----------------------------------------------------------------------------------------------------- torch
def test_child_schedulers() -> None:
    from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, ExponentialLR, SequentialLR, StepLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    first, second = ConstantLR(optimizer, factor=0.5, total_iters=2), ExponentialLR(optimizer, gamma=0.9)
    for composite in (SequentialLR(optimizer, [first, second], milestones=[2]), ChainedScheduler([first, second])):
        canary(hasattr(composite, "_schedulers"), "torch", f"{type(composite).__name__}._schedulers")
        assert compat.child_schedulers(composite) == [first, second]
    assert compat.child_schedulers(StepLR(optimizer, step_size=1)) == []


def test_foreach_mul() -> None:
    public = getattr(torch, "foreach", None)
    canary(
        hasattr(public, "mul") or hasattr(torch, "_foreach_mul"), "torch", "torch.foreach.mul nor torch._foreach_mul"
    )
    tensors = [torch.randn(3), torch.randn(2, 2).half()]
    scale = torch.tensor(4.0)
    out = compat.foreach_mul(tensors, scale)
    assert [t.dtype for t in out] == [torch.float32, torch.float16]  # each keeps its dtype, as in a real backward
    for got, tensor in zip(out, tensors, strict=True):
        torch.testing.assert_close(got, tensor * scale)


# ---------------------------------------------------------------------------------------------------- TorchJD
def test_gradvac_state_round_trip() -> None:
    from torchjd.aggregation import GradVacWeighting

    weighting = GradVacWeighting(beta=0.0)  # beta 0: the EMA keeps the targets it starts from
    for name in ("_phi_t", "_state_key"):
        canary(hasattr(weighting, name), "torchjd", f"GradVacWeighting.{name}")
    assert compat.gradvac_state(weighting) is None
    targets = torch.tensor([[0.0, 0.7], [0.7, 0.0]])
    compat.set_gradvac_state(weighting, targets.clone())
    weighting(torch.eye(2))
    state = compat.gradvac_state(weighting)
    # Had the weighting ignored the state it was given (a new key, a renamed buffer), it would hold zeros now.
    canary(state is not None and torch.equal(state, targets), "torchjd", "GradVacWeighting honouring _phi_t")


def test_gradvac_state_refuses_a_weighting_without_it() -> None:
    with pytest.raises(compat.InternalsMoved, match=r"torchjd \S+ no longer has GradVacWeighting._phi_t"):
        compat.set_gradvac_state(torch.nn.Module(), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------------ numpy
@pytest.mark.parametrize("protocol", [2, 3, 4])  # 5 pickles contiguous arrays by buffer instead
def test_numpy_reconstructor_is_what_array_pickles_name(protocol: int) -> None:
    named: dict[tuple[str, str], Any] = {}

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            named[module, name] = found = super().find_class(module, name)
            return found

    Recording(io.BytesIO(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3), protocol=protocol))).load()
    reconstruct = [key for key in named if key[1] == "_reconstruct"]
    canary(
        len(reconstruct) == 1 and reconstruct[0] in compat.NUMPY_RECONSTRUCT_GLOBALS,
        "numpy",
        f"ndarray pickles naming one of {sorted(compat.NUMPY_RECONSTRUCT_GLOBALS)} (they name {sorted(named)})",
    )
    assert named[reconstruct[0]] is compat.numpy_array_reconstructor()


def test_numpy_only_unpickler_still_loads_arrays() -> None:
    from mtl_lightning.data.multimnist import load_numpy_pickle

    arrays = (np.arange(4, dtype=np.float32), np.ones((2, 2), dtype=np.int64))
    loaded = load_numpy_pickle(pickle.dumps(arrays, protocol=3))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays, strict=True))


# ------------------------------------------------------------------------------------------------ torch.onnx
def test_onnx_registration_logger_module_exists() -> None:
    import importlib.util

    canary(
        importlib.util.find_spec(compat.ONNX_REGISTRATION_LOGGER) is not None,
        "torch",
        f"the module {compat.ONNX_REGISTRATION_LOGGER} (the logger mtl export quiets)",
    )


# ------------------------------------------------------------------------------------------------ jsonargparse
class _Refuses:
    def __init__(self, width: int = 1):
        raise ConfigError(f"width {width} is refused")


def test_jsonargparse_chains_constructor_errors() -> None:
    # Not an internal, but behaviour the CLI relies on to show our one-line errors: jsonargparse's report of a
    # failed constructor keeps the constructor's error in its chain (its __cause__).
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--thing", type=_Refuses | None)
    config = parser.parse_args(["--thing", f"{__name__}._Refuses", "--thing.width", "3"])
    with pytest.raises(Exception) as caught:
        parser.instantiate_classes(config)
    found = find_config_error(caught.value)
    canary(found is not None, "jsonargparse", "the constructor's error in the chain of its instantiation error")
    assert str(found) == "width 3 is refused"


# ------------------------------------------------------------------------------------------------ optuna
def test_optuna_trial_id_reopens_the_trial() -> None:
    optuna = pytest.importorskip("optuna")
    study = optuna.create_study()
    study.ask()
    trial = study.ask()
    trial_id = compat.optuna_trial_id(trial)
    reopened = optuna.trial.Trial(study, trial_id)  # what a sweep's trial process does
    reopened.report(1.5, step=0)
    assert study.trials[1].intermediate_values == {0: 1.5}
    assert study.trials[0].intermediate_values == {}
