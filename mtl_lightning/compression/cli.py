"""``mtl compress``: turn a checkpoint into a smaller one, or report what a checkpoint holds.

    mtl compress quantize --ckpt_path best.ckpt --output int8.ckpt [--backend x86|fbgemm|qnnpack|onednn] [--layers P ...]
    mtl compress svd      --ckpt_path best.ckpt --output svd.ckpt (--rank R | --energy E) [--layers P ...]
    mtl compress report   --ckpt_path int8.ckpt

(``python -m mtl_lightning.compression.cli ...`` does the same.) Layer patterns are shell-style module names, e.g.
``encoder.*`` or ``heads.purchase.*``. The output is a checkpoint that loads like any other (see
:mod:`mtl_lightning.compression.checkpoint`). Steps compose: ``quantize`` on an ``svd`` output quantises the factors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtl_lightning.compression.checkpoint import (
    compression_steps,
    model_from_checkpoint,
    read_checkpoint,
    save_compressed,
)
from mtl_lightning.compression.lowrank import DEFAULT_SVD_PATTERNS, apply_svd, svd_record
from mtl_lightning.compression.quantize import quantize_model
from mtl_lightning.compression.report import markdown_table, parameter_counts, sparsity_report, sparsity_table
from mtl_lightning.compression.selection import DEFAULT_PATTERNS
from mtl_lightning.errors import ConfigError, OneLineArgumentParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="mtl compress", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="dynamic int8 quantisation of Linear layers (CPU inference)")
    q.add_argument("--ckpt_path", required=True, help="checkpoint to compress")
    q.add_argument("--output", required=True, help="where to write the quantised checkpoint")
    q.add_argument("--backend", default=None, help="int8 kernels: x86, fbgemm, qnnpack or onednn (default: current)")
    q.add_argument("--layers", nargs="+", default=list(DEFAULT_PATTERNS), help="module name patterns to quantise")

    s = sub.add_parser("svd", help="low-rank factorisation of Linear layers by truncated SVD")
    s.add_argument("--ckpt_path", required=True, help="checkpoint to compress")
    s.add_argument("--output", required=True, help="where to write the factorised checkpoint")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the inner width of every factorised layer")
    how.add_argument("--energy", type=float, help="keep the smallest rank holding this fraction of ||W||_F^2")
    s.add_argument("--layers", nargs="+", default=list(DEFAULT_SVD_PATTERNS), help="module name patterns to factorise")

    r = sub.add_parser("report", help="parameters, per-layer sparsity and file size of a checkpoint")
    r.add_argument("--ckpt_path", required=True, help="checkpoint to describe")
    return parser


def _check_output(ckpt_path: str, output: str) -> None:
    if Path(output).resolve() == Path(ckpt_path).resolve():
        raise ConfigError(f"--output {output} is the input checkpoint; write the compressed model to another file")


def _size(path: str | Path) -> str:
    return f"{Path(path).stat().st_size / 1024:.1f} KiB"


def quantize(args: argparse.Namespace) -> None:
    _check_output(args.ckpt_path, args.output)
    source = read_checkpoint(args.ckpt_path)
    model = model_from_checkpoint(source)
    step = quantize_model(model, args.layers, args.backend)
    save_compressed(model, source, step, args.output)
    print(
        f"quantised {len(step['layers'])} Linear layer(s) to int8 (backend {step['backend']}): "
        f"{', '.join(step['layers'])}"
    )
    print(f"{args.ckpt_path} ({_size(args.ckpt_path)}) -> {args.output} ({_size(args.output)})")


def svd(args: argparse.Namespace) -> None:
    _check_output(args.ckpt_path, args.output)
    source = read_checkpoint(args.ckpt_path)
    model = model_from_checkpoint(source)
    rows = apply_svd(model, args.layers, rank=args.rank, energy=args.energy)
    save_compressed(model, source, svd_record(rows), args.output)
    body = [
        (
            r.layer,
            f"{r.in_features} -> {r.out_features}",
            r.rank,
            f"{100 * r.energy:.1f}%",
            r.params_before,
            r.params_after,
            "factorised" if r.factorised else "kept (no saving at this rank)",
        )
        for r in rows
    ]
    print(markdown_table(["layer", "shape", "rank", "energy kept", "params before", "params after", ""], body))
    print(f"{args.ckpt_path} ({_size(args.ckpt_path)}) -> {args.output} ({_size(args.output)})")


def report(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.ckpt_path)
    model = model_from_checkpoint(checkpoint)
    floats, int8 = parameter_counts(model)
    # Every step has a known method here: model_from_checkpoint raised on any other.
    steps = [s["method"] for s in compression_steps(checkpoint)] or ["none"]
    print(f"{args.ckpt_path}: {_size(args.ckpt_path)}; compression: {', '.join(steps)}")
    print(f"parameters: {floats:,} float" + (f" + {int8:,} int8 weights" if int8 else ""))
    print(sparsity_table(sparsity_report(model)))


COMMANDS = {"quantize": quantize, "svd": svd, "report": report}


def main(argv: list[str] | None = None) -> int:
    """Run ``mtl compress <command> ...``; bad input raises :class:`~mtl_lightning.errors.ConfigError`."""
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"mtl compress: error: {err}", file=sys.stderr)
        sys.exit(2)
