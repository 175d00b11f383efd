"""``mtl export --format triton``: Triton's repository layout, a config.pbtxt whose whole structure matches the ONNX
graph (parsed strictly here, since Triton does not run on this machine), a model.onnx that runs a full batch, and
one clear error for bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import QUICKSTART, run_cli

from mtl_lightning import export as ex
from mtl_lightning import export_triton as tr
from mtl_lightning.errors import ConfigError

onnx = pytest.importorskip("onnx", reason="the Triton export needs onnx (pip install mtl_lightning[export])")
ort = pytest.importorskip("onnxruntime", reason="the checks run model.onnx (pip install mtl_lightning[export])")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", str(QUICKSTART), "--data.init_args.num_samples", "600", "--trainer.max_steps", "3"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    cli = run_cli([*args, "--trainer.logger.init_args.save_dir", str(root / "runs")], root)
    return Path(cli.trainer.checkpoint_callback.last_model_path)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- a strict pbtxt reader
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<tok>"(?:[^"\\]|\\.)*"|-?\d+|[A-Za-z_][A-Za-z0-9_]*|[{}\[\]:,])')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match is not None, f"unexpected text at {pos}: {text[pos : pos + 20]!r}"
        if match.group("tok"):
            out.append(match.group("tok"))
        pos = match.end()
    return out


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format as nested dicts: ``{...}`` a dict, ``[...]`` a list, strings unquoted, numbers as int,
    enum names as str. Strict: a field given twice, a missing ``:`` before a scalar or a stray token fails."""
    tokens = _tokens(text)
    pos = 0

    def peek() -> str:
        assert pos < len(tokens), "unexpected end of config"
        return tokens[pos]

    def take(expected: str | None = None) -> str:
        nonlocal pos
        assert pos < len(tokens), "unexpected end of config"
        token = tokens[pos]
        assert expected is None or token == expected, f"expected {expected!r}, got {token!r} (token {pos})"
        pos += 1
        return token

    def scalar(token: str) -> Any:
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", token), f"not a scalar: {token!r}"
        return token  # an enum value

    def value() -> Any:
        token = take()
        if token == "{":
            return message("}")
        if token == "[":
            items: list[Any] = []
            while peek() != "]":
                items.append(value())
                if peek() == ",":
                    take(",")
            take("]")
            return items
        return scalar(token)

    def message(end: str | None) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        while (pos < len(tokens)) if end is None else peek() != end:
            name = take()
            assert re.fullmatch(r"[a-z_]+", name), f"not a field name: {name!r}"
            assert name not in fields, f"field {name!r} given twice"
            if peek() in "{[":  # a message (or a list of them) may omit the colon; scalars may not
                fields[name] = value()
                items = fields[name] if isinstance(fields[name], list) else [fields[name]]
                assert all(isinstance(i, dict) for i in items), f"{name!r}: scalars need a colon"
            else:
                take(":")
                fields[name] = value()
        if end is not None:
            take(end)
        return fields

    return message(None)


def test_the_strict_reader_refuses_what_protobuf_would() -> None:
    assert parse_pbtxt('a: 1 b { c: [ 1, 2 ] } # note\nd: "x" e: TYPE_FP32') == {
        "a": 1,
        "b": {"c": [1, 2]},
        "d": "x",
        "e": "TYPE_FP32",
    }
    assert parse_pbtxt("m [ { a: 1 }, { a: 2 } ] n { }") == {"m": [{"a": 1}, {"a": 2}], "n": {}}
    for bad in ("a: 1 a: 2", "a 1", "a [ 1 ]", "a: [ 1, 2", "a: {", "a: }"):
        with pytest.raises(AssertionError):
            parse_pbtxt(bad)


# ------------------------------------------------------------------------------------------- the export
def _onnx_tensors(path: Path) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]:
    """(name, element type name, shape with the symbolic batch dim as a str) of the graph's inputs and outputs."""
    graph = onnx.load(str(path)).graph

    def info(v: Any) -> tuple[str, str, list[Any]]:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims

    return [info(v) for v in graph.input], [info(v) for v in graph.output]


def _expected_entry(name: str, element: str, shape: list[Any]) -> dict[str, Any]:
    assert isinstance(shape[0], str), "the ONNX batch dimension must be symbolic"
    entry: dict[str, Any] = {"name": name, "data_type": {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}[element]}
    if len(shape) == 1:  # (batch,): Triton's dims [1] with an empty reshape
        return {**entry, "dims": [1], "reshape": {"shape": []}}
    return {**entry, "dims": shape[1:]}


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    assert ex.main(["--ckpt_path", str(ckpt), "--format", "triton", "--output", str(out), *extra]) == 0
    return out


def test_repository_layout_and_the_whole_config_follow_the_onnx_graph(ckpt: Path, tmp_path: Path) -> None:
    repo = _export(ckpt, tmp_path / "repo")
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "mtl_model",
        "mtl_model/1",
        "mtl_model/1/model.onnx",
        "mtl_model/config.pbtxt",
    ]
    config = parse_pbtxt((repo / "mtl_model" / "config.pbtxt").read_text())
    inputs, outputs = _onnx_tensors(repo / "mtl_model" / "1" / "model.onnx")
    model = ex.load_model(str(ckpt))
    assert [o[0] for o in outputs] == model.task_names and [i[0] for i in inputs] == ["inputs"]
    assert config == {
        "name": "mtl_model",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 64,
        "input": [_expected_entry(*i) for i in inputs],
        "output": [_expected_entry(*o) for o in outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": 100},
    }
    # The quickstart: 64 features; purchase (binary) and spend (regression) one number a row, segment 4 classes.
    assert config["input"][0]["dims"] == [64]
    assert [(o["name"], o["dims"], "reshape" in o) for o in config["output"]] == [
        ("purchase", [1], True),
        ("segment", [4], False),
        ("spend", [1], True),
    ]

    # model.onnx takes a full batch (max_batch_size rows) and gives each task the shape the config promises.
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(repo / "mtl_model" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"inputs": x.numpy()}), strict=True))
    with torch.no_grad():
        want = model.predict_step({"inputs": x}, 0)
    for entry in config["output"]:
        shape = [] if "reshape" in entry else entry["dims"]
        assert list(got[entry["name"]].shape) == [64, *shape]
        torch.testing.assert_close(torch.from_numpy(got[entry["name"]]), want[entry["name"]], atol=1e-5, rtol=1e-5)


def test_options_reach_the_config(ckpt: Path, tmp_path: Path) -> None:
    repo = _export(
        ckpt, tmp_path / "repo", "--model_name", "churn-v2", "--max_batch_size", "8", "--max_queue_delay_us", "0"
    )
    config = parse_pbtxt((repo / "churn-v2" / "config.pbtxt").read_text())
    assert (config["name"], config["max_batch_size"], config["dynamic_batching"]) == (
        "churn-v2",
        8,
        {"max_queue_delay_microseconds": 0},
    )
    assert (repo / "churn-v2" / "1" / "model.onnx").is_file()


def _tritons_model_config() -> Any:
    """Triton's generated ``model_config_pb2`` from an installed ``tritonclient``, or skip.

    Loaded from its file: importing ``tritonclient.grpc`` needs the ``[grpc]`` extra, which pins protobuf below the
    release installed here, while the generated module itself loads with it.
    """
    import importlib.util

    spec = importlib.util.find_spec("tritonclient")
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec is not None else None
    path = folder / "grpc" / "model_config_pb2.py" if folder is not None else None
    if path is None or not path.is_file():
        pytest.skip("Triton's ModelConfig proto comes with tritonclient (pip install tritonclient)")
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_config_parses_as_tritons_model_config(ckpt: Path, tmp_path: Path) -> None:
    from google.protobuf import json_format, text_format

    model_config = _tritons_model_config()

    repo = _export(ckpt, tmp_path / "repo")
    text = (repo / "mtl_model" / "config.pbtxt").read_text()
    parsed = text_format.Parse(text, model_config.ModelConfig())  # unknown fields or bad enums raise
    assert [o.name for o in parsed.output] == ["purchase", "segment", "spend"]
    assert json_format.MessageToDict(parsed)["dynamicBatching"] == {"maxQueueDelayMicroseconds": "100"}


def test_token_ids_are_int64_and_dims_come_from_the_graph(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("inputs", TensorProto.INT64, ["batch", 12])
    out = helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["batch", 12, 5])
    node = helper.make_node("Identity", ["inputs"], ["tags"])  # shapes are what is read here, not the op
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [ids], [out])), str(path))
    inputs, outputs = tr.graph_tensors(path)
    assert inputs == [tr.TensorConfig("inputs", "TYPE_INT64", (12,))]
    assert outputs == [tr.TensorConfig("tags", "TYPE_FP32", (12, 5))]
    text = tr.config_text("m", inputs, outputs, max_batch_size=4, max_queue_delay_us=50)
    assert parse_pbtxt(text)["input"] == [{"name": "inputs", "data_type": "TYPE_INT64", "dims": [12]}]

    fixed = helper.make_tensor_value_info("inputs", TensorProto.FLOAT, [4, 12])
    onnx.save(helper.make_model(helper.make_graph([node], "g", [fixed], [out])), str(path))
    with pytest.raises(ConfigError, match="no dynamic batch dimension"):
        tr.graph_tensors(path)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max_batch_size must be >= 1, got 0"):
        _export(ckpt, tmp_path / "zero", "--max_batch_size", "0")
    with pytest.raises(ConfigError, match="--max_queue_delay_us must be >= 0"):
        _export(ckpt, tmp_path / "delay", "--max_queue_delay_us", "-1")
    with pytest.raises(ConfigError, match="--model_name 'a/b' is not a folder name"):
        _export(ckpt, tmp_path / "name", "--model_name", "a/b")
    with pytest.raises(ConfigError, match="--max_batch_size applies to --format triton only"):
        ex.main(
            [
                "--ckpt_path",
                str(ckpt),
                "--format",
                "onnx",
                "--output",
                str(tmp_path / "m.onnx"),
                "--max_batch_size",
                "8",
            ]
        )
    with pytest.raises(ConfigError, match="looks like a file"):
        _export(ckpt, tmp_path / "model.onnx")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("zero", "delay", "name"))


def test_an_existing_model_folder_needs_overwrite(ckpt: Path, tmp_path: Path) -> None:
    repo = _export(ckpt, tmp_path / "repo")
    other = repo / "other_model" / "config.pbtxt"  # another model of the same repository
    other.parent.mkdir()
    other.write_text('name: "other_model"\n')
    config = repo / "mtl_model" / "config.pbtxt"
    config.write_text("stale")
    with pytest.raises(ConfigError, match=r"mtl_model' already exists; pass --overwrite"):
        _export(ckpt, repo)
    assert config.read_text() == "stale"
    _export(ckpt, repo, "--overwrite", "--max_batch_size", "16")
    assert parse_pbtxt(config.read_text())["max_batch_size"] == 16
    assert other.read_text() == 'name: "other_model"\n'  # only this export's folder is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
