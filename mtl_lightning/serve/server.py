"""The ``mtl serve`` server: LitServe with ``/predict``, ``/health``, ``/info`` and ``/reload``, and a file watcher.

LitServe gives the HTTP front end, dynamic batching (``max_batch_size`` requests, waiting at most
``batch_timeout`` seconds for a batch to fill), inference worker processes and ``/health`` (200 once every worker
has loaded the model). This module adds what a multi-task model needs around it: ``GET /info`` (tasks, kinds, class
names, the input schema and the served version), ``POST /reload`` (hot reload, :mod:`mtl_lightning.serve.state`),
and a body check that answers a body that is not JSON with a 400 instead of LitServe's 500.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import litserve as ls
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mtl_lightning.serve.api import MultiTaskAPI
from mtl_lightning.serve.models import ServeError
from mtl_lightning.serve.state import ModelState

logger = logging.getLogger(__name__)
PREDICT_PATH = "/predict"


class JSONBody:
    """ASGI middleware for ``POST /predict``: a body that is not JSON gets a 400 naming the problem; a JSON body
    sent as a form (``curl -d`` sends ``application/x-www-form-urlencoded``) is passed on as JSON."""

    def __init__(self, app: ASGIApp, path: str = PREDICT_PATH) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            reason = "empty" if not body.strip() else f"not JSON ({err})"
            response = JSONResponse(
                {"error": f'the request body is {reason}; send a JSON object {{"inputs": [...]}}'}, status_code=400
            )
            await response(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def build_server(
    state: ModelState,
    api: MultiTaskAPI,
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    timeout: float = 30.0,
    fast_queue: bool = False,
) -> ls.LitServer:
    """A LitServer for ``api`` with the ``/info`` and ``/reload`` routes over ``state``."""
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        fast_queue=fast_queue,  # ZeroMQ instead of multiprocessing queues between the HTTP and worker processes
        info_path="/litserve/info",  # our /info describes the model; LitServe's stays here
        middlewares=[JSONBody],
    )
    settings = {
        "max_batch_size": api.max_batch_size,
        "batch_timeout_s": api.batch_timeout,
        "max_rows_per_request": api.max_rows,
        "workers_per_device": workers_per_device,
        "fast_queue": fast_queue,
        "threshold": api.threshold,
        "strict_categories": api.strict_categories,
        "threads": api.threads,
    }

    async def info(request: Request) -> JSONResponse:
        record = state.read()
        record.pop("signature", None)
        return JSONResponse({"model": record, "server": settings})

    async def reload(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return JSONResponse({"error": 'the body is not JSON; send {"path": "model.ckpt"} or nothing'}, 400)
        path = body.get("path") if isinstance(body, dict) else None
        paths_ok = isinstance(path, list) and bool(path) and all(isinstance(p, str) for p in path)
        if (
            not isinstance(body, dict)
            or set(body) - {"path"}
            or not (path is None or isinstance(path, str) or paths_ok)
        ):
            return JSONResponse(
                {
                    "error": 'send {"path": "FILE"} (a .ckpt or .onnx file; a list of .ckpt files: an ensemble), or no body'
                },
                400,
            )
        try:
            record = await run_in_threadpool(state.reload, path)
        except ServeError as err:
            return JSONResponse({"error": str(err)}, status_code=409)
        return JSONResponse({"version": record["version"], "path": record["path"], "sha256": record["sha256"]})

    server.app.add_api_route("/info", info, methods=["GET"])
    server.app.add_api_route("/reload", reload, methods=["POST"])
    return server


def watch(state: ModelState, interval: float, stop: threading.Event) -> threading.Thread:
    """Reload the served file (each member of a served ensemble) whenever it changes on disk (checked every
    ``interval`` seconds)."""

    def served() -> tuple[str, tuple[int, ...] | None]:
        path = state.read()["path"]  # a file, or an ensemble's checkpoints: a change of any member reloads
        try:
            return json.dumps(path), tuple(
                Path(p).stat().st_mtime_ns for p in ([path] if isinstance(path, str) else path)
            )
        except OSError:
            return json.dumps(path), None

    def loop() -> None:
        seen = served()
        while not stop.wait(interval):
            now = served()
            # another file served since (POST /reload): watch that one from now on, without reloading it again
            if now[0] != seen[0] or now[1] is None or now == seen:
                seen = now if now[1] is not None else seen
                continue
            seen = now
            try:
                record = state.reload()
                logger.warning("reloaded %s as version %s", record["path"], record["version"])
            except Exception as err:  # a refused or broken file: keep serving, say why
                logger.warning("%s", err)

    thread = threading.Thread(target=loop, name="mtl-serve-watch", daemon=True)
    thread.start()
    return thread
