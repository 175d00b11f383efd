"""``mtl serve`` as a user runs it: a server process on a loopback port, spoken to over HTTP.

The answers are the in-process model's, bad requests mixed with good ones each get their own answer, a reload
swaps the model without a failed request (and an incompatible one is refused while the old model keeps serving),
``--watch`` picks up a rewritten file, and the ONNX backend answers as the checkpoint does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, fit_quickstart, subprocess_env

pytest.importorskip("litserve", reason='mtl serve needs LitServe: pip install "mtl_lightning[serve]"')
httpx = pytest.importorskip("httpx")

from mtl_lightning.serve.models import load_served_model  # noqa: E402
from mtl_lightning.serve.payloads import answer  # noqa: E402

pytestmark = pytest.mark.integration

TABLE = REPO / "mtl_lightning" / "data" / "examples" / "customers.csv"
TABULAR = REPO / "configs" / "data" / "tabular_example.yaml"
TARGETS = ["churned", "plan", "lifetime_value"]
STARTUP_S = 120.0


def _records(n: int, start: int = 0) -> list[dict[str, Any]]:
    frame = pd.read_csv(TABLE).drop(columns=["id", *TARGETS]).iloc[start : start + n]
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{str(k): v for k, v in row.items()} for row in rows]


def _expected(path: Path, records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """What the server should answer: the model loaded in this process, on the same records."""
    model = load_served_model(path)
    assert model.schema is not None
    return answer(model, model.predict(model.schema.encode(records)), threshold=0.5)


def _assert_same(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> None:
    assert list(got) == list(want)
    for task, entries in want.items():
        assert len(got[task]) == len(entries)
        for g, w in zip(got[task], entries, strict=True):
            assert g.keys() == w.keys()
            for key, value in w.items():
                if isinstance(value, str) or key == "pred":
                    assert g[key] == value, (task, key)
                else:
                    np.testing.assert_allclose(g[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{task}.{key}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(*args: str) -> Iterator[httpx.Client]:
    """``mtl serve ARGS --port P`` in a child process (its own process group); a client once /health is 200."""
    port = _free_port()
    log = (Path(os.environ.get("TMPDIR", "/tmp")) / f"mtl-serve-{port}.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_lightning", "serve", *args, "--port", str(port), "--log_level", "warning"],
        cwd=REPO,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"mtl serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mtl serve was not healthy within {STARTUP_S} s")
            time.sleep(0.25)
        yield client
    finally:
        client.close()
        # SIGTERM to the main process alone (as kill, systemd or Kubernetes send it) must stop every process of the
        # server: LitServe's HTTP and worker processes too, or they would keep serving on the port
        left = _stop(proc)
        log.close()
    assert not left, f"SIGTERM to mtl serve left {left} of its processes running"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM the server's main process; how many of its group were still alive after 30 s (then killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.poll()  # reap the main process, or it counts as alive
        if not _group_alive(proc.pid):
            return 0
        time.sleep(0.2)
    left = sum(
        1
        for line in subprocess.run(["ps", "-eo", "pgid"], capture_output=True, text=True).stdout.split()
        if line.strip() == str(proc.pid)
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return left


def _predict(client: httpx.Client, records: list[dict[str, Any]]) -> httpx.Response:
    return client.post("/predict", json={"inputs": records})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two table models with the same tasks and columns (other seeds) and a tensor model (other tasks' input)."""
    root = tmp_path_factory.mktemp("serve_http")
    return {
        "table": fit_quickstart(root / "a", "--data", str(TABULAR)),
        "retrained": fit_quickstart(root / "b", "--data", str(TABULAR), "--seed_everything", "7"),
        "tensor": fit_quickstart(root / "c", "--data.init_args.num_samples", "600"),
    }


def test_a_server_answers_bad_and_good_requests_each_on_its_own_and_reloads_without_a_failed_request(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    served = tmp_path / "served.ckpt"
    shutil.copy(checkpoints["table"], served)
    records = _records(5)
    with serving("--ckpt_path", str(served), "--max_rows", "64", "--watch", "--watch_interval", "0.3") as client:
        # /info: tasks, kinds, class names, the columns a record must have, the version
        info = client.get("/info").json()
        model = info["model"]
        assert [(t["name"], t["kind"]) for t in model["tasks"]] == [
            ("churned", "binary"),
            ("plan", "multiclass"),
            ("lifetime_value", "regression"),
        ]
        assert model["tasks"][1]["class_names"] == ["basic", "plus", "premium"]
        assert [c["name"] for c in model["input"]["records"]["columns"]] == list(records[0])
        assert (model["version"], model["backend"], info["server"]["max_rows_per_request"]) == (1, "torch", 64)

        # /predict: the in-process model's answers; `curl -d` (a form content type) is read as JSON too
        response = _predict(client, records)
        assert response.status_code == 200 and response.headers["x-model-version"] == "1"
        assert int(response.headers["x-batch-rows"]) >= len(records)  # the model call that answered held them
        _assert_same(response.json(), _expected(served, records))
        form = client.post(
            "/predict", content=f'{{"inputs": [{json.dumps(records[0])}]}}', headers={"content-type": ""}
        )
        assert form.status_code == 200, form.text

        # bad requests among good ones, sent at once so that they share batches: each gets its own answer
        bad = [
            (b"{not json", 400, "not JSON"),
            (b"", 400, "the request body is empty"),
            ({"inputs": []}, 422, '"inputs" is empty'),
            ({"inputs": [{**records[0], "colour": "red"}]}, 422, "unknown column(s) ['colour']"),
            ({"inputs": [{"age": 41}]}, 422, "lacks the column(s)"),
            ({"inputs": [{**records[0], "age": "old"}]}, 422, "'old' is not a number"),
            ({"inputs": records * 13}, 413, "65 rows in one request; the server takes at most 64"),
            ({"inputs": [[0.0] * 5]}, 422, "the inputs have shape (1, 5); the model takes ('N', 13)"),
        ]

        def send(item: Any) -> httpx.Response:
            if isinstance(item, bytes):
                return client.post("/predict", content=item, headers={"content-type": "application/json"})
            return client.post("/predict", json=item)

        mixed: list[Any] = []
        for body, _, _ in bad:
            mixed += [body, {"inputs": records[:2]}]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, mixed))
        want = _expected(served, records[:2])
        for (_, status, message), refused, good in zip(bad, answers[::2], answers[1::2], strict=True):
            assert refused.status_code == status and message in refused.json()["error"], refused.text
            assert good.status_code == 200
            _assert_same(good.json(), want)

        # an incompatible model is refused (409) and the served one keeps serving
        refused = client.post("/reload", json={"path": str(checkpoints["tensor"])})
        assert refused.status_code == 409 and "its tasks" in refused.json()["error"]
        assert client.post("/reload", json={"path": str(tmp_path / "missing.ckpt")}).status_code == 409
        assert client.post("/reload", json={"file": "x"}).status_code == 400
        assert client.get("/info").json()["model"]["version"] == 1
        _assert_same(_predict(client, records).json(), _expected(served, records))

        # a compatible model swaps in while requests keep coming: none fails, and after the reload's answer every
        # request is served by the new model
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                statuses.append(_predict(client, records[:1]).status_code)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            reloaded = client.post("/reload", json={"path": str(checkpoints["retrained"])})
            after = _predict(client, records)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert reloaded.status_code == 200 and reloaded.json()["version"] == 2, reloaded.text
        old_probs = [e["prob"] for e in _expected(served, records)["churned"]]
        assert not np.allclose([e["prob"] for e in after.json()["churned"]], old_probs)  # another model answers
        assert after.status_code == 200 and after.headers["x-model-version"] == "2"
        _assert_same(after.json(), _expected(checkpoints["retrained"], records))
        assert len(statuses) > 4 and set(statuses) == {200}, statuses
        assert client.get("/info").json()["model"]["path"] == str(checkpoints["retrained"])

        # --watch: the served file rewritten in place is reloaded as the next version
        watched = tmp_path / "watched.ckpt"
        shutil.copy(checkpoints["retrained"], watched)
        assert client.post("/reload", json={"path": str(watched)}).json()["version"] == 3
        time.sleep(0.5)  # a new mtime, whatever the file system's resolution
        shutil.copy(checkpoints["table"], watched)
        deadline = time.monotonic() + 30
        while client.get("/info").json()["model"]["version"] < 4:
            assert time.monotonic() < deadline, "--watch did not reload the rewritten file"
            time.sleep(0.2)
        _assert_same(_predict(client, records).json(), _expected(checkpoints["table"], records))

        # an ensemble of both checkpoints: the mean of their predictions
        members = [str(checkpoints["table"]), str(checkpoints["retrained"])]
        assert client.post("/reload", json={"path": members}).json()["version"] == 5
        got = [e["prob"] for e in _predict(client, records).json()["churned"]]
        each = [[e["prob"] for e in _expected(Path(m), records)["churned"]] for m in members]
        np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-5)
        assert client.get("/info").json()["model"]["path"] == members


def test_the_onnx_server_answers_as_the_checkpoint_does(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mtl_lightning import export

    onnx_path = tmp_path / "model.onnx"
    assert export.main(["--ckpt_path", str(checkpoints["table"]), "--output", str(onnx_path)]) == 0
    records = _records(40, start=100)
    with serving("--model", str(onnx_path), "--threads", "1") as client:
        info = client.get("/info").json()
        assert (info["model"]["backend"], info["server"]["threads"]) == ("onnx", 1)
        response = _predict(client, records)
        assert response.status_code == 200, response.text
        _assert_same(response.json(), _expected(checkpoints["table"], records))
