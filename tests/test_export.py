"""``mtl export``: the whole model to ONNX (run with onnxruntime) and torch.export (.pt2), one named output per task,
equal to the PyTorch outputs at any batch size; bad input gives one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import CONFIGS, QUICKSTART, run_cli

from mtl_lightning import MultiTaskModule, TaskSpec
from mtl_lightning import export as ex
from mtl_lightning.callbacks.prediction_writer import OutputPathError
from mtl_lightning.errors import ConfigError

# Exported and eager float32 outputs differ by rounding only (fused/reordered kernels): about 1e-7 measured on these
# models, so 1e-5 leaves a wide margin while any wrong op, weight or output order is off by far more.
ATOL = RTOL = 1e-5
BATCH_SIZES = (1, 7, 64)  # 1 and 64 differ from the example batch the graph is traced with (4 rows)


def _fit(root: Path, *extra: str) -> Path:
    args = ["fit", "--config", str(QUICKSTART), *extra, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root / "runs")]
    cli = run_cli(args, root)
    return Path(cli.trainer.checkpoint_callback.last_model_path)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fit(tmp_path_factory.mktemp("fit"), "--data.init_args.num_samples", "600")


def _expected(model: MultiTaskModule, x: torch.Tensor, outputs: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.predict_step({"inputs": x}, 0) if outputs == "predictions" else model(x)


def _inputs(model: MultiTaskModule, n: int) -> torch.Tensor:
    shape = ex.saved_input_shape(model)
    assert shape is not None
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n))


def _check_onnx(path: Path, model: MultiTaskModule, outputs: str) -> None:
    ort = pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install mtl_lightning[export])")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["inputs"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch dimension
    assert [o.name for o in session.get_outputs()] == model.task_names
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["mtl_outputs"] == outputs and [t["name"] for t in json.loads(meta["mtl_tasks"])] == model.task_names
    for n in BATCH_SIZES:
        x = _inputs(model, n)
        got = dict(zip(model.task_names, session.run(None, {"inputs": x.numpy()}), strict=True))
        for name, want in _expected(model, x, outputs).items():
            torch.testing.assert_close(torch.from_numpy(got[name]), want, atol=ATOL, rtol=RTOL)


def _check_pt2(path: Path, model: MultiTaskModule, outputs: str) -> None:
    extra = {"mtl_tasks.json": ""}
    program = torch.export.load(str(path), extra_files=extra).module()
    assert json.loads(extra["mtl_tasks.json"])["mtl_outputs"] == outputs
    for n in BATCH_SIZES:
        x = _inputs(model, n)
        with torch.no_grad():
            got = program(x)
        assert list(got) == model.task_names
        for name, want in _expected(model, x, outputs).items():
            torch.testing.assert_close(got[name], want, atol=ATOL, rtol=RTOL)


def _export_and_check(ckpt: Path, fmt: str, out: Path, outputs: str = "predictions", *extra: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (pip install mtl_lightning[export])")
    assert ex.main(["--ckpt_path", str(ckpt), "--format", fmt, "--output", str(out), "--outputs", outputs, *extra]) == 0
    model = ex.load_model(str(ckpt))  # load_from_checkpoint, plus the encoder's saved input_shape
    (_check_onnx if fmt == "onnx" else _check_pt2)(out, model, outputs)


@pytest.mark.parametrize("outputs", ["predictions", "logits"])
def test_onnx_has_one_named_output_per_task_equal_to_pytorch(ckpt: Path, tmp_path: Path, outputs: str) -> None:
    _export_and_check(ckpt, "onnx", tmp_path / "model.onnx", outputs)


def test_torch_export_returns_the_tasks_equal_to_pytorch(ckpt: Path, tmp_path: Path) -> None:
    _export_and_check(ckpt, "torch_export", tmp_path / "model.pt2")


def test_config_gives_the_example_batch(ckpt: Path, tmp_path: Path) -> None:
    extra = ["--config", str(QUICKSTART), "--data.init_args.num_samples", "600", "--opset", "18"]
    _export_and_check(ckpt, "onnx", tmp_path / "model.onnx", "predictions", *extra)


@pytest.mark.slow  # two more trainings and four exports: ~40 s on 2 CPU cores
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            ["--model", str(CONFIGS / "model" / "mmoe.yaml"), "--data.init_args.num_samples", "600"], id="mmoe"
        ),
        pytest.param(
            [
                *("--model", str(CONFIGS / "model" / "cnn.yaml"), "--data", str(CONFIGS / "data" / "images.yaml")),
                *("--data.init_args.num_samples", "200"),
            ],
            id="cnn",
        ),
    ],
)
def test_per_task_and_convolutional_encoders_export(extra: list[str], tmp_path: Path) -> None:
    ckpt = _fit(tmp_path, *extra)
    _export_and_check(ckpt, "torch_export", tmp_path / "model.pt2")
    _export_and_check(ckpt, "onnx", tmp_path / "model.onnx")


# ------------------------------------------------------------------------------------------------- bad input
def test_config_with_other_tasks_names_them(ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    tasks = [
        {"name": "purchase", "kind": "binary"},
        {"name": "segment", "kind": "multiclass", "num_outputs": 3},
        {"name": "churn", "kind": "binary"},
    ]
    other.write_text(json.dumps({"data": {"init_args": {"tasks": tasks, "num_samples": 600}}}))
    args = ["--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.onnx"), "--config", str(QUICKSTART)]
    with pytest.raises(
        ex.ExportError, match=r"only in the checkpoint: \['spend'\]; only in the config: \['churn'\]"
    ) as e:
        ex.main([*args, "--config", str(other)])
    assert "segment (checkpoint: multiclass, num_outputs=4; config: multiclass, num_outputs=3)" in str(e.value)
    assert not (tmp_path / "m.onnx").exists()


def test_missing_checkpoint_and_unwritable_output(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint .*nope.ckpt does not exist"):
        ex.main(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "m.onnx")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        ex.main(["--ckpt_path", str(ckpt), "--output", str(blocker / "m.onnx")])
    with pytest.raises(OutputPathError, match=r"already exists.*--overwrite"):
        ex.main(["--ckpt_path", str(ckpt), "--output", str(blocker)])
    with pytest.raises(ex.ExportError, match="--opset applies to --format onnx only"):
        ex.main(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.pt2"), "--opset", "18"])


class DataDependentEncoder(nn.Module):
    """Branches on a tensor value: torch.export cannot trace that."""

    out_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_untraceable_encoder_is_named(tmp_path: Path) -> None:
    model = MultiTaskModule(DataDependentEncoder(), [TaskSpec("y", "regression")]).eval()
    with pytest.raises(ex.ExportError, match=r"encoder DataDependentEncoder could not be exported to torch\.export"):
        ex.export_torch(model, torch.randn(4, 3), tmp_path / "m.pt2", "predictions")
