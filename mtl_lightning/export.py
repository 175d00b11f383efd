"""``mtl export``: the whole multi-task model (encoder and every head) as one ONNX or ``torch.export`` file.

    mtl export --ckpt_path CKPT [CKPT ...] [--format onnx|torch_export|triton] [--output PATH]
               [--outputs predictions|logits] [--opset N] [--config CONFIG ...] [--data.init_args.KEY VALUE ...]
               [--overwrite] [--no-check]

``--format triton`` writes a Triton Inference Server model repository around the ONNX file
(:mod:`mtl_lightning.export_triton`: ``config.pbtxt`` with the per-task outputs and dynamic batching).

The exported program takes one input, ``inputs`` (a batch of any size), and returns one output per task, in the
model's task order and named after the task: the ONNX graph's outputs are named ``<task>``; the ``.pt2`` program
returns ``{task: tensor}``. ``--outputs predictions`` (the default) gives what ``mtl predict`` gives, each task's
kind turning its raw output into predictions: probabilities for classification tasks (sigmoid for binary/multilabel,
softmax over classes for multiclass), values for regression and expected counts for count tasks, so a serving
stack needs nothing of this package; ``--outputs logits`` gives the raw head outputs (to
fuse your own calibration or thresholds). Shapes: ``(N,)`` for binary and single-output regression, ``(N, K)``
otherwise. The task specs and the output kind are stored in the file: ONNX metadata ``mtl_tasks`` /
``mtl_outputs``; for ``.pt2``, ``torch.export.load(path, extra_files={"mtl_tasks.json": ""})``.

Several ``--ckpt_path`` export their ensemble (:mod:`mtl_lightning.ensemble`): one graph that runs every member and
averages their predictions per task as ``mtl test`` of the ensemble does (``--output`` is then required; the
member files are listed in the metadata ``mtl_ensemble``).

The tasks come from the checkpoint. ``--config`` (the config the model was trained with, stacked as in ``mtl fit``)
is optional: its data gives the example batch the graph is traced with, and its tasks must match the checkpoint's.
Without it the example is built from the encoder's ``input_shape`` saved in the checkpoint (token ids when the
encoder has a ``vocab_size``).

ONNX goes through ``torch.onnx.export(dynamo=True)``, the exporter built on ``torch.export``: the same graph capture
as the ``.pt2`` format (one set of limits for both formats) and torch's default; the TorchScript exporter
(``dynamo=False``) is deprecated. Both exporters give the same outputs for every built-in encoder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.callbacks.prediction_writer import check_writable
from mtl_lightning.compat import ONNX_REGISTRATION_LOGGER
from mtl_lightning.contracts import HasInputShape, HasVocabSize, MultiTaskData
from mtl_lightning.ensemble import MultiTaskEnsemble, load_ensemble
from mtl_lightning.errors import ConfigError, OneLineArgumentParser
from mtl_lightning.input_schema import CHECKPOINT_KEY
from mtl_lightning.metrics import predictions
from mtl_lightning.module import MultiTaskModule
from mtl_lightning.tasks import TaskSpec
from mtl_lightning.trained import load_trained

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}
OUTPUTS = ("predictions", "logits")
INPUT_NAME = "inputs"
EXAMPLE_ROWS = 4  # >= 2: torch.export specialises a dimension whose example size is 0 or 1
# Exported and eager float32 outputs differ by float rounding only (fused or reordered kernels): ~1e-7 on the built-in
# encoders, up to ~1e-6 on deeper ones (ResNet). Far looser than that means a wrong graph.
VOCAB_KEY = "mtl_vocab_size"
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-4
INSTALL_HINT = 'pip install "mtl_lightning[export]" (onnx, onnxruntime, onnxscript)'
Model = MultiTaskModule | MultiTaskEnsemble
"""What exports: one trained model or an ensemble of them (the same forward, tasks and saved input shape)."""


class ExportError(ConfigError):
    """The model cannot be exported as asked."""


class TaskOutputs(nn.Module):
    """The model with its per-task outputs in task order: a tuple (ONNX output names) or a dict (``.pt2``)."""

    def __init__(self, model: Model, outputs: str = "predictions", as_dict: bool = False):
        super().__init__()
        self.model = model
        self.specs: list[TaskSpec] = list(model.tasks.values())
        self.probabilities = outputs == "predictions"
        self.as_dict = as_dict

    def forward(self, inputs: Tensor) -> tuple[Tensor, ...] | dict[str, Tensor]:
        raw = self.model(inputs)
        out = [predictions(s, raw[s.name]) if self.probabilities else raw[s.name] for s in self.specs]
        return {s.name: o for s, o in zip(self.specs, out, strict=True)} if self.as_dict else tuple(out)


# ------------------------------------------------------------------------------------------------ loading
def load_model(ckpt_path: str) -> MultiTaskModule:
    """The checkpoint's model with its saved encoder config and input schema (:func:`~mtl_lightning.trained.load_trained`)."""
    return load_trained(ckpt_path, ExportError)


def config_datamodule(configs: Sequence[str], overrides: Sequence[str]) -> Any:
    """The data module of ``mtl`` configs (stacked, with ``--data...`` overrides), as ``mtl fit`` would build it."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from mtl_lightning.cli import MTLCLI

    class DataOnlyCLI(MTLCLI):
        """Reads the configs exactly as the subcommands do, but builds no Trainer: exporting needs the data only,
        and a GPU or multi-process trainer preset must not stop an export on a CPU machine."""

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            return None

    args = [a for c in configs for a in ("--config", c)] + list(overrides)
    cli = DataOnlyCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        auto_configure_optimizers=False,
    )
    return cli.datamodule


def _spec_summary(spec: TaskSpec) -> str:
    return f"{spec.kind}, num_outputs={spec.num_outputs}"


def check_tasks(model_specs: Sequence[TaskSpec], data_specs: Sequence[TaskSpec]) -> None:
    """The config's data must declare the checkpoint's tasks (names, kinds, output counts), else one error."""
    ours = {s.name: s for s in model_specs}
    theirs = {s.name: s for s in data_specs}
    only_ckpt = [n for n in ours if n not in theirs]
    only_config = [n for n in theirs if n not in ours]
    changed = [
        f"{n} (checkpoint: {_spec_summary(ours[n])}; config: {_spec_summary(theirs[n])})"
        for n in ours
        if n in theirs and (ours[n].kind, ours[n].num_outputs) != (theirs[n].kind, theirs[n].num_outputs)
    ]
    if only_ckpt or only_config or changed:
        parts = []
        if only_ckpt:
            parts.append(f"only in the checkpoint: {only_ckpt}")
        if only_config:
            parts.append(f"only in the config: {only_config}")
        if changed:
            parts.append(f"declared differently: {'; '.join(changed)}")
        raise ExportError(
            f"the checkpoint's tasks {list(ours)} differ from the config's data tasks {list(theirs)} ("
            + "; ".join(parts)
            + "). Give the config the model was trained with, or export without --config (the tasks are in the "
            "checkpoint)"
        )


def saved_input_shape(model: Model) -> tuple[int, ...] | None:
    """The encoder's ``input_shape``: from its config in the checkpoint's hparams, else from the encoder."""
    encoder_cfg = getattr(model, "saved_encoder_config", None)
    if isinstance(encoder_cfg, Mapping):
        shape = (encoder_cfg.get("init_args") or {}).get("input_shape")
        if shape is not None:
            return tuple(int(d) for d in shape)
    shape = model.encoder.input_shape if isinstance(model.encoder, HasInputShape) else None
    return tuple(int(d) for d in shape) if shape is not None else None


def example_from_data(datamodule: Any, model: Model) -> Tensor:
    """The first rows of the config's predict data (its test split unless it has its own predict split)."""
    data = datamodule if isinstance(datamodule, MultiTaskData) else None
    check_tasks(list(model.tasks.values()), list(data.tasks) if data is not None else [])
    saved = saved_input_shape(model)
    given = data.input_shape if data is not None else None
    if saved is not None and given is not None and tuple(given) != saved:
        raise ExportError(
            f"the config's data has input_shape {tuple(given)} but the checkpoint's encoder was built for {saved}; "
            "give the config the model was trained with"
        )
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
    if not isinstance(inputs, Tensor):
        raise ExportError(
            f"export takes models with one input tensor; {type(datamodule).__name__} gives "
            f"{type(inputs).__name__} inputs"
        )
    return _rows(inputs, EXAMPLE_ROWS)


def example_from_checkpoint(model: Model) -> Tensor:
    """Random inputs of the encoder's saved ``input_shape``: token ids below ``vocab_size``, else floats."""
    shape = saved_input_shape(model)
    if shape is None:
        raise ExportError(
            f"cannot tell the input shape of encoder {type(model.encoder).__name__} from the checkpoint; pass "
            "--config with the config the model was trained with (its data gives the example batch)"
        )
    generator = torch.Generator().manual_seed(0)
    vocab = model.encoder.vocab_size if isinstance(model.encoder, HasVocabSize) else None
    if isinstance(vocab, int):
        return torch.randint(0, vocab, (EXAMPLE_ROWS, *shape), generator=generator)
    return torch.randn(EXAMPLE_ROWS, *shape, generator=generator)


def _rows(inputs: Tensor, n: int) -> Tensor:
    if inputs.shape[0] >= n:
        return inputs[:n].clone()
    reps = -(-n // inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.ndim - 1)))[:n].clone()


# ----------------------------------------------------------------------------------------------- exporting
def _metadata(model: Model, outputs: str) -> dict[str, str]:
    tasks = [s.to_dict() for s in model.tasks.values()]
    meta = {"mtl_tasks": json.dumps(tasks), "mtl_outputs": outputs, "mtl_input": INPUT_NAME}
    if isinstance(model, MultiTaskEnsemble):
        meta["mtl_ensemble"] = json.dumps(model.checkpoints)
    if isinstance(model.encoder, HasVocabSize):  # token ids: `mtl serve model.onnx` refuses ids out of range
        meta[VOCAB_KEY] = str(model.encoder.vocab_size)
    schema = getattr(model, "saved_data_schema", None)
    if schema is not None:  # the table's encoding, so that `mtl serve model.onnx` takes records by column name
        meta[CHECKPOINT_KEY] = json.dumps(schema)
    return meta


@contextmanager
def _quiet_export() -> Any:
    # The ONNX exporter logs a warning per torchvision op it cannot register when torchvision is absent: noise here.
    # And torch's pytree emits a FutureWarning of its own internals on every export.
    logger = logging.getLogger(ONNX_REGISTRATION_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        logger.setLevel(level)


def _encoder_error(model: Model, fmt: str, err: Exception) -> ExportError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ExportError(
        f"encoder {type(model.encoder).__name__} could not be exported to {fmt}: {type(err).__name__}: {first}. "
        "Its forward must be traceable by torch.export (no data-dependent Python control flow on tensor values)"
    )


def export_onnx(model: Model, example: Tensor, path: Path, outputs: str, opset: int | None) -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {missing}: {INSTALL_HINT}")
    wrapper = TaskOutputs(model, outputs).eval()
    batch = torch.export.Dim("batch")
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=list(model.tasks),
                dynamic_shapes={INPUT_NAME: {0: batch}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as err:
        raise _encoder_error(model, "ONNX", err) from err
    assert program is not None
    program.model.metadata_props.update(_metadata(model, outputs))
    program.save(str(path))  # weights inside the file unless the model is over ONNX's 2 GB limit


def export_torch(model: Model, example: Tensor, path: Path, outputs: str) -> None:
    wrapper = TaskOutputs(model, outputs, as_dict=True).eval()
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.export.export(
                wrapper, (example,), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}
            )
    except Exception as err:
        raise _encoder_error(model, "torch.export", err) from err
    extra = {"mtl_tasks.json": json.dumps(_metadata(model, outputs))}
    torch.export.save(program, str(path), extra_files=extra)


def run_onnx(path: Path, inputs: Tensor) -> dict[str, Tensor]:
    """Run an exported ONNX file with onnxruntime: ``{task: output}``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: inputs.numpy()})
    return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}


def run_torch(path: Path, inputs: Tensor) -> dict[str, Tensor]:
    """Run an exported ``.pt2`` file: ``{task: output}``."""
    with torch.no_grad():
        return dict(torch.export.load(str(path)).module()(inputs))


def check_export(model: Model, fmt: str, path: Path, example: Tensor, outputs: str) -> float | None:
    """Max |exported - PyTorch| over the tasks on the example batch and its first row (None: cannot run ONNX)."""
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return None
    reference = TaskOutputs(model, outputs, as_dict=True).eval()
    worst = 0.0
    for inputs in (example, example[:1]):  # two batch sizes: the batch dimension must be dynamic
        with torch.no_grad():
            want = reference(inputs)
        got = run_onnx(path, inputs) if fmt == "onnx" else run_torch(path, inputs)
        if list(got) != list(want):
            raise ExportError(f"the exported outputs are {list(got)}, expected the tasks {list(want)}")
        for name, value in want.items():
            value_got = got[name].to(value.dtype)
            diff = float((value_got - value).abs().max()) if value_got.shape == value.shape else float("inf")
            if value_got.shape != value.shape or not torch.allclose(value_got, value, atol=CHECK_ATOL, rtol=CHECK_RTOL):
                raise ExportError(
                    f"task {name!r}: the exported {fmt} output (shape {tuple(value_got.shape)}) differs from PyTorch's "
                    f"(shape {tuple(value.shape)}) by up to {diff:.2e} on a batch of {len(inputs)}; the encoder "
                    f"{type(model.encoder).__name__} does not export faithfully"
                )
            worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="mtl export",
        description="Export a trained multi-task model (encoder and all heads) to ONNX or torch.export (.pt2), "
        "with one named output per task.",
        epilog="Other --data.*/--model.* arguments are passed on with the --config files.",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        nargs="+",
        help="the checkpoint (tasks and encoder are read from it); several: their ensemble, averaged per task",
    )
    from mtl_lightning import export_triton  # imported here: it builds on this module

    parser.add_argument(
        "--format", choices=sorted([*FORMATS, export_triton.FORMAT]), help="default: from --output's suffix, else onnx"
    )
    parser.add_argument("--output", help="file to write; default: the checkpoint's path with .onnx / .pt2")
    parser.add_argument(
        "--outputs",
        choices=OUTPUTS,
        default="predictions",
        help="predictions: probabilities (classification) and values (regression), as mtl predict gives "
        "(default); logits: the raw head outputs",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's recommended one)")
    parser.add_argument(
        "--config", action="append", default=[], help="config(s) the model was trained with: the example batch"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip running the exported file against PyTorch"
    )
    export_triton.add_arguments(parser)
    return parser


def _resolve_format(fmt: str | None, output: str | None) -> str:
    if fmt is not None:
        return fmt
    suffix = Path(output).suffix.lower() if output else ""
    return next((f for f, s in FORMATS.items() if s == suffix), "onnx")


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl export ...``; returns the exit code (bad input raises :class:`ExportError`)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    stray = [a for a in rest if a.startswith("-") and not a.startswith(("--data", "--model", "--trainer"))]
    if stray or (rest and not args.config):
        parser.error(f"unrecognized arguments: {' '.join(rest)}" + ("" if args.config else " (no --config given)"))
    fmt = _resolve_format(args.format, args.output)
    from mtl_lightning import export_triton

    if fmt == export_triton.FORMAT:
        return export_triton.export_repository(args, rest)
    export_triton.refuse_options(args, fmt)
    if len(args.ckpt_path) > 1 and not args.output:
        raise ExportError("an ensemble of several checkpoints has no default file name: give --output FILE")
    output = Path(args.output) if args.output else Path(args.ckpt_path[0]).with_suffix(FORMATS[fmt])
    if args.opset is not None and fmt != "onnx":
        raise ExportError("--opset applies to --format onnx only")
    if fmt == "onnx" and args.check and importlib.util.find_spec("onnxruntime") is None:
        print(f"mtl export: onnxruntime is not installed, the exported file is not checked ({INSTALL_HINT})")
    check_writable(output, args.overwrite, what="export file", replace_hint="pass --overwrite")
    model = load_model(args.ckpt_path[0]) if len(args.ckpt_path) == 1 else load_ensemble(args.ckpt_path)
    if args.config:
        example = example_from_data(config_datamodule(args.config, rest), model)
    else:
        example = example_from_checkpoint(model)
    if fmt == "onnx":
        export_onnx(model, example, output, args.outputs, args.opset)
    else:
        export_torch(model, example, output, args.outputs)
    worst = check_export(model, fmt, output, example, args.outputs) if args.check else None
    checked = f"; max |exported - PyTorch| on an example batch: {worst:.2e}" if worst is not None else ""
    print(f"exported tasks {list(model.tasks)} ({args.outputs}) to {output} ({fmt}, input {INPUT_NAME!r}){checked}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
