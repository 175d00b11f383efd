"""Dynamic int8 quantisation of Linear layers for CPU inference.

Weights are stored as int8 (one scale per tensor); activations are quantised on the fly, batch by batch, so no
calibration data is needed. Layers other than Linear (norms, activations) stay in float.

Why ``torch.ao.quantization.quantize_dynamic`` although torch marks it deprecated in favour of torchao: on torch 2.13
it still ships, needs nothing else, and runs int8 matrix products through the native CPU kernels (x86/fbgemm,
onednn, qnnpack). torchao 0.18 (``quantize_(model, Int8DynamicActivationInt8WeightConfig())``) installs from PyPI
here, but in eager mode on CPU it ran the quickstart MLP 6x (batch 256) to 20x (batch 1) slower than float, as its
int8 tensor subclass has no fused CPU kernel without ``torch.compile``. When torch drops ``torch.ao.quantization``,
this module is the one place to switch. The deprecation warnings are silenced only around the calls made here.

Quantised layers run on CPU only; a quantised checkpoint is for CPU inference (``mtl test/predict`` with the cpu
trainer), not for further training.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn
from torch.ao.nn.quantized import dynamic as nnqd

from mtl_lightning.compression.selection import DEFAULT_PATTERNS, select_layers
from mtl_lightning.errors import ConfigError


def available_backends() -> list[str]:
    """The quantised-kernel backends this PyTorch build supports (``torch.backends.quantized.supported_engines``)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_backend(backend: str | None) -> str:
    """``backend`` if this build supports it (None: the current default engine); otherwise one clear error."""
    available = available_backends()
    if not available:
        raise ConfigError(
            "this PyTorch build has no quantised CPU kernels (torch.backends.quantized.supported_engines)"
        )
    chosen = torch.backends.quantized.engine if backend is None else backend
    if chosen not in available:
        raise ConfigError(
            f"quantisation backend {chosen!r} is not available in this PyTorch build; available: {available} "
            "(x86 or fbgemm on Intel/AMD CPUs, qnnpack on ARM)"
        )
    return chosen


@contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence torch's deprecation warnings about ``torch.ao.quantization`` and int8 tensors (see the module doc).

    They fire on every call that quantises, and on every load of a checkpoint holding int8 tensors.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


def _quantize_layers(model: nn.Module, names: Sequence[str]) -> None:
    if not hasattr(torch.ao.quantization, "quantize_dynamic"):
        raise RuntimeError(
            "this PyTorch has no torch.ao.quantization.quantize_dynamic; use torch<=2.13 or port "
            "mtl_lightning/compression/quantize.py to torchao's quantize_"
        )
    with quiet_deprecations():
        # A set of module names: only those layers get a qconfig, so nothing else is touched.
        torch.ao.quantization.quantize_dynamic(model, qconfig_spec=set(names), dtype=torch.qint8, inplace=True)


def quantize_model(
    model: nn.Module, patterns: Sequence[str] = DEFAULT_PATTERNS, backend: str | None = None
) -> dict[str, Any]:
    """Quantise the Linear layers of ``model`` matching ``patterns`` in place; returns the checkpoint record.

    ``backend`` picks the int8 kernels (a ``torch.backends.quantized.engine``): the weights are packed for it, and
    packed weights keep their kernels whatever the engine is later. It is recorded for :func:`restore_quantized`.
    """
    backend = check_backend(backend)
    layers = select_layers(model, patterns, (nn.Linear,), "quantize --layers")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        _quantize_layers(model, list(layers))
    finally:
        torch.backends.quantized.engine = previous
    model.eval()
    return {"method": "dynamic_int8", "layers": list(layers), "backend": backend, "dtype": "qint8"}


def restore_quantized(model: nn.Module, record: dict[str, Any]) -> None:
    """Quantise the recorded layers (with placeholder weights) so the checkpoint's int8 weights can load into them.

    The backend the checkpoint was made with becomes this process's ``torch.backends.quantized.engine``: the weights
    are packed for it while the state dict loads. Where that backend is missing, the default one is used.
    """
    backend = record.get("backend")
    if backend in available_backends():
        torch.backends.quantized.engine = backend
    elif backend is not None:
        rank_zero_warn(
            f"the checkpoint was quantised for backend {backend!r}, which this PyTorch lacks; "
            f"using {torch.backends.quantized.engine!r}"
        )
    todo = [n for n in record["layers"] if not isinstance(model.get_submodule(n), nnqd.Linear)]
    wrong = [n for n in todo if not isinstance(model.get_submodule(n), nn.Linear)]
    if wrong:
        raise ConfigError(
            f"the checkpoint quantised layers {wrong}, which are not Linear layers in this model; "
            "load it with the model config it was made from"
        )
    if todo:
        _quantize_layers(model, todo)
