"""Every use of another library's private internals, each behind one small function.

Lightning, torch, TorchJD and numpy give no public way to do a few things this package needs. Each such access
lives here, so that a new release of one of them breaks one function, and ``tests/test_compat.py`` has a canary per
function that names the library, its installed version and what moved. The ranges tested are the upper bounds in
pyproject.toml (``lightning<2.7``, ``torchjd<0.19``). When a canary fails: find the new spelling in that release,
update the function (keep the old one while the older release is still allowed) and the bound.

Nothing heavy is imported at module level: ``mtl --version`` imports this module's importers without Lightning.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import Tensor
    from torch.optim.swa_utils import AveragedModel


class InternalsMoved(RuntimeError):
    """A private attribute this package relies on is gone from the installed release of a library."""


def installed_version(library: str) -> str:
    """The installed version of distribution ``library`` (``"not installed"`` if it is absent)."""
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def moved(library: str, what: str) -> str:
    """The message of a canary or an :class:`InternalsMoved`: the library, its version and what to update."""
    return f"{library} {installed_version(library)} no longer has {what}; update mtl_lightning/compat.py"


# ------------------------------------------------------------------------------------------ argparse (stdlib)
def parser_actions(parser: Any) -> list[Any]:
    """The actions (options) of an argparse/jsonargparse parser: private ``_actions``, argparse has no public list.

    Used by the one-line errors to suggest keys (mtl_lightning/console.py); if it moves, no suggestion is made.
    """
    return list(getattr(parser, "_actions", []))


def subcommand_parsers(parser: Any) -> dict[str, Any]:
    """``{name: parser}`` of a parser's subcommands (private ``argparse._SubParsersAction``), empty if none."""
    import argparse

    kind = getattr(argparse, "_SubParsersAction", None)
    for action in parser_actions(parser):
        if kind is not None and isinstance(action, kind):
            return dict(action.choices)
    return {}


# ------------------------------------------------------------------------------------------------- Lightning
def should_update_logs(trainer: Trainer) -> bool:
    """Whether Lightning's loggers receive the values logged on this training step (``log_every_n_steps``).

    Private: ``trainer._logger_connector.should_update_logs``; Lightning has no public "is this a logging step".
    If it moves, this says True: every step is logged, which is correct, only slower.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The Trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none).

    Private: ``LightningModule._trainer``. If it moves, this says None: callers then act as outside a Trainer
    (a single process), so the canary must catch it.
    """
    return getattr(module, "_trainer", None)


def save_last_checkpoint(callback: Any, trainer: Trainer) -> None:
    """Have a ModelCheckpoint write its ``last`` checkpoint now, named and linked as it would itself.

    Private: ``ModelCheckpoint._save_last_checkpoint`` and ``_monitor_candidates``; Lightning has no public "save last
    now", and writing the file by hand would miss its naming (``last-v1``, ``{epoch}`` templates) and its state.
    """
    try:
        save, candidates = callback._save_last_checkpoint, callback._monitor_candidates
    except AttributeError as err:
        raise InternalsMoved(moved("lightning", "ModelCheckpoint._save_last_checkpoint/_monitor_candidates")) from err
    save(trainer, candidates(trainer))


def every_n_train_steps(callback: Any) -> int:
    """A ModelCheckpoint's ``every_n_train_steps`` (private ``_every_n_train_steps``; 0 if it moves: never due)."""
    return int(getattr(callback, "_every_n_train_steps", 0) or 0)


def last_time_checked(callback: Any) -> float | None:
    """When a ModelCheckpoint's ``train_time_interval`` clock last fired (private ``_last_time_checked``)."""
    value = getattr(callback, "_last_time_checked", None)
    return None if value is None else float(value)


def saves_on_train_epoch_end(callback: Any, trainer: Trainer) -> bool:
    """Whether a ModelCheckpoint saves at train epoch end rather than validation end (private decision method)."""
    return bool(callback._should_save_on_train_epoch_end(trainer))


def set_model_parallel_sizes(strategy: ModelParallelStrategy, data_parallel: int, tensor_parallel: int) -> None:
    """Set the device mesh sizes of a ``ModelParallelStrategy`` once the devices and nodes are known.

    Private: ``_data_parallel_size`` / ``_tensor_parallel_size``, read by its ``setup_environment``. The
    constructor takes them, but before the Trainer has said how many devices and nodes there are.
    """
    for name in ("_data_parallel_size", "_tensor_parallel_size"):
        if not hasattr(strategy, name):  # setting it anyway would be ignored: a silently wrong mesh
            raise InternalsMoved(moved("lightning", f"ModelParallelStrategy.{name}"))
    strategy._data_parallel_size = data_parallel
    strategy._tensor_parallel_size = tensor_parallel


def averaged_model(callback: Any) -> AveragedModel | None:
    """The ``AveragedModel`` of a Lightning ``WeightAveraging`` callback (None before its ``setup`` for fit).

    Private: ``WeightAveraging._average_model``; Lightning has no public accessor, and the subclasses in
    mtl_lightning/callbacks/weight_averaging.py need the average to recompute its BatchNorm statistics.
    """
    if not hasattr(callback, "_average_model"):
        raise InternalsMoved(moved("lightning", "WeightAveraging._average_model"))
    average: AveragedModel | None = callback._average_model
    return average


# ----------------------------------------------------------------------------------------------------- torch
def child_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers inside a ``SequentialLR`` or ``ChainedScheduler`` (or a scheduler built like them); none for
    any other scheduler.

    Private: their ``_schedulers`` list (torch has no public accessor).
    """
    from torch.optim.lr_scheduler import ChainedScheduler, SequentialLR

    children = getattr(scheduler, "_schedulers", None)
    if children is None and isinstance(scheduler, (SequentialLR, ChainedScheduler)):
        # Children left as they are would run at the wrong LRs: fail instead.
        raise InternalsMoved(moved("torch", f"{type(scheduler).__name__}._schedulers"))
    return list(children or [])


def foreach_mul(tensors: Sequence[Tensor], scalar: Tensor) -> Sequence[Tensor]:
    """``[t * scalar for t in tensors]`` as one fused kernel where the device has one (the optimizers' kernels).

    Not public enough to call bare: torch's own optimizers have used ``torch._foreach_mul`` for years, but it is
    private by name, has no docstring in torch 2.13 (torch documents only a few unary ``_foreach_*`` ops, as a beta
    API), and newer releases publish the family as ``torch.foreach`` while keeping the private names only "for
    compatibility during migration". So: the public module where it exists, else the private function.
    """
    import torch

    public = getattr(torch, "foreach", None)
    if public is not None and hasattr(public, "mul"):
        return public.mul(list(tensors), scalar)
    return torch._foreach_mul(list(tensors), scalar)


# ---------------------------------------------------------------------------------------------------- TorchJD
def gradvac_state(weighting: Any) -> Tensor | None:
    """The EMA cosine targets of TorchJD's ``GradVacWeighting`` (``None`` before its first call).

    Private: ``_phi_t``. TorchJD offers ``reset()`` but no way to read or restore the state.
    """
    if not hasattr(weighting, "_phi_t"):
        raise InternalsMoved(moved("torchjd", "GradVacWeighting._phi_t"))
    state: Tensor | None = weighting._phi_t
    return state


def set_gradvac_state(weighting: Any, targets: Tensor) -> None:
    """Make TorchJD's ``GradVacWeighting`` start its next call from ``targets`` (T x T) instead of its own state.

    Private: ``_phi_t`` and ``_state_key`` (the weighting starts again from zeros when the key does not match
    ``(T, dtype)``). Set on a release without them, the targets would be silently ignored: hence the check.
    """
    for name in ("_phi_t", "_state_key"):
        if not hasattr(weighting, name):
            raise InternalsMoved(moved("torchjd", f"GradVacWeighting.{name}"))
    weighting._phi_t = targets
    weighting._state_key = (len(targets), targets.dtype)


# ------------------------------------------------------------------------------------------------------ numpy
# The global an ndarray pickle names to rebuild the array: numpy 2 renamed numpy.core to numpy._core, and each
# writes its own name into the pickles it makes (and reads both).
NUMPY_RECONSTRUCT_GLOBALS = frozenset(
    {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
)


def numpy_array_reconstructor() -> Callable[..., Any]:
    """The function an ndarray pickle calls to rebuild the array (numpy's private ``multiarray._reconstruct``).

    Taken from the public ``ndarray.__reduce__``, which returns that very function, rather than from the private
    module path, which numpy 2 renamed.
    """
    import numpy as np

    reconstruct = np.empty(0).__reduce__()[0]
    if not callable(reconstruct):  # numpy types __reduce__ loosely (str | tuple)
        raise InternalsMoved(moved("numpy", "ndarray.__reduce__() with a reconstructor first"))
    return reconstruct


# ------------------------------------------------------------------------------------------------ torch.onnx
# The logger of the ONNX exporter's op registration (a private module), which warns once per torchvision op it
# cannot register when torchvision is absent. Naming a logger that no longer exists is harmless (nothing is
# silenced), but the canary says so.
ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


# ------------------------------------------------------------------------------------------- Lightning pruning
def pruning_targets(callback: Any) -> list[tuple[Any, str]]:
    """The ``(module, parameter name)`` pairs a Lightning ``ModelPruning`` prunes (private ``_parameters_to_prune``)."""
    if not hasattr(callback, "_parameters_to_prune"):
        raise InternalsMoved(moved("lightning", "ModelPruning._parameters_to_prune"))
    return list(callback._parameters_to_prune)


def set_pruning_targets(callback: Any, targets: Sequence[tuple[Any, str]]) -> None:
    """Choose the ``(module, parameter name)`` pairs a ``ModelPruning`` prunes, before its ``setup`` runs."""
    if not hasattr(callback, "_parameters_to_prune"):
        raise InternalsMoved(moved("lightning", "ModelPruning._parameters_to_prune"))
    callback._parameters_to_prune = list(targets)


def pruning_parameter_names(callback: Any) -> list[str]:
    """The parameter names a ``ModelPruning`` prunes in each module (private ``_parameter_names``)."""
    if not hasattr(callback, "_parameter_names"):
        raise InternalsMoved(moved("lightning", "ModelPruning._parameter_names"))
    return list(callback._parameter_names)


def pruning_is_global(callback: Any) -> bool:
    """Whether a ``ModelPruning`` prunes all its parameters together (private ``_use_global_unstructured``)."""
    if not hasattr(callback, "_use_global_unstructured"):
        raise InternalsMoved(moved("lightning", "ModelPruning._use_global_unstructured"))
    return bool(callback._use_global_unstructured)


def optuna_trial_id(trial: Any) -> int:
    """The storage id of an Optuna trial, which ``optuna.trial.Trial(study, trial_id)`` takes to reopen the trial in
    another process (a sweep's trial process reports intermediate values to it for pruning). Optuna keeps it in
    ``Trial._trial_id`` only."""
    trial_id = getattr(trial, "_trial_id", None)
    if not isinstance(trial_id, int):
        raise InternalsMoved(moved("optuna", "optuna.trial.Trial._trial_id"))
    return trial_id
