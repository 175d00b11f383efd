"""``mtl affinity``: train once while measuring inter-task affinity (TAG's lookahead), then propose task groupings.

    mtl affinity --config configs/quickstart.yaml --groups 2 --trainer.max_epochs 2
    mtl affinity --config my.yaml --groups 3 --top 10 --every_n_steps 5 --out runs/affinity/my

Every argument that is not one of this command's own options goes to the run as it would to ``mtl fit`` (without
``--config`` the quickstart is run). The run trains with a :class:`~mtl_lightning.callbacks.TaskAffinity` callback
(the config's own one when it has one; ``--every_n_steps`` and ``--lookahead_lr`` override its settings), then the
averaged affinity matrix and the best partitions of the tasks into ``--groups`` groups
(:func:`mtl_lightning.affinity.grouping.best_partitions`, an exhaustive search) are printed with their expected total
affinity and written to ``OUT/affinity.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mtl_lightning.errors import ConfigError, OneLineArgumentParser

DEFAULT_OUT = Path("runs") / "affinity"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="mtl affinity",
        description=(
            "Train once while measuring inter-task affinity (TAG's lookahead), then propose groupings of the tasks. "
            "Every other argument goes to the run as to `mtl fit` (see mtl fit --help); without --config the "
            "quickstart is run."
        ),
        epilog="example: mtl affinity --config configs/quickstart.yaml --groups 2 --trainer.max_epochs 2",
        allow_abbrev=False,  # `--trainer.max_epochs` and the like belong to the run, never to a prefix of ours
    )
    parser.add_argument("--groups", type=int, default=2, help="number of groups to split the tasks into (default 2)")
    parser.add_argument("--top", type=int, default=5, help="number of groupings to propose, best first (default 5)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where affinity.json goes (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--every_n_steps", type=int, default=None, help="measure every N optimizer steps (default: 10, or the config's)"
    )
    parser.add_argument(
        "--lookahead_lr",
        type=float,
        default=None,
        help="lookahead SGD step size (default: the optimizer's current learning rate, as TAG)",
    )
    return parser


def _fit_args(rest: list[str]) -> list[str]:
    """The run's arguments: the quickstart config unless one is given (as ``mtl fit`` does)."""
    from mtl_lightning.cli import QUICKSTART

    unknown = [a for a in rest if a in ("fit", "validate", "test", "predict")]
    if unknown:
        raise ConfigError(f"mtl affinity trains as `mtl fit` does; drop the command name {unknown[0]!r}")
    if any(a == "--config" or a.startswith("--config=") for a in rest):
        return rest
    return ["--config", str(QUICKSTART), *rest]


def main(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.groups < 1:
        raise ConfigError(f"mtl affinity: --groups must be >= 1, got {args.groups}")
    if args.top < 1:
        raise ConfigError(f"mtl affinity: --top must be >= 1, got {args.top}")

    from mtl_lightning.affinity.grouping import best_partitions, check_grouping_request
    from mtl_lightning.affinity.report import matrix_table, proposals_table, write_result
    from mtl_lightning.affinity.run import attach_affinity
    from mtl_lightning.bench.resolve import build_cli

    fit_args = _fit_args(rest)
    cli = build_cli(fit_args, parser_kwargs={"exit_on_error": False})
    names = list(getattr(cli.model, "task_names", []))
    if len(names) >= 2 and args.groups > len(names):
        raise ConfigError(
            f"mtl affinity: --groups {args.groups} is more than the config's {len(names)} tasks {names}; give at "
            f"most {len(names)}"
        )
    check_grouping_request(len(names), args.groups)  # before training: a request without an answer fails now
    callback = attach_affinity(cli.trainer, args.every_n_steps, args.lookahead_lr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    log_dir = cli.trainer.log_dir  # a broadcast under DDP: every rank asks
    if not cli.trainer.is_global_zero:  # every rank holds the same matrix; one prints and writes
        return 0

    affinity = callback.affinity.tolist()
    unmeasured = [
        (names[i], names[j]) for i, row in enumerate(affinity) for j, v in enumerate(row) if not math.isfinite(v)
    ]
    print(
        f"\naffinity Z[row -> column] = 1 - L_col(after a step on row) / L_col(before), mean of "
        f"{callback.measurements} measured steps (every {callback.every_n_steps}) over {cli.trainer.global_step} steps:"
    )
    print(matrix_table(affinity, names))
    if unmeasured:
        print(f"not measured (no step had labels of both tasks), counted as 0 in the grouping: {unmeasured}")
    grouping = [[v if math.isfinite(v) else 0.0 for v in row] for row in affinity]
    proposals = best_partitions(grouping, args.groups, args.top)
    proxy = callback.cosine_proxy
    if proxy is not None:
        print("\nproxy: mean cosine of the task gradients (from the balancer's telemetry, symmetric):")
        print(matrix_table(proxy.tolist(), names))
    print(
        f"\nbest partitions into {args.groups} group(s) (total = sum over tasks of the mean affinity onto each task "
        "from the other members of its group):"
    )
    print(proposals_table(proposals, names))
    path = write_result(
        args.out,
        names,
        affinity,
        proposals,
        args.groups,
        cosine_proxy=None if proxy is None else proxy.tolist(),
        extra={
            "measurements": callback.measurements,
            "steps": cli.trainer.global_step,
            "every_n_steps": callback.every_n_steps,
            "lookahead_lr": callback.lr,  # null: the optimizer's learning rate at each measured step
            "run_args": fit_args,
            "log_dir": log_dir,
        },
    )
    print(f"\nwritten: {path}")
    return 0
