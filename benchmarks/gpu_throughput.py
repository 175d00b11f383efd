"""Training throughput, peak GPU memory and model FLOPs utilisation (MFU) of precision and sharding variants.

Each cell of the matrix (experiment x variant) is one ``python -m mtl_lightning fit`` subprocess: the experiment's
config, a device preset, the variant's trainer presets, then a fixed number of steps with no validation, no
checkpoints, no logger and no progress bar, measured by ``mtl_lightning.callbacks.ThroughputTimer`` (added with
``--trainer.callbacks+``): ``--warmup`` untimed steps (timed one by one: with ``compile`` the first holds the
compilation), then ``--steps`` timed steps synchronised only at the two ends of the window. Throughput is per
device. Experiments:

- ``quickstart``: ``configs/quickstart.yaml``, the 3-task MLP (batch 256 of 64 features). FLOPs per sample =
  6 * (encoder + head) parameters (2 per weight forward, 4 backward). An epoch is 63 batches, the last one
  partial: keep ``--warmup`` + ``--steps`` <= 62 so the window holds no epoch end (epoch-end metrics, and a
  recompilation for the odd batch size under ``compile``).
- ``transformer``: ``configs/experiment/transformer_gpu.yaml``, a 110M-parameter encoder (d_model 768, 12 layers,
  512 tokens, batch 64). FLOPs per sample = ``TransformerEncoder.flops_per_sample()`` (PaLM's accounting:
  6 * non-embedding params * tokens + 12 * layers * d_model * tokens^2) + 6 * head params.

Variants (each stacks its presets on ``configs/trainer/gpu.yaml``; ``--trainer.devices`` is set last):

- ``gpu``: 32-true (fp32 weights and matmuls; TF32 only if the user enables it).
- ``bf16``: ``configs/trainer/bf16.yaml`` (bf16-mixed autocast).
- ``fp16``: ``configs/trainer/fp16.yaml`` (16-mixed with dynamic gradient scaling).
- ``compile``: bf16 + ``--model.init_args.compile true`` (``torch.compile`` of the encoder in ``configure_model``).
- ``fsdp``: ``configs/trainer/fsdp.yaml`` + bf16 (Lightning's FSDPStrategy, FSDP1).
- ``fsdp2``: ``configs/trainer/fsdp2.yaml`` + bf16 (``fully_shard`` through Lightning's ModelParallelStrategy).

Opt-in variants (not in the default matrix; name them in ``--variants``), each the transformer experiment as
configured (bf16-mixed, compiled encoder, clipping at 1.0) with one change, for the MFU target:

- ``foreach`` / ``fused``: AdamW with ``foreach=True`` / ``fused=True`` (Lightning's mixed-precision plugin refuses
  gradient clipping with an optimizer that unscales itself, e.g. a fused one: the row then says so).
- ``bf16_true``: ``--trainer.precision bf16-true`` (bf16 weights, no autocast).
- ``cudagraphs``: ``TORCHINDUCTOR_CUDAGRAPHS=1`` (inductor's CUDA graphs for the compiled encoder; the module has no
  compile-mode option, so the environment variable is the way in). GPU only.
- ``wide``: d_model 1024, 16 heads (12 layers): a wider model, more work per launched kernel.
- ``batch256``: batch 256 (twice the experiment's).

MFU = model FLOPs per second / the device's dense bf16 peak (989.4 TFLOP/s on an H100 SXM or H200), for every
variant, fp32 included, so all rows share one scale. A variant whose preset file does not exist is skipped with the reason; a failing variant is reported
with the end of its output and the matrix goes on.

    python benchmarks/gpu_throughput.py                              # the full matrix on one GPU, ~10 min
    python benchmarks/gpu_throughput.py --experiments transformer --variants bf16 compile --steps 100
    python benchmarks/gpu_throughput.py --cpu-smoke                  # tiny sizes on the CPU: checks the plumbing
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "quickstart": "configs/quickstart.yaml",
    "transformer": "configs/experiment/transformer_gpu.yaml",
}
# --cpu-smoke: sizes that make each run a few seconds on a CPU (same code paths, meaningless numbers).
SMOKE_SIZES = {
    "quickstart": ["--data.init_args.num_samples", "512", "--data.init_args.batch_size", "32"],
    "transformer": [
        *("--model.init_args.encoder.init_args.d_model", "32"),
        *("--model.init_args.encoder.init_args.num_layers", "1"),
        *("--model.init_args.encoder.init_args.num_heads", "2"),
        *("--model.init_args.encoder.init_args.vocab_size", "256"),
        *("--data.init_args.vocab_size", "256"),
        *("--data.init_args.num_samples", "256"),
        *("--data.init_args.seq_len", "32"),
        *("--data.init_args.batch_size", "8"),
        *("--data.init_args.pin_memory", "false"),
    ],
}


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    presets: tuple[str, ...] = ()  # trainer presets stacked after the device preset
    # Eager unless the variant says otherwise: an experiment config may compile by default.
    extra: tuple[str, ...] = ("--model.init_args.compile", "false")
    cpu: bool = True  # possible on a CPU (run by --cpu-smoke)
    default: bool = True  # in the matrix run when --variants is not given
    env: tuple[tuple[str, str], ...] = ()  # environment of the run, beside the caller's


_COMPILED = ("--model.init_args.compile", "true")
VARIANTS = {
    v.name: v
    for v in (
        Variant("gpu", "32-true"),
        Variant("bf16", "bf16-mixed", ("configs/trainer/bf16.yaml",)),
        Variant("fp16", "16-mixed + GradScaler", ("configs/trainer/fp16.yaml",), cpu=False),
        Variant(
            "compile",
            "bf16-mixed + torch.compile(encoder)",
            ("configs/trainer/bf16.yaml",),
            ("--model.init_args.compile", "true"),
        ),
        Variant("fsdp", "FSDP1 + bf16-mixed", ("configs/trainer/fsdp.yaml", "configs/trainer/bf16.yaml"), cpu=False),
        Variant("fsdp2", "FSDP2 + bf16-mixed", ("configs/trainer/fsdp2.yaml", "configs/trainer/bf16.yaml")),
        # Opt-in: the experiment as configured (bf16-mixed + compile) with one change each (the MFU target).
        Variant(
            "foreach",
            "compile + AdamW(foreach=True), clipping on",
            ("configs/trainer/bf16.yaml",),
            (*_COMPILED, "--model.init_args.optimizer.init_args.foreach", "true"),
            default=False,
        ),
        Variant(
            "fused",
            "compile + AdamW(fused=True), clipping on",
            ("configs/trainer/bf16.yaml",),
            (*_COMPILED, "--model.init_args.optimizer.init_args.fused", "true"),
            default=False,
        ),
        Variant(
            "bf16_true",
            "compile + bf16-true weights",
            ("configs/trainer/bf16.yaml",),
            (*_COMPILED, "--trainer.precision", "bf16-true"),
            default=False,
        ),
        Variant(
            "cudagraphs",
            "compile + inductor CUDA graphs",
            ("configs/trainer/bf16.yaml",),
            _COMPILED,
            cpu=False,
            default=False,
            env=(("TORCHINDUCTOR_CUDAGRAPHS", "1"),),
        ),
        Variant(
            "wide",
            "compile + d_model 1024, 16 heads",
            ("configs/trainer/bf16.yaml",),
            (
                *_COMPILED,
                *("--model.init_args.encoder.init_args.d_model", "1024"),
                *("--model.init_args.encoder.init_args.num_heads", "16"),
            ),
            default=False,
        ),
        Variant(
            "batch256",
            "compile + batch 256",
            ("configs/trainer/bf16.yaml",),
            (*_COMPILED, "--data.init_args.batch_size", "256"),
            default=False,
        ),
    )
}
# Shown in the table, in this order: (JSON key of ThroughputTimer / Row, header, format).
COLUMNS = (
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("step_ms", "ms/step", "{:.2f}"),
    ("speedup", "x base", "{:.2f}"),
    ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("mfu_pct", "MFU %", "{:.1f}"),
    ("first_step_s", "1st step s", "{:.2f}"),
    ("warmup_s", "warm-up s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
)


@dataclass
class Row:
    experiment: str
    variant: str
    status: str  # ok | failed | skipped
    reason: str = ""
    command: str = ""
    wall_s: float | None = None
    speedup: float | None = None
    mfu_pct: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the ThroughputTimer JSON

    def value(self, key: str) -> Any:
        return getattr(self, key) if key in ("speedup", "mfu_pct", "wall_s") else self.metrics.get(key)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        help="default: all but the opt-in ones (with --cpu-smoke: the CPU-possible ones)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 50; 3 with --cpu-smoke)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; 1 with --cpu-smoke)")
    p.add_argument("--devices", type=int, default=1, help="--trainer.devices of every run (per-device numbers)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: dense bf16)")
    p.add_argument(
        "--extra", default="", help="more CLI arguments for every run, e.g. '--data.init_args.batch_size 32'"
    )
    p.add_argument("--timeout", type=float, default=1200, help="seconds before a run counts as failed")
    p.add_argument("--out", type=Path, help="write every row to this .csv or .json file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script without a GPU")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.cpu_smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 10)
    if args.variants is None:
        args.variants = [n for n, v in VARIANTS.items() if v.default and (v.cpu or not args.cpu_smoke)]
    return args


def skip_reason(variant: Variant, args: argparse.Namespace, has_cuda: bool) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    if args.cpu_smoke and not variant.cpu:
        return "GPU only (not part of --cpu-smoke)"
    if not args.cpu_smoke and not has_cuda:
        return "no CUDA device (use --cpu-smoke to check the script on a CPU)"
    missing = [p for p in variant.presets if not (REPO / p).is_file()]
    if missing:
        return f"preset {', '.join(missing)} does not exist yet"
    return None


def command(experiment: str, variant: Variant, args: argparse.Namespace, workdir: Path) -> list[str]:
    """The ``mtl fit`` command line of one cell (without the interpreter)."""
    timer = {
        "class_path": "mtl_lightning.callbacks.ThroughputTimer",
        "init_args": {"out": str(workdir / "throughput.json"), "warmup": args.warmup, "steps": args.steps},
    }
    if args.peak_tflops:
        timer["init_args"]["peak_flops"] = args.peak_tflops * 1e12
    device_preset = "configs/trainer/cpu.yaml" if args.cpu_smoke else "configs/trainer/gpu.yaml"
    cmd = ["-m", "mtl_lightning", "fit", "--config", EXPERIMENTS[experiment], "--trainer", device_preset]
    for preset in variant.presets:
        cmd += ["--trainer", preset]
    if args.cpu_smoke:
        cmd += ["--trainer.accelerator", "cpu", *SMOKE_SIZES[experiment]]
    cmd += ["--trainer.devices", str(args.devices), *variant.extra]
    cmd += [
        *("--trainer.max_steps", str(args.warmup + args.steps)),
        *("--trainer.max_epochs", "-1"),
        *("--trainer.limit_val_batches", "0"),
        *("--trainer.num_sanity_val_steps", "0"),
        *("--trainer.enable_checkpointing", "false"),
        *("--trainer.logger", "false"),
        *("--trainer.enable_progress_bar", "false"),
        *("--trainer.enable_model_summary", "false"),
        *("--trainer.default_root_dir", str(workdir)),  # where the CLI saves config.yaml without a logger
        *("--trainer.callbacks", "[]"),  # the experiment's checkpoint/LR-monitor callbacks need val and a logger
        *("--trainer.callbacks+", json.dumps(timer)),
    ]
    return cmd + shlex.split(args.extra)


def run_cell(experiment: str, variant: Variant, args: argparse.Namespace, root: Path) -> Row:
    workdir = root / f"{experiment}-{variant.name}"
    workdir.mkdir(parents=True)
    cmd = [sys.executable, *command(experiment, variant, args, workdir)]
    env = {**os.environ, **dict(variant.env)}
    shown = (
        " ".join(f"{k}={v}" for k, v in variant.env) + (" " if variant.env else "") + shlex.join(["python", *cmd[1:]])
    )
    print(f"\n[{experiment} / {variant.name}: {variant.description}]\n  $ {shown}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return Row(experiment, variant.name, "failed", f"timed out after {args.timeout:.0f} s", shown)
    wall = time.perf_counter() - start
    (workdir / "output.log").write_text(proc.stdout + proc.stderr)
    result = workdir / "throughput.json"
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        print(
            f"  FAILED (exit {proc.returncode}); last lines:\n" + "\n".join(f"    {line}" for line in tail.splitlines())
        )
        last = tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
        return Row(experiment, variant.name, "failed", last[:200], shown, wall)
    metrics = json.loads(result.read_text())
    mfu = metrics.get("mfu")
    row = Row(experiment, variant.name, "ok", "", shown, wall, mfu_pct=100 * mfu if mfu is not None else None)
    row.metrics = metrics
    print("  " + ", ".join(f"{h} {fmt.format(v)}" for k, h, fmt in COLUMNS if (v := row.value(k)) is not None))
    return row


def add_speedups(rows: list[Row]) -> None:
    """samples/s of each row over that of the first successful row of its experiment (the baseline)."""
    base: dict[str, float] = {}
    for row in rows:
        rate = row.metrics.get("samples_per_s")
        if row.status != "ok" or not rate:
            continue
        base.setdefault(row.experiment, rate)
        row.speedup = rate / base[row.experiment]


def table(rows: list[Row]) -> str:
    headers = ["experiment", "variant", "status", *(h for _, h, _ in COLUMNS)]
    lines = []
    for row in rows:
        cells = [row.experiment, row.variant, row.status]
        cells += [fmt.format(v) if (v := row.value(k)) is not None else "-" for k, _, fmt in COLUMNS]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *lines, strict=False)]
    out = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    for cells in lines:
        out.append(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        )
    notes = [f"  {r.experiment}/{r.variant}: {r.status}: {r.reason}" for r in rows if r.reason]
    return "\n".join(out + (["", "not run:", *notes] if notes else []))


def environment(has_cuda: bool) -> str:
    import lightning
    import torch

    device = torch.cuda.get_device_name(0) if has_cuda else f"CPU ({os.cpu_count()} cores)"
    return f"{device}; torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}"


def write(rows: list[Row], path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
        return
    keys = sorted({k for r in rows for k in r.metrics})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "variant", "status", "reason", "wall_s", "speedup", "mfu_pct", *keys, "command"])
        for r in rows:
            base = [r.experiment, r.variant, r.status, r.reason, r.wall_s, r.speedup, r.mfu_pct]
            writer.writerow([*base, *(r.metrics.get(k) for k in keys), r.command])


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    import torch

    has_cuda = torch.cuda.is_available()
    print(f"{environment(has_cuda)}; {args.warmup} warm-up + {args.steps} timed steps per run")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as tmp:
        for experiment in args.experiments:
            for name in args.variants:
                variant = VARIANTS[name]
                reason = skip_reason(variant, args, has_cuda)
                if reason:
                    print(f"\n[{experiment} / {name}] skipped: {reason}")
                    rows.append(Row(experiment, name, "skipped", reason))
                    continue
                rows.append(run_cell(experiment, variant, args, Path(tmp)))
                if args.out:  # after every cell: a run stopped by an outer timeout keeps what it measured
                    add_speedups(rows)
                    write(rows, args.out)
    add_speedups(rows)
    print("\n" + table(rows))
    print("x base: samples/s over the first variant of the same experiment; MFU against the dense bf16 peak")
    if args.out:
        write(rows, args.out)
        print(f"rows written to {args.out}")
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(r.status == "failed" for r in rows) else 0)
