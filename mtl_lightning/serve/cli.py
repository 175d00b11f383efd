"""``mtl serve``: serve a checkpoint (PyTorch) or an exported ONNX file (ONNX Runtime) over HTTP.

    mtl serve --ckpt_path runs/quickstart/version_0/checkpoints/best.ckpt --port 8000
    mtl serve --model model.onnx --port 8000
    mtl serve --ckpt_path seed0.ckpt seed1.ckpt seed2.ckpt --port 8000      # an ensemble
    curl -s localhost:8000/predict -d '{"inputs": [{"age": 41, "plan": "pro"}]}'

Routes: ``POST /predict`` (``{"inputs": [...]}``, answered ``{task: [entry per row]}``; see
:mod:`mtl_lightning.serve.payloads`), ``GET /health``, ``GET /info`` (tasks, kinds, class names, the input schema,
the served version) and ``POST /reload`` (``{"path": FILE}`` or no body: load the file, check that it has the served
model's tasks and input, then serve it; ``--watch`` does the same whenever the served file changes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence

from mtl_lightning.errors import ConfigError, OneLineArgumentParser
from mtl_lightning.serve.models import ServeError, load_served_model

LOOPBACK = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="mtl serve", description=__doc__.split("\n\n")[0].strip("` "))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckpt_path",
        nargs="+",
        help="a checkpoint of mtl fit (served with PyTorch); several: their ensemble, predictions averaged per task",
    )
    source.add_argument("--model", help="a file of mtl export (.onnx: served with ONNX Runtime; .ckpt: PyTorch)")
    parser.add_argument("--host", default=LOOPBACK, choices=[LOOPBACK, "0.0.0.0", "::"], help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--devices", default="auto", help="how many devices, or auto")
    parser.add_argument("--workers_per_device", type=int, default=1, help="inference worker processes per device")
    parser.add_argument("--api_servers", type=int, default=1, help="HTTP front-end processes")
    parser.add_argument(
        "--fast_queue", action="store_true", help="ZeroMQ between the HTTP and worker processes (LitServe; not Windows)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per inference worker (default: the library's; 1 on machines with few cores)",
    )
    parser.add_argument("--max_batch_size", type=int, default=32, help="requests batched into one model call")
    parser.add_argument("--batch_timeout", type=float, default=0.005, help="seconds to wait for a batch to fill")
    parser.add_argument("--max_rows", type=int, default=1024, help="rows one request may carry (413 above)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait (504 after)")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability above which pred is 1")
    parser.add_argument(
        "--strict_categories",
        action="store_true",
        help="refuse (422) categories not seen in training, instead of encoding them as all zeros as training did",
    )
    parser.add_argument("--watch", action="store_true", help="reload the served file whenever it changes")
    parser.add_argument("--watch_interval", type=float, default=2.0, help="seconds between checks of --watch")
    parser.add_argument("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _checked(args: argparse.Namespace) -> None:
    positive = ("workers_per_device", "api_servers", "max_batch_size", "max_rows")
    for name in positive:
        if getattr(args, name) < 1:
            raise ServeError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 1024 <= args.port <= 65535:
        raise ServeError(f"--port must be in [1024, 65535], got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ServeError(f"--threads must be at least 1, got {args.threads}")
    if args.batch_timeout < 0 or args.timeout <= 0 or args.watch_interval <= 0:
        raise ServeError("--batch_timeout must be >= 0, and --timeout and --watch_interval > 0 (seconds)")
    if args.batch_timeout >= args.timeout:
        raise ServeError(f"--batch_timeout ({args.batch_timeout} s) must be shorter than --timeout ({args.timeout} s)")
    if not 0.0 <= args.threshold <= 1.0:
        raise ServeError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.devices != "auto" and not args.devices.isdigit():
        raise ServeError(f"--devices must be a number or auto, got {args.devices!r}")


_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C in the main process (LitServe's shutdown); a plain exit in a process forked from it."""
    if os.getpid() != _MAIN_PID:
        raise SystemExit(0)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl serve ...``: runs until stopped (Ctrl-C or SIGTERM); bad arguments raise a one-line ConfigError."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _checked(args)
    path = args.ckpt_path or args.model
    # Loaded once here, on the CPU: a file that cannot be served fails now, with one line, before any process starts.
    model = load_served_model(path, device="cpu")
    try:
        import litserve  # noqa: F401
    except ImportError as err:
        raise ConfigError('mtl serve needs LitServe: pip install "mtl_lightning[serve]"') from err
    from mtl_lightning.serve.api import MultiTaskAPI
    from mtl_lightning.serve.server import build_server, watch
    from mtl_lightning.serve.state import ModelState

    folder = tempfile.mkdtemp(prefix="mtl-serve-")
    stop = threading.Event()
    try:
        state = ModelState(folder)
        record = state.publish(model)
        api = MultiTaskAPI(
            folder,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            max_rows=args.max_rows,
            threshold=args.threshold,
            strict_categories=args.strict_categories,
            threads=args.threads,
        )
        server = build_server(
            state,
            api,
            accelerator=args.accelerator,
            devices=int(args.devices) if args.devices != "auto" else "auto",
            workers_per_device=args.workers_per_device,
            timeout=args.timeout,
            fast_queue=args.fast_queue,
        )
        if args.watch:
            watch(state, args.watch_interval, stop)
        # LitServe shuts its processes down on KeyboardInterrupt only; SIGTERM (kill, systemd, Kubernetes) would end
        # this process alone and leave the HTTP and worker processes serving on the port.
        signal.signal(signal.SIGTERM, _interrupt)
        tasks = ", ".join(f"{s.name} ({s.kind})" for s in model.tasks.values())
        served = record["path"] if isinstance(record["path"], str) else "an ensemble of " + ", ".join(record["path"])
        print(f"mtl serve: {served} ({model.backend}, version 1) on http://{args.host}:{args.port}: {tasks}")
        server.run(
            host=args.host,
            port=args.port,
            num_api_servers=args.api_servers,
            log_level=args.log_level,
            generate_client_file=False,
        )
    finally:
        stop.set()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
