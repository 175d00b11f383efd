"""Compressed checkpoints: a Lightning checkpoint plus a record of how its layers were changed.

A factorised or quantised model has other modules than the model its config builds, so its weights cannot load
into that model as they are. The checkpoint therefore keeps, under the top-level key ``"compression"``, the list of
steps applied (``{"method": "svd", "layers": {name: {"rank": r, ...}}}``, ``{"method": "dynamic_int8", ...}``), and
:func:`restore_compression` re-applies their structure (with placeholder weights) to a freshly built model before
the state dict loads. Everything else is an ordinary checkpoint: the hyper-parameters that rebuild the model, the
weights, loadable with ``torch.load(weights_only=True)``. Optimizer and scheduler states are dropped (a compressed
model is for inference). Why not ``torch.save`` of the whole module: that pickles code references, needs
``weights_only=False`` to load and could not be used by ``mtl test/predict --ckpt_path``.

Loading: :func:`load_compressed` (any checkpoint, compressed or not). ``MultiTaskModule.load_from_checkpoint`` and
``mtl test|predict --ckpt_path`` load it too: :func:`on_load` is the checkpoint hook of the ``"compression"`` key
(:mod:`mtl_lightning.checkpoint_hooks`, through this package's entry point), which the module runs from
``on_load_checkpoint``, before Lightning loads the state dict.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from mtl_lightning.checkpoint_io import load_checkpoint_file
from mtl_lightning.compression.lowrank import restore_svd
from mtl_lightning.compression.quantize import quiet_deprecations, restore_quantized
from mtl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

RECORD_KEY = "compression"
_RESTORERS = {"svd": restore_svd, "dynamic_int8": restore_quantized}
# Training state that a compressed model cannot resume from (its parameters differ from the optimizer's).
_DROPPED = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors on CPU), or a ConfigError naming the path."""
    with quiet_deprecations():
        checkpoint = load_checkpoint_file(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (it has no 'state_dict')")
    return checkpoint


def compression_steps(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The compression steps recorded in ``checkpoint`` (empty for an ordinary one)."""
    return list(checkpoint.get(RECORD_KEY) or [])


def restore_compression(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Give ``model`` the structure recorded in ``checkpoint`` (no-op for ordinary checkpoints; idempotent)."""
    for step in compression_steps(checkpoint):
        method = step.get("method")
        restore = _RESTORERS.get(method) if isinstance(method, str) else None
        if restore is None:
            raise ConfigError(f"unknown compression method {method!r} in the checkpoint; known: {sorted(_RESTORERS)}")
        restore(model, step)


def refuse_resume(checkpoint: dict[str, Any]) -> None:
    """Raise if ``checkpoint`` is compressed: ``fit --ckpt_path`` would resume from it, but it holds no training state."""
    methods = [str(step.get("method")) for step in compression_steps(checkpoint)]
    if methods:
        raise ConfigError(
            f"cannot resume training from a compressed checkpoint ({', '.join(methods)}): it keeps the weights for "
            "inference and drops the optimizer and loop state. Use it with mtl test, validate, predict or export; to "
            "train further, resume from the checkpoint it was compressed from"
        )


def on_load(model: nn.Module, checkpoint: dict[str, Any], fitting: bool) -> None:
    """The checkpoint hook of :data:`RECORD_KEY`: refuse to resume a fit from it, else rebuild the structure."""
    if fitting:
        refuse_resume(checkpoint)  # before Lightning's own KeyError about missing optimizer states
    restore_compression(model, checkpoint)


def save_compressed(
    model: nn.Module, source: dict[str, Any], step: dict[str, Any] | None, path: str | Path
) -> dict[str, Any]:
    """Write ``model`` as an inference checkpoint built from ``source``'s, with ``step`` appended to its record.

    ``step=None`` writes the model as it is (e.g. a pruned one) without its training state.
    """
    checkpoint = {k: v for k, v in source.items() if k not in _DROPPED}
    # The state dict as it is: its `_metadata` holds the layers' versions, which quantised layers need to load.
    checkpoint["state_dict"] = model.state_dict()
    steps = [*compression_steps(source), *([step] if step else [])]
    checkpoint.pop(RECORD_KEY, None)
    if steps:
        checkpoint[RECORD_KEY] = steps
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return checkpoint


def load_compressed(path: str | Path, model_class: type[LightningModule] | None = None) -> Any:
    """Load a (compressed or ordinary) checkpoint file into the model class it was trained with; see below."""
    return model_from_checkpoint(read_checkpoint(path), model_class)


def model_from_checkpoint(checkpoint: dict[str, Any], model_class: type[LightningModule] | None = None) -> Any:
    """The model a (compressed or ordinary) checkpoint holds, on CPU, in eval mode (``MultiTaskModule`` by default).

    The model is built from the checkpoint's hyper-parameters with Lightning's own ``load_from_checkpoint`` (given
    the checkpoint without its weights), the recorded structure is restored, then the weights load strictly.
    """
    if model_class is None:
        from mtl_lightning.module import MultiTaskModule

        model_class = MultiTaskModule
    buffer = io.BytesIO()  # Lightning builds the model from its hyper-parameters, here without any weights
    torch.save({**checkpoint, "state_dict": {}, RECORD_KEY: []}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():  # every weight is "missing" here on purpose: they load below
        warnings.filterwarnings(
            "ignore", message="Found keys that are in the model state dict but not in the checkpoint"
        )
        warnings.filterwarnings("ignore", message="The state dict in .* contains no parameters")
        model = model_class.load_from_checkpoint(buffer, map_location="cpu", strict=False, weights_only=True)
    restore_compression(model, checkpoint)
    with quiet_deprecations():
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()
