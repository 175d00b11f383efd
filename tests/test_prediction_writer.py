"""``mtl predict`` with ``configs/callbacks/prediction_writer.yaml``: per-task columns, ids, formats, bad output
paths (refused before predicting) and a 2-process DDP run that writes the same file as one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import CONFIGS, QUICKSTART, run_cli

from mtl_lightning import MultiTaskModule
from mtl_lightning.callbacks import prediction_writer as pw
from mtl_lightning.callbacks.prediction_writer import OutputPathError, PredictionWriter, PredictionWriterError
from mtl_lightning.data.per_task import task_rows
from mtl_lightning.tasks import TaskSpec

WRITER = str(CONFIGS / "callbacks" / "prediction_writer.yaml")
# 1530 rows give a test (= predict) split of 153 rows: not a multiple of 2 processes x 32 rows.
DATA = ["--data.init_args.num_samples", "1530", "--data.init_args.eval_batch_size", "32"]
PREDICT_ROWS = 153
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
# These tests check the file layout, not predictions of a trained model: the untrained one is asked for on purpose.
UNTRAINED = [*QUIET, "--ckpt_path", "untrained"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickstart model trained for a few steps (weights that differ from the initialisation)."""
    root = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", str(QUICKSTART), *DATA, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root / "runs")]
    cli = run_cli(args, root)
    return Path(cli.trainer.checkpoint_callback.last_model_path)  # type: ignore[union-attr]


def _predict(ckpt: Path, out: Path, root: Path, *extra: str) -> object:
    args = ["predict", "--config", str(QUICKSTART), *DATA, "--ckpt_path", str(ckpt), *QUIET]
    return run_cli([*args, "--trainer.callbacks+", WRITER, "--trainer.callbacks.output_path", str(out), *extra], root)


def _reference(model: MultiTaskModule, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        return {k: v.numpy() for k, v in model.predict_step({"inputs": inputs}, 0).items()}


# ------------------------------------------------------------------------------------------------- columns
def test_columns_of_every_task_kind() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    cols = pw.task_columns(TaskSpec("seg", "multiclass", num_outputs=3), probs, 0.5)
    assert list(cols) == ["seg_prob_0", "seg_prob_1", "seg_prob_2", "seg_pred"]
    np.testing.assert_array_equal(cols["seg_pred"], probs.argmax(1))
    np.testing.assert_array_equal(cols["seg_prob_2"], probs[:, 2])

    p = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    cols = pw.task_columns(TaskSpec("buy", "binary"), p, 0.5)
    assert list(cols) == ["buy_prob", "buy_pred"]
    # p = 0.5 is negative: torchmetrics' rule (p > threshold), so written predictions agree with the logged accuracy.
    np.testing.assert_array_equal(cols["buy_pred"], [0, 0, 1])
    np.testing.assert_array_equal(pw.task_columns(TaskSpec("buy", "binary"), p, 0.95)["buy_pred"], [0, 0, 0])

    multi = np.array([[0.1, 0.7], [0.6, 0.4]], dtype=np.float32)
    cols = pw.task_columns(TaskSpec("tags", "multilabel", num_outputs=2), multi, 0.5)
    assert list(cols) == ["tags_prob_0", "tags_prob_1", "tags_pred_0", "tags_pred_1"]
    np.testing.assert_array_equal(cols["tags_pred_1"], [1, 0])

    values = rng.normal(size=(4, 2)).astype(np.float32)
    assert list(pw.task_columns(TaskSpec("pos", "regression", num_outputs=2), values, 0.5)) == ["pos_0", "pos_1"]
    one = pw.task_columns(TaskSpec("y", "regression"), values[:, 0], 0.5)
    np.testing.assert_array_equal(one["y"], values[:, 0])


def test_written_predictions_and_logged_accuracy_share_one_threshold_rule() -> None:
    from mtl_lightning.metrics import build_metrics, metric_inputs, metric_update

    spec = TaskSpec("buy", "binary")
    logits = torch.tensor([-1.0, 0.0, 2.0])  # p = 0.27, 0.5 exactly, 0.88
    labels = torch.tensor([0.0, 0.0, 1.0])
    collection = build_metrics(spec, "val")
    metric_update(collection, spec, *metric_inputs(spec, logits, labels))
    written = pw.task_columns(spec, logits.sigmoid().numpy(), 0.5)["buy_pred"]
    assert float(collection.compute()["val/buy/accuracy"]) == float((written == labels.numpy()).mean()) == 1.0
    multi = pw.task_columns(TaskSpec("tags", "multilabel", num_outputs=2), np.array([[0.5, 0.51]]), 0.5)
    assert (multi["tags_pred_0"][0], multi["tags_pred_1"][0]) == (0, 1)


def test_format_comes_from_the_suffix_or_the_argument() -> None:
    assert pw.infer_format(Path("a.CSV"), None) == "csv"
    assert pw.infer_format(Path("a.pq"), None) == "parquet"
    assert pw.infer_format(Path("a.txt"), "parquet") == "parquet"
    with pytest.raises(PredictionWriterError, match=r"suffix '.txt'.*csv.*parquet"):
        pw.infer_format(Path("a.txt"), None)
    with pytest.raises(PredictionWriterError, match="unknown prediction format 'json'"):
        PredictionWriter("a.csv", format="json")
    with pytest.raises(PredictionWriterError, match="threshold"):
        PredictionWriter("a.csv", threshold=1.5)


def test_parquet_without_pyarrow_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pw.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PredictionWriterError, match=r'pip install "mtl_lightning\[parquet\]"'):
        pw.check_parquet()


def test_unwritable_or_existing_output_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        pw.check_writable(blocker / "sub" / "p.csv", overwrite=False)
    with pytest.raises(OutputPathError, match=r"already exists.*overwrite: true"):
        pw.check_writable(blocker, overwrite=False)
    with pytest.raises(OutputPathError, match="is a directory"):
        pw.check_writable(tmp_path, overwrite=True)
    pw.check_writable(blocker, overwrite=True)
    pw.check_writable(tmp_path / "new" / "deeper" / "p.csv", overwrite=False)  # folders are created
    assert (tmp_path / "new" / "deeper").is_dir()
    assert not list((tmp_path / "new" / "deeper").iterdir())  # the probe file is gone


def test_merged_parts_keep_each_key_once_in_order() -> None:
    # What rank 0 does with the parts: DistributedSampler-style padding repeats rows; per-task keys sort by task order.
    model = type("M", (), {"tasks": {"b": None, "a": None}})()
    parts = pd.DataFrame({"task": ["a", "b", "a", "b", "b"], "id": [1, 0, 0, 1, 0], "v": [3.0, 0.0, 2.0, 1.0, 0.0]})
    merged = pw._finish(parts, model)  # type: ignore[arg-type]
    assert merged[["task", "id"]].values.tolist() == [["b", 0], ["b", 1], ["a", 0], ["a", 1]]
    assert merged["v"].tolist() == [0.0, 1.0, 2.0, 3.0]
    plain = pw._finish(pd.DataFrame({"id": [2, 0, 1, 0], "v": [2.0, 0.0, 1.0, 0.0]}), model)  # type: ignore[arg-type]
    assert plain["id"].tolist() == [0, 1, 2] and plain["v"].tolist() == [0.0, 1.0, 2.0]


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_writes_every_row_once_with_the_model_predictions(ckpt: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "out" / f"predictions{suffix}"
    cli = _predict(ckpt, out, tmp_path)
    frame = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert frame["id"].tolist() == list(range(PREDICT_ROWS))
    expected = ["id", "purchase_prob", "purchase_pred", *[f"segment_prob_{k}" for k in range(4)], "segment_pred"]
    assert list(frame.columns) == [*expected, "spend"]
    ref = _reference(cli.model, cli.datamodule.datasets["predict"].inputs[frame["id"].to_numpy()])
    np.testing.assert_allclose(frame["purchase_prob"], ref["purchase"], atol=1e-6)
    np.testing.assert_array_equal(frame["purchase_pred"], (ref["purchase"] >= 0.5).astype(int))
    seg = frame[[f"segment_prob_{k}" for k in range(4)]].to_numpy()
    np.testing.assert_allclose(seg, ref["segment"], atol=1e-6)
    np.testing.assert_array_equal(frame["segment_pred"], ref["segment"].argmax(1))
    np.testing.assert_allclose(frame["spend"], ref["spend"], atol=1e-6)


def test_existing_file_is_refused_before_predicting(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    calls: list[int] = []
    original = MultiTaskModule.predict_step
    monkeypatch.setattr(MultiTaskModule, "predict_step", lambda self, *a, **k: calls.append(1) or original(self, *a))
    with pytest.raises(OutputPathError, match="already exists"):
        _predict(ckpt, out, tmp_path)
    assert not calls and out.read_text() == "keep me"
    _predict(ckpt, out, tmp_path / "again", "--trainer.callbacks.overwrite", "true")
    assert calls and len(pd.read_csv(out)) == PREDICT_ROWS


def test_default_output_goes_to_the_root_dir(ckpt: Path, tmp_path: Path) -> None:
    args = ["predict", "--config", str(QUICKSTART), *DATA, "--ckpt_path", str(ckpt), *QUIET]
    run_cli([*args, "--trainer.callbacks+", WRITER], tmp_path)
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == PREDICT_ROWS


def test_tabular_rows_and_class_names_join_back_to_the_file(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    args = [
        "predict",
        "--config",
        str(QUICKSTART),
        "--data",
        str(CONFIGS / "data" / "tabular_example.yaml"),
        *UNTRAINED,
    ]
    cli = run_cli([*args, "--trainer.callbacks+", WRITER, "--trainer.callbacks.output_path", str(out)], tmp_path)
    frame = pd.read_csv(out)
    dm = cli.datamodule
    np.testing.assert_array_equal(frame["source_row"], dm.split_rows["test"][frame["id"].to_numpy()])
    names = np.asarray(dm.class_names["plan"])
    np.testing.assert_array_equal(frame["plan_label"], names[frame["plan_pred"].to_numpy()])


def test_per_task_data_names_the_task_of_each_row(tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    data = ["--data", str(CONFIGS / "data" / "per_task_example.yaml"), "--data.init_args.eval_batch_size", "64"]
    args = ["predict", "--config", str(QUICKSTART), *data, *UNTRAINED]
    cli = run_cli([*args, "--trainer.callbacks+", WRITER, "--trainer.callbacks.output_path", str(out)], tmp_path)
    frame = pd.read_csv(out)
    sizes = cli.datamodule.datasets["predict"].sizes
    assert list(dict.fromkeys(frame["task"])) == list(sizes)  # in task order
    for task, n in sizes.items():
        assert frame.loc[frame["task"] == task, "id"].tolist() == list(range(n))
    rows = frame[frame["task"] == "spend"]
    x, _ = task_rows(cli.datamodule.datasets["predict"].datasets["spend"], "spend", torch.as_tensor(rows["id"].values))
    np.testing.assert_allclose(rows["spend"], _reference(cli.model, x)["spend"], atol=1e-6)


@pytest.mark.slow  # two processes started from scratch: ~30 s on 2 CPU cores
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_predict_writes_the_single_process_file(ckpt: Path, tmp_path: Path) -> None:
    from test_distributed import _mtl  # the CLI in a subprocess with a clean launcher environment

    single, ddp = tmp_path / "single.csv", tmp_path / "ddp" / "p.csv"
    _predict(ckpt, single, tmp_path / "one")
    args = ["predict", "--config", str(QUICKSTART), *DATA, "--ckpt_path", str(ckpt), *QUIET]
    args += ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    _mtl([*args, "--trainer.callbacks+", WRITER, "--trainer.callbacks.output_path", str(ddp)])
    one, two = pd.read_csv(single), pd.read_csv(ddp)
    assert two["id"].tolist() == list(range(PREDICT_ROWS))  # N unique ids, sorted: none lost, none twice
    assert list(two.columns) == list(one.columns)
    np.testing.assert_allclose(two.to_numpy(dtype=float), one.to_numpy(dtype=float), rtol=0, atol=1e-6)
    assert [p.name for p in ddp.parent.iterdir()] == ["p.csv"]  # the rank parts are removed
