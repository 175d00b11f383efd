"""What ``mtl serve`` serves: a checkpoint (PyTorch) or an exported ONNX file (ONNX Runtime), behind one interface.

Several checkpoints are served as their ensemble (:mod:`mtl_lightning.ensemble`: the members' predictions averaged
per task, as ``mtl test`` of the ensemble scores them); an ensemble exported to one ONNX file serves as any ONNX file.

Both backends give :class:`ServedModel`: the task specs, the input a request must give (a table's schema, or a
tensor's shape and dtype) and ``predict(inputs) -> {task: predictions}``, the predictions being what ``mtl predict``
and ``mtl export --outputs predictions`` give (probabilities for classification, values for regression). Its
:meth:`ServedModel.signature` is what a hot reload must keep: a model with other tasks or another input is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_lightning.errors import ConfigError
from mtl_lightning.input_schema import CHECKPOINT_KEY, InputSchema
from mtl_lightning.tasks import TaskSpec

BACKENDS = ("torch", "onnx")
ONNX_SUFFIXES = (".onnx",)
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}


class ServeError(ConfigError):
    """A model cannot be served as asked (one line: ``mtl: error: ...``)."""


@dataclass
class ServedModel:
    """A loaded model and what a request must give it."""

    path: str | list[str]
    """The file, or the member checkpoints of an ensemble (as given to :func:`load_served_model`)."""
    backend: str
    sha256: str
    tasks: dict[str, TaskSpec]
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    schema: InputSchema | None
    predict: Callable[[np.ndarray], dict[str, np.ndarray]]
    vocab_size: int | None = None
    """For token-id inputs: ids must lie in ``[0, vocab_size)``."""

    def signature(self) -> dict[str, Any]:
        """What a replacement must share: task names, kinds and outputs; the input shape, dtype and columns."""
        return {
            "tasks": [[s.name, s.kind, s.task_kind.checked_num_outputs(s)] for s in self.tasks.values()],
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.input_dtype),
            # names and kinds only: a model retrained on newer rows has other statistics and maybe more categories,
            # and encodes each request with its own; what a client sends stays valid
            "columns": None if self.schema is None else [[c.name, c.kind] for c in self.schema.columns],
        }

    def describe(self) -> dict[str, Any]:
        """``/info``'s view of the model: tasks (with class names), the input and where it came from."""
        class_names = dict(self.schema.class_names) if self.schema is not None else {}
        tasks = [
            {
                "name": s.name,
                "kind": s.kind,
                "num_outputs": s.task_kind.checked_num_outputs(s),
                **({"class_names": list(class_names[s.name])} if s.name in class_names else {}),
            }
            for s in self.tasks.values()
        ]
        if self.schema is not None:
            inputs: dict[str, Any] = {"records": self.schema.to_dict()}
        else:
            inputs = {"tensor": {"shape": ["N", *self.input_shape], "dtype": str(self.input_dtype)}}
            if self.vocab_size is not None:
                inputs["tensor"]["vocab_size"] = self.vocab_size
        return {"path": self.path, "backend": self.backend, "sha256": self.sha256, "tasks": tasks, "input": inputs}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def infer_backend(path: str | Path) -> str:
    return "onnx" if Path(path).suffix.lower() in ONNX_SUFFIXES else "torch"


ModelPath = str | Path | Sequence[str | Path]
"""One model file, or the checkpoints of an ensemble."""


def _files(path: ModelPath) -> list[Path]:
    files = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    if not files:
        raise ServeError("no model file given; give a .ckpt or .onnx file (or several .ckpt files: an ensemble)")
    for file in files:
        if not file.is_file():
            what = "is a directory, not a file" if file.is_dir() else "does not exist"
            raise ServeError(
                f"model file {str(file)!r} {what} (looked for {file.resolve()}); give a .ckpt or .onnx file"
            )
    return files


def load_served_model(
    path: ModelPath, device: str = "cpu", backend: str | None = None, threads: int | None = None
) -> ServedModel:
    """A checkpoint (``.ckpt``: PyTorch), several (their ensemble) or an ONNX file (``.onnx``: ONNX Runtime).

    ``threads``: ONNX Runtime's intra-op threads, without spinning between calls (None: its defaults); the
    PyTorch backend's are set per process (:meth:`~mtl_lightning.serve.api.MultiTaskAPI.setup`).
    """
    if backend is not None and backend not in BACKENDS:
        raise ServeError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    files = _files(path)
    backend = backend or infer_backend(files[0])
    if len(files) > 1 and (backend != "torch" or any(infer_backend(f) != "torch" for f in files)):
        raise ServeError(
            "an ensemble is served from its checkpoints (.ckpt); to serve it with ONNX Runtime, export it as one "
            "file (mtl export --ckpt_path A.ckpt B.ckpt ... --output ensemble.onnx) and serve that"
        )
    return _load_onnx(files[0], device, threads) if backend == "onnx" else _load_torch(files, device)


def _load_torch(files: list[Path], device: str) -> ServedModel:
    from mtl_lightning.ensemble import load_ensemble
    from mtl_lightning.export import load_model, saved_input_shape

    model = (load_model(str(files[0])) if len(files) == 1 else load_ensemble(files)).to(device)
    shape = saved_input_shape(model)
    if shape is None:
        raise ServeError(
            f"cannot tell the input shape of encoder {type(model.encoder).__name__} from {str(files[0])!r}; serve an "
            "ONNX export of it instead (mtl export --ckpt_path ... --config CONFIG)"
        )
    schema_dict = getattr(model, "saved_data_schema", None)  # load_model reads it from the checkpoint
    vocab = getattr(model.encoder, "vocab_size", None)
    tasks = dict(model.tasks)

    @torch.inference_mode()
    def predict(inputs: np.ndarray) -> dict[str, np.ndarray]:
        outputs = model(torch.from_numpy(inputs).to(device))
        return {
            name: tasks[name].task_kind.predictions(tasks[name], out).float().cpu().numpy()
            for name, out in outputs.items()
        }

    digests = [file_sha256(f) for f in files]
    return ServedModel(
        path=str(files[0]) if len(files) == 1 else [str(f) for f in files],
        backend="torch",
        # an ensemble's: the digest of its members' digests, so that any member's change is a new model
        sha256=digests[0] if len(files) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest(),
        tasks=tasks,
        input_shape=shape,
        input_dtype=np.dtype(np.int64 if isinstance(vocab, int) else np.float32),
        schema=InputSchema.from_dict(schema_dict) if isinstance(schema_dict, Mapping) else None,
        predict=predict,
        vocab_size=vocab if isinstance(vocab, int) else None,
    )


def _load_onnx(path: Path, device: str, threads: int | None = None) -> ServedModel:
    from mtl_lightning.export import VOCAB_KEY

    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ServeError('serving ONNX files needs onnxruntime: pip install "mtl_lightning[export]"') from err
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    try:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:
        raise ServeError(f"could not load {str(path)!r} as an ONNX model: {err}") from err
    meta = session.get_modelmeta().custom_metadata_map
    if "mtl_tasks" not in meta:
        raise ServeError(
            f"{str(path)!r} was not written by mtl export (no task specs in its metadata); export the checkpoint "
            "with mtl export --ckpt_path CKPT"
        )
    if meta.get("mtl_outputs", "predictions") != "predictions":
        raise ServeError(
            f"{str(path)!r} returns {meta['mtl_outputs']}, not predictions; export it with --outputs predictions"
        )
    tasks = {spec.name: spec for spec in (TaskSpec.from_any(d) for d in json.loads(meta["mtl_tasks"]))}
    schema_text = meta.get(CHECKPOINT_KEY)
    (graph_input,) = session.get_inputs()
    dtype = _ORT_TYPES.get(graph_input.type)
    if dtype is None:
        raise ServeError(f"{str(path)!r} takes {graph_input.type} inputs; mtl serve takes float or int64 tensors")
    shape = tuple(int(d) for d in graph_input.shape[1:])
    names = [o.name for o in session.get_outputs()]

    def predict(inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {graph_input.name: inputs}), strict=True))

    return ServedModel(
        path=str(path),
        backend="onnx",
        sha256=file_sha256(path),
        tasks=tasks,
        input_shape=shape,
        input_dtype=np.dtype(dtype),
        schema=InputSchema.from_dict(json.loads(schema_text)) if schema_text else None,
        predict=predict,
        vocab_size=int(meta[VOCAB_KEY]) if meta.get(VOCAB_KEY, "").isdigit() else None,
    )


def incompatibility(current: Mapping[str, Any], candidate: Mapping[str, Any]) -> str | None:
    """Why a model with signature ``candidate`` cannot replace one with ``current`` (None: it can)."""
    for key, what in (("tasks", "tasks"), ("input_shape", "input shape"), ("input_dtype", "input dtype")):
        if current[key] != candidate[key]:
            return f"its {what} {candidate[key]} differ from the served model's {current[key]}"
    if current["columns"] != candidate["columns"]:
        return f"its input columns {candidate['columns']} differ from the served model's {current['columns']}"
    return None
