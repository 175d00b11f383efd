"""``mtl serve`` without a server: the input schema saved with a table-fed model encodes records exactly as the data
module encoded its table, the answers hold the numbers ``mtl predict`` writes, bad requests get a 4xx naming the
problem, and a reload is refused for a model with other tasks or another input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUICKSTART, REPO, fit_quickstart, run_cli

from mtl_lightning.data import TabularDataModule
from mtl_lightning.input_schema import CHECKPOINT_KEY, InputSchema, RecordError
from mtl_lightning.serve.models import ServeError, incompatibility, load_served_model
from mtl_lightning.serve.payloads import Invalid, Rows, answer, decode
from mtl_lightning.serve.state import ModelState

pytest.importorskip("litserve", reason='mtl serve needs LitServe: pip install "mtl_lightning[serve]"')

TABLE = REPO / "mtl_lightning" / "data" / "examples" / "customers.csv"
TABULAR = REPO / "configs" / "data" / "tabular_example.yaml"
TARGETS = ["churned", "plan", "lifetime_value"]


@pytest.fixture(scope="module")
def table_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_quickstart(tmp_path_factory.mktemp("table"), "--data", str(TABULAR))


@pytest.fixture(scope="module")
def other_seed_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_quickstart(tmp_path_factory.mktemp("table7"), "--data", str(TABULAR), "--seed_everything", "7")


@pytest.fixture(scope="module")
def tensor_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_quickstart(tmp_path_factory.mktemp("tensor"), "--data.init_args.num_samples", "600")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a JSON client sends them: null for an empty cell."""
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{str(k): v for k, v in row.items()} for row in rows]


def _table(tmp_path: Path) -> Path:
    """A table with what encoding must get right: missing numbers and categories, a category unseen in training,
    a whole-number float written like an integer in another row, a bool column."""
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame(
        {
            "age": rng.normal(40, 10, n).round(1),
            "visits": rng.integers(0, 20, n).astype(float),
            "region": rng.choice(["north", "south", "east"], n),
            "tier": rng.choice([1.0, 2.0, 3.0], n),
            "member": rng.choice([True, False], n),
            "y": rng.integers(0, 2, n),
        }
    )
    frame.loc[::7, "age"] = np.nan
    frame.loc[::11, "region"] = None
    frame.loc[n - 5 :, "region"] = "west"  # only in the last rows: unseen by training unless split there
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------------------ the schema
def test_schema_encodes_records_exactly_as_the_data_module_encoded_the_table(tmp_path: Path) -> None:
    path = _table(tmp_path)
    dm = TabularDataModule(
        path=str(path), categorical=["region", "tier"], tasks=[{"name": "y", "kind": "binary"}], seed=3
    )
    dm.setup("fit")
    schema = dm.input_schema
    assert schema is not None and schema.column_names == ["age", "visits", "region", "tier", "member"]
    assert schema.num_inputs == dm.input_shape[0]
    raw = pd.read_csv(path)
    for split in ("train", "val", "test"):
        frame = raw.iloc[dm.split_rows[split]].drop(columns=["y"])
        want = dm._loaded[split].inputs.numpy()  # type: ignore[index]
        np.testing.assert_array_equal(schema.encode(_records(frame)), want)
    # a whole float category given as an integer, a string number for a numeric column: as training read them
    (row,) = _records(raw.drop(columns=["y"]).iloc[[1]])  # row 0 has a missing age
    assert np.array_equal(schema.encode([{**row, "tier": int(row["tier"])}]), schema.encode([row]))
    assert np.array_equal(schema.encode([{**row, "age": str(row["age"])}]), schema.encode([row]))
    unseen = schema.encode([{**row, "region": "mars"}])
    width = {c.name: c.width for c in schema.columns}
    start = width["age"] + width["visits"]
    assert not unseen[0, start : start + width["region"]].any()  # the training rule: all zeros
    with pytest.raises(RecordError, match=r"'mars' is not a category seen in training; the known ones"):
        schema.encode([{**row, "region": "mars"}], strict_categories=True)


def test_schema_round_trips_through_plain_json(tmp_path: Path) -> None:
    dm = TabularDataModule(path=str(_table(tmp_path)), tasks=[{"name": "y", "kind": "binary"}])
    schema = dm.input_schema
    assert schema is not None
    assert InputSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_checkpoints_of_table_runs_carry_the_schema_and_tensor_runs_none(table_ckpt: Path, tensor_ckpt: Path) -> None:
    saved = torch.load(table_ckpt, weights_only=True)[CHECKPOINT_KEY]
    assert [c["name"] for c in saved["columns"]][:3] == ["age", "tenure_months", "monthly_visits"]
    assert saved["class_names"] == {"plan": ["basic", "plus", "premium"]}
    assert CHECKPOINT_KEY not in torch.load(tensor_ckpt, weights_only=True)


# ----------------------------------------------------------------------------------------------------- the answers
def test_answers_hold_what_mtl_predict_writes_for_the_same_rows(table_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    writer = json.dumps(
        {"class_path": "mtl_lightning.callbacks.PredictionWriter", "init_args": {"output_path": str(out)}}
    )
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    source = ["--config", str(QUICKSTART), "--data", str(TABULAR), "--ckpt_path", str(table_ckpt)]
    run_cli(["predict", *source, "--trainer.callbacks+", writer, *quiet], tmp_path)
    written = pd.read_csv(out)
    model = load_served_model(table_ckpt)
    tasks = list(model.tasks.values())  # the split of configs/data/tabular_example.yaml, whose predict split is test
    dm = TabularDataModule(path=str(TABLE), drop=["id"], val_fraction=0.15, test_fraction=0.15, tasks=tasks)
    rows = pd.read_csv(TABLE).iloc[dm.split_rows["test"]].drop(columns=["id", *TARGETS])
    assert model.schema is not None
    got = answer(model, model.predict(model.schema.encode(_records(rows))), threshold=0.5)
    assert list(got) == TARGETS and len(got["plan"]) == len(written) == len(rows)
    np.testing.assert_allclose([e["prob"] for e in got["churned"]], written["churned_prob"], rtol=1e-6)
    assert [e["pred"] for e in got["churned"]] == written["churned_pred"].tolist()
    probs = written[[f"plan_prob_{k}" for k in range(3)]].to_numpy()
    np.testing.assert_allclose([e["prob"] for e in got["plan"]], probs, rtol=1e-6)
    assert [e["label"] for e in got["plan"]] == written["plan_label"].tolist()
    assert [e["pred"] for e in got["plan"]] == written["plan_pred"].tolist()
    np.testing.assert_allclose([e["value"] for e in got["lifetime_value"]], written["lifetime_value"], rtol=1e-6)


def test_the_onnx_backend_answers_like_the_checkpoint(table_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mtl_lightning import export

    onnx_path = tmp_path / "m.onnx"
    assert export.main(["--ckpt_path", str(table_ckpt), "--output", str(onnx_path)]) == 0
    torch_model, onnx_model = load_served_model(table_ckpt), load_served_model(onnx_path)
    assert onnx_model.backend == "onnx" and onnx_model.schema == torch_model.schema
    assert incompatibility(torch_model.signature(), onnx_model.signature()) is None
    rows = _records(pd.read_csv(TABLE).drop(columns=["id", *TARGETS]).head(37))
    x = torch_model.schema.encode(rows)  # type: ignore[union-attr]
    one_thread = load_served_model(onnx_path, threads=1)  # one intra-op thread, no spinning: the same numbers
    for name, want in torch_model.predict(x).items():
        np.testing.assert_allclose(onnx_model.predict(x)[name], want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(one_thread.predict(x)[name], want, atol=1e-5, rtol=1e-5)


def test_several_checkpoints_serve_as_their_ensemble_averaging_the_members_predictions(
    table_ckpt: Path, other_seed_ckpt: Path, tmp_path: Path
) -> None:
    members = [load_served_model(table_ckpt), load_served_model(other_seed_ckpt)]
    ensemble = load_served_model([table_ckpt, other_seed_ckpt])
    assert ensemble.path == [str(table_ckpt), str(other_seed_ckpt)] and ensemble.sha256 not in {
        m.sha256 for m in members
    }
    assert incompatibility(members[0].signature(), ensemble.signature()) is None  # it may replace a member, and back
    x = members[0].schema.encode(_records(pd.read_csv(TABLE).drop(columns=["id", *TARGETS]).head(9)))  # type: ignore[union-attr]
    each = [m.predict(x) for m in members]
    for name, got in ensemble.predict(x).items():
        np.testing.assert_allclose(got, (each[0][name] + each[1][name]) / 2, rtol=1e-5, atol=1e-6)
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"")
    with pytest.raises(ServeError, match=r"an ensemble is served from its checkpoints \(.ckpt\)"):
        load_served_model([table_ckpt, onnx_path])


# ------------------------------------------------------------------------------------------------ bad requests
def _record() -> dict[str, Any]:
    return _records(pd.read_csv(TABLE).drop(columns=["id", *TARGETS]).head(1))[0]


BAD_REQUESTS = [
    ([1, 2], 400, "the body is a JSON array"),
    ({"rows": []}, 400, "unknown key(s) ['rows']"),
    ({"inputs": {"age": 1}}, 422, '"inputs" is a JSON object'),
    ({"inputs": []}, 422, '"inputs" is empty'),
    ({"inputs": [{"age": 41}]}, 422, "record 0 lacks the column(s) ['tenure_months'"),
    ({"inputs": [{**_record(), "colour": "red"}]}, 422, "has unknown column(s) ['colour']"),
    ({"inputs": [{**_record(), "age": "old"}]}, 422, "record 0, column 'age': 'old' is not a number"),
    ({"inputs": [{**_record(), "age": [1]}]}, 422, "column 'age': list is not a number"),
    ({"inputs": [{**_record(), "region": {"a": 1}}]}, 422, "column 'region': dict is not a category"),
    ({"inputs": [_record(), 3]}, 422, "record 1 is 'int', not an object {column: value}"),
    ({"inputs": [_record()] * 9}, 413, "9 rows in one request; the server takes at most 8"),
    ({"inputs": [[0.0] * 5]}, 422, "the inputs have shape (1, 5); the model takes ('N', 13)"),
    ({"inputs_npy": "not base64!"}, 422, '"inputs_npy" is not a base64-encoded .npy file'),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_status_and_a_message_naming_the_problem(
    table_ckpt: Path, body: Any, status: int, message: str
) -> None:
    model = load_served_model(table_ckpt)
    got = decode(body, model, max_rows=8)
    assert isinstance(got, Invalid)
    assert (got.status, message in got.message) == (status, True), got.message


def test_tensor_requests_as_lists_and_as_base64_npy(tensor_ckpt: Path) -> None:
    import base64
    import io

    model = load_served_model(tensor_ckpt)
    x = np.random.default_rng(0).normal(size=(3, *model.input_shape)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x)
    as_lists, as_npy = (
        decode({"inputs": x.tolist()}, model, 8),
        decode({"inputs_npy": base64.b64encode(buf.getvalue()).decode()}, model, 8),
    )
    assert isinstance(as_lists, Rows) and isinstance(as_npy, Rows)
    np.testing.assert_array_equal(as_lists.inputs, x)
    np.testing.assert_array_equal(as_npy.inputs, x)
    refused = decode({"inputs": [{"a": 1}]}, model, 8)
    assert isinstance(refused, Invalid) and "not trained on a table with named columns" in refused.message
    bad = decode({"inputs": [[math.nan] * model.input_shape[0]]}, model, 8)
    assert isinstance(bad, Invalid) and "NaN or infinite" in bad.message


def test_token_ids_outside_the_vocabulary_are_refused_by_both_backends(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mtl_lightning import export

    ckpt = fit_quickstart(
        tmp_path / "seq",
        "--data", str(REPO / "configs" / "data" / "sequences.yaml"),
        "--model", str(REPO / "configs" / "model" / "transformer.yaml"),
        "--data.init_args.num_samples", "300",
    )  # fmt: skip
    onnx_path = tmp_path / "seq.onnx"
    assert export.main(["--ckpt_path", str(ckpt), "--output", str(onnx_path)]) == 0
    for model in (load_served_model(ckpt), load_served_model(onnx_path)):
        vocab = model.vocab_size
        assert vocab is not None and model.describe()["input"]["tensor"]["vocab_size"] == vocab, model.backend
        ids = np.zeros((2, *model.input_shape), dtype=np.int64)
        assert isinstance(decode({"inputs": ids.tolist()}, model, 8), Rows)
        ids[1, 3] = vocab
        refused = decode({"inputs": ids.tolist()}, model, 8)
        assert isinstance(refused, Invalid) and refused.status == 422, model.backend
        assert f"token id {vocab} is out of the vocabulary: ids must lie in [0, {vocab})" in refused.message


# ---------------------------------------------------------------------------------------------------- reloads
def test_a_reload_is_refused_for_other_tasks_or_input_and_changes_nothing(
    table_ckpt: Path, tensor_ckpt: Path, tmp_path: Path
) -> None:
    state = ModelState(tmp_path)
    first = state.publish(load_served_model(table_ckpt))
    assert first["version"] == 1
    with pytest.raises(ServeError, match=r"refused to reload .*: its tasks .* differ from the served model's"):
        state.reload(str(tensor_ckpt))
    assert state.read() == first
    with pytest.raises(ServeError, match="does not exist"):
        state.reload(str(tmp_path / "missing.ckpt"))
    assert state.reload()["version"] == 2  # the same file again: a new version


def test_a_retrained_model_with_other_statistics_may_replace_the_served_one(table_ckpt: Path) -> None:
    model = load_served_model(table_ckpt)
    served = model.signature()
    assert served["columns"][0] == ["age", "numeric"]
    assert model.schema is not None
    shifted = [dataclasses.replace(c, mean=c.mean + 1.0, std=c.std * 2) for c in model.schema.columns]
    retrained = dataclasses.replace(model, schema=dataclasses.replace(model.schema, columns=tuple(shifted)))
    assert retrained.signature() == served and incompatibility(served, retrained.signature()) is None
    fewer = {**served, "columns": served["columns"][1:]}
    assert "input columns" in str(incompatibility(served, fewer))
    renamed = {**served, "tasks": [["churn", "binary", 1], *served["tasks"][1:]]}
    assert "tasks" in str(incompatibility(served, renamed))


def test_a_model_file_that_cannot_be_served_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="does not exist"):
        load_served_model(tmp_path / "nope.ckpt")
    with pytest.raises(ServeError, match="unknown backend"):
        load_served_model(tmp_path / "nope.ckpt", backend="tf")
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not onnx")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ServeError, match=r"could not load .* as an ONNX model"):
        load_served_model(bad)
