"""``mtl export --format triton``: a Triton Inference Server model repository around the ONNX export.

    mtl export --ckpt_path CKPT --format triton [--output REPOSITORY] [--model_name NAME]
               [--max_batch_size 64] [--max_queue_delay_us 100] [--outputs ...] [--config ...] [--overwrite]

writes Triton's layout::

    REPOSITORY/NAME/config.pbtxt      platform "onnxruntime_onnx", max_batch_size, dynamic_batching
    REPOSITORY/NAME/1/model.onnx      the file `mtl export --format onnx` writes (version 1)

The config is read off the ONNX graph, so it cannot disagree with the file: one input ``inputs`` (its data type,
TYPE_FP32 for features or TYPE_INT64 for token ids, and its dims without the batch dimension) and one output per
task, named after the task. A task whose output is one number per row (binary, single-output regression: shape
``(N,)``) gets ``dims: [ 1 ]`` with ``reshape: { shape: [ ] }``, Triton's spelling for "the batch dimension is the
whole shape": clients then receive ``(N, 1)``. Requests are batched dynamically up to ``max_batch_size`` rows,
waiting at most ``max_queue_delay_us`` microseconds for a batch to fill. Triton is not run here: the export is
checked by running ``model.onnx`` in onnxruntime on a batch of ``max_batch_size`` rows against the config's shapes.

A repository holds many models, so only ``REPOSITORY/NAME`` is this export's: an existing one is refused unless
``--overwrite``, which replaces its ``config.pbtxt`` and version ``1`` and leaves other versions alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

FORMAT = "triton"
PLATFORM = "onnxruntime_onnx"
CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"  # the ONNX Runtime backend's default model file name
VERSION = "1"
DEFAULT_MODEL_NAME = "mtl_model"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_DELAY_US = 100
# A model's folder name in the repository (Triton requires the config's name to equal it).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# ONNX element types (TensorProto.DataType names) and Triton's names for them, for the ONNX Runtime backend
# (Triton's model configuration docs, "Datatypes").
ONNX_TO_TRITON = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "STRING": "TYPE_STRING",
}


def _error(message: str) -> Exception:
    from mtl_lightning.export import ExportError  # export.py imports this module lazily: no cycle at import time

    return ExportError(message)


@dataclass(frozen=True)
class TensorConfig:
    """One input or output of the config: ``dims`` without the batch dimension (``-1``: any size)."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @property
    def reshaped(self) -> bool:
        """The model's tensor is ``(batch,)``: Triton needs ``dims: [ 1 ]`` and ``reshape: { shape: [ ] }``."""
        return not self.dims

    def lines(self) -> list[str]:
        dims = self.dims or (1,)
        body = [
            f"    name: {json.dumps(self.name)}",
            f"    data_type: {self.data_type}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
        ]
        if self.reshaped:
            body.append("    reshape: { shape: [ ] }")
        return ["  {", *body, "  }"]


# ----------------------------------------------------------------------------------------------- the config
def graph_tensors(path: Path) -> tuple[list[TensorConfig], list[TensorConfig]]:
    """The (inputs, outputs) of an ONNX file as Triton sees them: the batch dimension (the first, symbolic) dropped."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [_tensor(v) for v in graph.input if v.name not in initializers], [_tensor(v) for v in graph.output]


def _tensor(value: Any) -> TensorConfig:
    import onnx

    tensor_type = value.type.tensor_type
    element = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    if element not in ONNX_TO_TRITON:
        raise _error(
            f"ONNX tensor {value.name!r} has element type {element}, which Triton's ONNX Runtime backend lacks"
        )
    dims = list(tensor_type.shape.dim)
    if not dims or dims[0].HasField("dim_value"):
        raise _error(
            f"ONNX tensor {value.name!r} has no dynamic batch dimension (shape "
            f"{[d.dim_value or d.dim_param for d in dims]}); Triton's dynamic batching needs one"
        )
    rest = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims[1:])
    return TensorConfig(value.name, ONNX_TO_TRITON[element], rest)


def config_text(
    name: str,
    inputs: Sequence[TensorConfig],
    outputs: Sequence[TensorConfig],
    max_batch_size: int,
    max_queue_delay_us: int,
    header: Sequence[str] = (),
) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""

    def block(items: Sequence[TensorConfig]) -> list[str]:
        lines: list[str] = []
        for i, item in enumerate(items):
            entry = item.lines()
            if i < len(items) - 1:
                entry[-1] += ","
            lines += entry
        return lines

    text = [
        *(f"# {line}" for line in header),
        f"name: {json.dumps(name)}",
        f"platform: {json.dumps(PLATFORM)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        *block(inputs),
        "]",
        "output [",
        *block(outputs),
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
    ]
    return "\n".join(text) + "\n"


def _header(model: Any, outputs: str, ckpt_paths: Sequence[str]) -> list[str]:
    kinds = ", ".join(f"{s.name} ({s.kind}, {s.num_outputs})" for s in model.tasks.values())
    what = "probabilities / values, as mtl predict gives" if outputs == "predictions" else "raw head outputs"
    return [
        f"Written by `mtl export --format triton` from {', '.join(Path(p).name for p in ckpt_paths)}.",
        f"One output per task ({outputs}: {what}): {kinds}.",
    ]


# -------------------------------------------------------------------------------------------------- the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--format triton`` on ``mtl export``'s parser."""
    group = parser.add_argument_group("--format triton (a Triton model repository; --output is its folder)")
    group.add_argument("--model_name", help=f"the model's folder and config name (default: {DEFAULT_MODEL_NAME})")
    group.add_argument(
        "--max_batch_size", type=int, help=f"most rows Triton batches into one call (default: {DEFAULT_MAX_BATCH_SIZE})"
    )
    group.add_argument(
        "--max_queue_delay_us",
        type=int,
        help=f"microseconds a request may wait for a batch to fill (default: {DEFAULT_MAX_QUEUE_DELAY_US})",
    )


def refuse_options(args: argparse.Namespace, fmt: str) -> None:
    """The Triton options given with another format: one error rather than silently ignoring them."""
    given = [f"--{k}" for k in ("model_name", "max_batch_size", "max_queue_delay_us") if getattr(args, k) is not None]
    if given:
        raise _error(f"{', '.join(given)} applies to --format triton only (this export is --format {fmt})")


def default_repository(ckpt_path: str) -> Path:
    """``<checkpoint folder>/<checkpoint name>_triton``, beside the checkpoint like the other formats' files."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.stem}_triton")


def _settings(args: argparse.Namespace) -> tuple[str, int, int]:
    name = args.model_name if args.model_name is not None else DEFAULT_MODEL_NAME
    if not _MODEL_NAME.fullmatch(name):
        raise _error(f"--model_name {name!r} is not a folder name; use letters, digits, '_', '-' and '.'")
    batch = DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size
    if batch < 1:
        raise _error(
            f"--max_batch_size must be >= 1, got {batch} (Triton's 0 means a model without a batch dimension; "
            "this export always has one)"
        )
    delay = DEFAULT_MAX_QUEUE_DELAY_US if args.max_queue_delay_us is None else args.max_queue_delay_us
    if delay < 0:
        raise _error(f"--max_queue_delay_us must be >= 0 (0: run each batch as soon as it arrives), got {delay}")
    return name, batch, delay


def _model_folder(root: Path, name: str, overwrite: bool) -> Path:
    from mtl_lightning.callbacks.prediction_writer import check_writable

    if root.suffix.lower() in (".onnx", ".pt2"):
        raise _error(
            f"--output {str(root)!r} looks like a file; with --format triton it is the model repository folder"
        )
    folder = root / name
    if folder.exists() and not folder.is_dir():
        raise _error(f"{str(folder)!r} is a file; give another --output or --model_name")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise _error(
            f"the Triton model folder {str(folder)!r} already exists; pass --overwrite to replace its {CONFIG_FILE} "
            f"and version {VERSION}, or choose another --output or --model_name"
        )
    check_writable(folder / CONFIG_FILE, overwrite=True, what="Triton model config")  # a folder we can write into
    return folder


def _check_batch(path: Path, example: Tensor, rows: int, outputs: Sequence[TensorConfig]) -> None:
    """Run ``model.onnx`` on ``rows`` rows: every task's output must have the shape the config promises."""
    import torch

    from mtl_lightning.export import run_onnx

    batch = torch.cat([example] * -(-rows // len(example)))[:rows]
    got = run_onnx(path, batch)
    for out in outputs:
        shape = tuple(got[out.name].shape)
        if len(shape) != len(out.dims) + 1 or shape[0] != rows:
            raise _error(f"output {out.name!r} of the ONNX file has shape {shape} on {rows} rows, not ({rows}, ...)")
        if any(want not in (-1, have) for want, have in zip(out.dims, shape[1:], strict=True)):
            raise _error(f"output {out.name!r} has shape {shape}; the config says dims {list(out.dims)}")


def export_repository(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """``mtl export --format triton``; the other options are those of the ONNX export (see the module)."""
    from mtl_lightning import export as ex

    name, max_batch_size, delay = _settings(args)
    ckpt_paths = [args.ckpt_path] if isinstance(args.ckpt_path, str) else list(args.ckpt_path)
    if len(ckpt_paths) > 1 and not args.output:
        raise _error("an ensemble of several checkpoints has no default repository: give --output FOLDER")
    root = Path(args.output) if args.output else default_repository(ckpt_paths[0])
    folder = _model_folder(root, name, args.overwrite)
    check = args.check and importlib.util.find_spec("onnxruntime") is not None
    if args.check and not check:
        print(f"mtl export: onnxruntime is not installed, the exported file is not checked ({ex.INSTALL_HINT})")
    model = ex.load_model(ckpt_paths[0]) if len(ckpt_paths) == 1 else ex.load_ensemble(ckpt_paths)
    if args.config:
        example = ex.example_from_data(ex.config_datamodule(args.config, rest), model)
    else:
        example = ex.example_from_checkpoint(model)
    # Written beside the repository, then moved in: a Triton polling the repository never sees half a model.
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}.triton.") as tmp:
        staged = Path(tmp)
        (staged / VERSION).mkdir()
        onnx_path = staged / VERSION / MODEL_FILE
        ex.export_onnx(model, example, onnx_path, args.outputs, args.opset)
        worst = ex.check_export(model, "onnx", onnx_path, example, args.outputs) if check else None
        inputs, outputs = graph_tensors(onnx_path)
        if check:
            _check_batch(onnx_path, example, max_batch_size, outputs)
        header = _header(model, args.outputs, ckpt_paths)
        (staged / CONFIG_FILE).write_text(config_text(name, inputs, outputs, max_batch_size, delay, header))
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / VERSION).exists():
            shutil.rmtree(folder / VERSION)
        shutil.move(str(staged / VERSION), str(folder / VERSION))
        os.replace(staged / CONFIG_FILE, folder / CONFIG_FILE)
    checked = f"; max |exported - PyTorch| on an example batch: {worst:.2e}" if worst is not None else ""
    print(
        f"exported tasks {list(model.tasks)} ({args.outputs}) as Triton model {name!r} to {folder} "
        f"({CONFIG_FILE}, {VERSION}/{MODEL_FILE}; max_batch_size {max_batch_size}){checked}"
    )
    return 0
