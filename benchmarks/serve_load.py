"""``mtl serve`` under a bounded load on loopback: throughput, p50/p99 latency, errors, CPU and resident memory at
concurrency 1, 8 and 32 for the quickstart model on both backends, against the same ONNX file called in-process.

For each backend (``torch``: the checkpoint, ``onnx``: its ``mtl export``; in a seeded random order each round) the
script starts ``mtl serve`` on 127.0.0.1 on a free port, waits for ``/health`` to answer 200 and, for each
``--rows`` R and each concurrency C, keeps C requests of R rows in flight (C asyncio tasks, one keep-alive
connection each, speaking HTTP/1.1 over asyncio streams: little client CPU per request, so that the client takes
less of the shared cores from the server; ``--client httpx``: one ``httpx.AsyncClient``, whose CPU per request grows
with its connections, ~4.5 ms at 32 on 2 cores against ~0.3 ms) until ``--requests`` requests have been sent or ``--duration`` seconds
have passed, after a warm-up of ``max(2, ceil(20 / C))`` requests per connection, whose answers are checked
(a JSON object with R entries per task). Every request carries the same R
rows (Gaussian, the model's input width) as JSON lists (``--payload npy``: ``"inputs_npy"``, a base64 ``.npy``).
Recorded per level:

- latency of every request (send to full response) and throughput in requests/s and rows/s;
- errors: any status other than 200 or any transport error, warm-up included; the script exits 1 if there is one;
- rows per model call: the ``x-batch-rows`` header of each answer (the rows of the model call that answered it,
  i.e. what LitServe's dynamic batching formed), median over requests; without that header, the bound
  ``min(C, --max_batch_size) * R``;
- CPU seconds of the server's process tree and of this client, per request;
- resident memory (RSS, psutil) of the server's process tree at the start and end of the level and its maximum
  (sampled every 0.2 s); "flat" means end ~ start at every level and across levels. RSS summed over processes
  counts the pages the forked ones share with their parent several times; the PSS at the first level's start
  and the last level's end counts them once.

The ceiling: after the servers of a round have stopped (an idle LitServe worker still polls its queue), the same
ONNX file in an ``onnxruntime.InferenceSession`` in this process, with the default session options as ``mtl serve``
uses them, called on those rows tiled to each level's median rows per model call, for ``--ceiling_seconds``. The
ratio ``server / ceiling`` is the server's rows/s over the ceiling's rows/s at that batch size: what HTTP, JSON,
LitServe's queues between its processes and the batching wait cost on top of the model call. Client, server and
ceiling share this machine's cores, so the client's CPU is taken from the server's.

    python benchmarks/serve_load.py                          # 1 row per request, ~2 min on 2 CPU cores
    python benchmarks/serve_load.py --rows 1 16 --rounds 3   # and 16 rows; 3 rounds, medians [min, max]
    python benchmarks/serve_load.py --ckpt best.ckpt --onnx best.onnx --concurrency 1 8 32 64
    python benchmarks/serve_load.py --rows 1024 --payload npy --server_env OMP_NUM_THREADS=1   # big binary requests

Medians over ``--rounds`` rounds, with [min, max] when there are several; RSS columns are the last round's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import io
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
STARTUP_S = 180.0
BATCH_HEADER = "x-batch-rows"


@dataclass
class Level:
    """One backend at one concurrency and request size, in one round."""

    backend: str
    concurrency: int
    rows: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    rss_mb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # start, end, max
    pss_mb: tuple[float, float] = (0.0, 0.0)  # start, end
    formed: int = 0  # median rows per model call
    ceiling_rows_s: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    @property
    def req_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def rows_s(self) -> float:
        return self.req_s * self.rows

    @property
    def ratio(self) -> float:
        return self.rows_s / self.ceiling_rows_s if self.ceiling_rows_s else float("nan")


def _mtl(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mtl_lightning", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"mtl {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def model_files(folder: Path, ckpt: Path | None, onnx: Path | None) -> tuple[Path | None, Path]:
    """The quickstart model (trained here for one epoch unless ``ckpt`` is given) and its ONNX export."""
    if ckpt is None and onnx is not None:  # --backends onnx
        return None, onnx
    if ckpt is None:
        print("training the quickstart model (1 epoch) ...", file=sys.stderr)
        _mtl(
            "fit", "--config", str(QUICKSTART), "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(folder / "runs"), "--trainer.default_root_dir", str(folder),
        )  # fmt: skip
        ckpt = next((folder / "runs").rglob("last.ckpt"))
    if onnx is None:
        onnx = folder / "model.onnx"
        _mtl("export", "--ckpt_path", str(ckpt), "--output", str(onnx))
    return ckpt, onnx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``mtl serve`` in its own process group on a free loopback port, healthy when constructed."""

    def __init__(self, source: list[str], max_batch_size: int, batch_timeout: float, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed in stop(), after the server)
        args = [*source, "--host", "127.0.0.1", "--port", str(self.port), "--max_batch_size", str(max_batch_size)]
        args += ["--batch_timeout", str(batch_timeout), "--max_rows", "4096"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtl_lightning", "serve", *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mtl serve exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"mtl serve was not healthy within {STARTUP_S:.0f} s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total / 2**20

    def pss_mb(self) -> float:
        """Proportional set size: shared pages (the forked processes share the parent's torch) counted once."""
        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                total += p.memory_full_info().pss
        return total / 2**20

    def cpu_s(self) -> float:
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # a worker left behind by a server that died
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


class _RawHTTP:
    """One keep-alive HTTP/1.1 connection that posts the same body: the least client work per request, so that
    less of the shared cores goes to the client (``--client raw``)."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port = port
        self.request = (
            f"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> tuple[int, dict[str, str], bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        try:
            writer.write(self.request)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    chunks.append((await reader.readexactly(size + 2))[:-2])
                await reader.readuntil(b"\r\n")
                content = b"".join(chunks)
            else:
                content = await reader.readexactly(int(headers.get("content-length", 0)))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, headers, content
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def _answers(content: bytes, rows: int) -> bool:
    """Whether ``content`` is ``{task: [one entry per row]}`` for ``rows`` rows."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body) and all(isinstance(v, list) and len(v) == rows for v in body.values())


async def _load(server: Server, body: bytes, level: Level, args: argparse.Namespace) -> None:
    c = level.concurrency
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0) as client:
        sent, deadline = 0, 0.0

        async def one(raw: _RawHTTP | None, timed: bool) -> None:
            start = time.perf_counter()
            try:
                if raw is None:
                    response = await client.post("/predict", content=body, headers=headers)
                    status, got, content = response.status_code, response.headers, response.content
                else:
                    status, got, content = await asyncio.wait_for(raw.post(), 30.0)
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as err:
                level.errors[type(err).__name__] += 1
                return
            if status != 200:
                level.errors[f"HTTP {status}"] += 1
            elif not timed and not _answers(content, level.rows):
                level.errors["an answer without R entries per task"] += 1
            elif timed:
                level.latencies_ms.append((time.perf_counter() - start) * 1e3)
                level.batch_rows.append(int(got.get(BATCH_HEADER, 0)))

        async def worker(warmup: int) -> None:
            nonlocal sent, warm
            raw = _RawHTTP(server.port, body) if args.client == "raw" else None
            try:
                try:
                    for _ in range(warmup):  # connections opened, caches warm; errors count, latencies do not
                        await one(raw, False)
                finally:
                    warm += 1
                    if warm == c:
                        all_warm.set()
                await go.wait()
                while sent < args.requests and time.perf_counter() < deadline:
                    sent += 1
                    await one(raw, True)
            finally:
                if raw is not None:
                    await raw.close()

        warm, all_warm, go = 0, asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(worker(max(2, -(-20 // c)))) for _ in range(c)]
        await all_warm.wait()  # the timed window opens once every connection has done its warm-up
        start = time.perf_counter()
        deadline = start + args.duration
        go.set()
        await asyncio.gather(*tasks)
        level.seconds = time.perf_counter() - start


def measure(server: Server, level: Level, body: bytes, args: argparse.Namespace) -> None:
    pss0, samples = server.pss_mb(), [server.rss_mb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(server.rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0, own0 = server.cpu_s(), time.process_time()
    sampler.start()
    try:
        asyncio.run(_load(server, body, level, args))
    finally:
        stop.set()
        sampler.join()
    # the sampler's own psutil calls are part of this process's CPU time; small next to the client's
    level.server_cpu_s, level.client_cpu_s = server.cpu_s() - cpu0, time.process_time() - own0
    level.rss_mb = (samples[0], server.rss_mb(), max(samples))
    level.pss_mb = (pss0, server.pss_mb())
    bound = min(level.concurrency, args.max_batch_size) * level.rows
    seen = [b for b in level.batch_rows if b > 0]
    level.formed = int(statistics.median(seen)) if seen else bound


def request_body(rows: np.ndarray, payload: str) -> bytes:
    """``{"inputs": nested lists}`` (json) or ``{"inputs_npy": base64 of the .npy}`` (npy)."""
    if payload == "json":
        return json.dumps({"inputs": rows.tolist()}).encode()
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    return json.dumps({"inputs_npy": base64.b64encode(buffer.getvalue()).decode()}).encode()


def run_backend(backend: str, source: list[str], args: argparse.Namespace, rows: np.ndarray) -> list[Level]:
    print(f"  {backend}: starting mtl serve ...", file=sys.stderr)
    env = dict(item.split("=", 1) for item in args.server_env)
    server = Server(source, args.max_batch_size, args.batch_timeout, env)
    levels = []
    try:
        idle0, t0 = server.cpu_s(), time.perf_counter()
        time.sleep(1.0)
        idle = (server.cpu_s() - idle0) / (time.perf_counter() - t0)
        where = f"{server.url} (process group {server.proc.pid})"
        print(f"  {backend}: healthy on {where}; idle CPU {100 * idle:.0f}% of a core", file=sys.stderr)
        for n in args.rows:
            body = request_body(rows[:n], args.payload)
            for c in args.concurrency:
                level = Level(backend, c, n)
                measure(server, level, body, args)
                levels.append(level)
                bad = f", errors {dict(level.errors)}" if level.errors else ""
                print(
                    f"  {backend} rows={n} c={c}: {level.answered} in {level.seconds:.1f} s, {level.req_s:.0f} req/s, "
                    f"rows per call {level.formed}, RSS MB {level.rss_mb[0]:.0f} → {level.rss_mb[1]:.0f}{bad}",
                    file=sys.stderr,
                )
    finally:
        server.stop()
    return levels


def ceiling_rows_s(session: Any, inputs: np.ndarray, seconds: float) -> float:
    """Rows/s of ``session.run`` on ``inputs`` (one batch), called back to back for ``seconds``."""
    feed = {session.get_inputs()[0].name: inputs}
    names = [o.name for o in session.get_outputs()]
    for _ in range(20):
        session.run(names, feed)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(names, feed)
        calls += 1
    return calls * len(inputs) / elapsed


def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    values = [v for v in values if v == v]  # without NaN
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def report(rounds: list[list[Level]], args: argparse.Namespace) -> str:
    keys = list(dict.fromkeys((lv.backend, lv.rows, lv.concurrency) for lv in sorted(
        (lv for r in rounds for lv in r), key=lambda lv: (lv.backend, lv.rows, lv.concurrency)
    )))  # fmt: skip
    lines = [
        "| backend | rows/req | concurrency | requests | errors | req/s | rows/s | p50 ms | p99 ms | rows per call "
        "| ceiling rows/s | server / ceiling | server CPU ms/req | client CPU ms/req | server RSS MB start → end (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in keys:
        levels = [lv for r in rounds for lv in r if (lv.backend, lv.rows, lv.concurrency) == key]
        last = levels[-1]
        per_req = [lv.answered + sum(lv.errors.values()) for lv in levels]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {sum(lv.answered for lv in levels)} "
            f"| {sum(sum(lv.errors.values()) for lv in levels)} "
            f"| {_spread([lv.req_s for lv in levels])} | {_spread([lv.rows_s for lv in levels])} "
            f"| {_spread([float(np.percentile(lv.latencies_ms, 50)) for lv in levels if lv.answered], '{:.1f}')} "
            f"| {_spread([float(np.percentile(lv.latencies_ms, 99)) for lv in levels if lv.answered], '{:.1f}')} "
            f"| {_spread([float(lv.formed) for lv in levels])} | {_spread([lv.ceiling_rows_s for lv in levels])} "
            f"| {_spread([lv.ratio for lv in levels], '{:.3f}')} "
            f"| {_spread([1e3 * lv.server_cpu_s / n for lv, n in zip(levels, per_req, strict=True) if n], '{:.2f}')} "
            f"| {_spread([1e3 * lv.client_cpu_s / n for lv, n in zip(levels, per_req, strict=True) if n], '{:.2f}')} "
            f"| {last.rss_mb[0]:.0f} → {last.rss_mb[1]:.0f} ({last.rss_mb[2]:.0f}) |"
        )
    top = max(args.concurrency)
    lines.append("")
    for backend, n in dict.fromkeys((k[0], k[1]) for k in keys):
        ratios = [lv.ratio for r in rounds for lv in r if (lv.backend, lv.rows, lv.concurrency) == (backend, n, top)]
        verdict = "meets" if statistics.median(ratios) >= args.target else "misses"
        lines.append(
            f"- {backend}, {n} row(s) per request, concurrency {top}: server / in-process ONNX Runtime = "
            f"{_spread(ratios, '{:.3f}')} ({verdict} the {args.target}x target)"
        )
    for r, levels in enumerate(rounds, 1):
        for backend in dict.fromkeys(lv.backend for lv in levels):
            mine = [lv for lv in levels if lv.backend == backend]
            lines.append(
                f"- round {r}, {backend}: server RSS {mine[0].rss_mb[0]:.0f} MB at the first level's start → "
                f"{mine[-1].rss_mb[1]:.0f} MB at the last level's end, max {max(lv.rss_mb[2] for lv in mine):.0f} MB "
                f"(PSS, shared pages counted once: {mine[0].pss_mb[0]:.0f} → {mine[-1].pss_mb[1]:.0f} MB)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--ckpt", type=Path, help="a quickstart checkpoint (default: train one, 1 epoch)")
    parser.add_argument("--onnx", type=Path, help="its ONNX export (default: mtl export of --ckpt)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests in flight")
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per request (each: its own levels)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per level, at most")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level, at most")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of both backends, each in a seeded order")
    parser.add_argument("--seed", type=int, default=0, help="the rows and the backends' order")
    parser.add_argument("--max_batch_size", type=int, default=32, help="mtl serve --max_batch_size")
    parser.add_argument("--batch_timeout", type=float, default=0.005, help="mtl serve --batch_timeout")
    parser.add_argument("--serve_args", default="", help="more mtl serve options, e.g. '--fast_queue'")
    parser.add_argument(
        "--server_env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="environment of mtl serve, e.g. OMP_NUM_THREADS=1",
    )
    parser.add_argument("--payload", default="json", choices=["json", "npy"], help='npy: "inputs_npy", base64')
    parser.add_argument("--client", default="raw", choices=["raw", "httpx"], help="raw: asyncio streams, less CPU")
    parser.add_argument("--ceiling_seconds", type=float, default=2.0, help="seconds per in-process batch size")
    parser.add_argument("--target", type=float, default=0.8, help="the server / ceiling ratio asked for")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--json", type=Path, help="also write every level's numbers here")
    args = parser.parse_args(argv)
    if args.onnx and not args.ckpt and "torch" in args.backends:
        parser.error("--onnx needs --ckpt (the checkpoint it was exported from), or --backends onnx")
    if bad := [item for item in args.server_env if "=" not in item]:
        parser.error(f"--server_env takes KEY=VALUE items, got {bad}")
    # SIGTERM (a timeout, a killed job) unwinds through the finally blocks that stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        ckpt, onnx = model_files(Path(tmp), args.ckpt, args.onnx)
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])  # as mtl serve makes it
        width = tuple(int(d) for d in session.get_inputs()[0].shape[1:])
        rows = np.random.default_rng(args.seed).normal(size=(max(args.rows), *width)).astype(np.float32)
        extra = shlex.split(args.serve_args)
        # ckpt is None only with --backends onnx
        sources = {"torch": ["--ckpt_path", str(ckpt), *extra], "onnx": ["--model", str(onnx), *extra]}
        order_rng = random.Random(args.seed)
        rounds: list[list[Level]] = []
        for r in range(args.rounds):
            order = list(args.backends)
            order_rng.shuffle(order)
            print(f"round {r + 1}/{args.rounds}: {' then '.join(order)}", file=sys.stderr)
            levels = [lv for b in order for lv in run_backend(b, sources[b], args, rows)]
            ceilings: dict[int, float] = {}
            for size in sorted({lv.formed for lv in levels}):
                ceilings[size] = ceiling_rows_s(session, np.resize(rows, (size, *width)), args.ceiling_seconds)
            for lv in levels:
                lv.ceiling_rows_s = ceilings[lv.formed]
            rounds.append(levels)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = {m: __import__(m).__version__ for m in ("litserve", "onnxruntime", "torch", "httpx")}
    print(f"`python benchmarks/serve_load.py {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; --max_batch_size {args.max_batch_size} --batch_timeout {args.batch_timeout} {args.serve_args}".rstrip()
        + (f"; server env {' '.join(args.server_env)}" if args.server_env else "")
        + f"; {args.client} client, {args.payload} payload"
        + f"; at most {args.requests} requests or {args.duration:g} s per level; {args.rounds} round(s)\n"
    )
    print(report(rounds, args))
    if args.json:
        records = [{**lv.__dict__, "errors": dict(lv.errors)} for r in rounds for lv in r]
        args.json.write_text(json.dumps(records))
    errors = collections.Counter()
    for r in rounds:
        for lv in r:
            errors.update(lv.errors)
    if errors:
        print(f"\nFAILED: {sum(errors.values())} request(s) not answered 200: {dict(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
