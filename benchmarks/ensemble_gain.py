"""Seed ensembles against their members: N seeds of one run of a benchmark suite, each member and the N-seed ensemble
(mtl_lightning/ensemble.py: per-task predictions averaged) tested on the same test split, side by side.

For each seed the suite's run (its first variant, or ``--variant``) is trained as ``mtl-bench`` trains it (the same
arguments, ``--seed_everything SEED``, the checkpoint of best ``val/loss``) and tested; then the ensemble of those
checkpoints is tested (``mtl test --model mtl_lightning.ensemble.MultiTaskEnsemble``). The table has each task's primary metric of
the suite for every member, the members' mean ± std, and the ensemble; the Δm% column (mtl_lightning/bench/delta.py,
lower is better, negative = better) compares each row with the members' mean, so the members' own Δm% show the seed
spread the ensemble's gain is to be read against.

    python benchmarks/ensemble_gain.py configs/bench/quickstart.yaml
    python benchmarks/ensemble_gain.py configs/bench/census_group1.yaml                  # variant shared_bottom
    python benchmarks/ensemble_gain.py configs/bench/quickstart.yaml --seeds 5 -- --trainer.max_epochs 5

Runs and checkpoints go under ``--out`` (default ``runs/bench/<suite>_ensemble``); ``--csv`` also writes every
row's primary metrics.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mtl_lightning.bench.delta import Stat, delta_m
from mtl_lightning.bench.plan import Job, RunSpec, make_plan
from mtl_lightning.bench.resolve import Primary, build_cli

# The bench's own rule for the tested checkpoint (best val/loss), so members are tested as mtl-bench tests runs.
from mtl_lightning.bench.runner import _checkpoint_to_test
from mtl_lightning.bench.suite import SINGLE_TASK, load_suite

ENSEMBLE = "mtl_lightning.ensemble.MultiTaskEnsemble"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", type=Path, help="a benchmark suite, e.g. configs/bench/quickstart.yaml")
    p.add_argument("--variant", help="the suite's variant to ensemble (default: its first)")
    p.add_argument("--seeds", type=int, default=3, help="members: the suite's first N seeds (default 3)")
    p.add_argument("--out", type=Path, help="output folder (default runs/bench/<suite>_ensemble)")
    p.add_argument("--csv", type=Path, help="also write the table's values here")
    return p.parse_args(own), extra


def train_member(spec: RunSpec) -> tuple[Path, dict[str, float], float]:
    """Fit one seed, test its best checkpoint: (checkpoint, test metrics, fit + test seconds)."""
    cli = build_cli(spec.args)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    path, _ = _checkpoint_to_test(cli.trainer)
    if path is None:
        raise SystemExit(f"{spec.job.run} seed {spec.seed} saved no checkpoint: the ensemble needs one per member")
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=path, verbose=False)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return Path(path), metrics, time.perf_counter() - start


def test_ensemble(job: Job, checkpoints: Sequence[Path], out: Path) -> tuple[dict[str, float], float]:
    """``mtl test`` of the ensemble of ``checkpoints`` with the run's data: (test metrics, seconds)."""
    args = [*job.args, "--model", ENSEMBLE, "--model.checkpoints"]
    args += [json.dumps([str(p) for p in checkpoints]), "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(out)]
    cli = build_cli(args)
    start = time.perf_counter()
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    return metrics, time.perf_counter() - start


def table(
    members: Mapping[int, Mapping[str, float]], ensemble: Mapping[str, float], primaries: Mapping[str, Primary]
) -> tuple[str, list[dict[str, object]]]:
    """The Markdown table and its rows: members, their mean ± std, the ensemble; Δm% against the members' mean."""
    tasks = list(primaries)
    mean = {t: statistics.fmean(m[primaries[t].key] for m in members.values()) for t in tasks}
    directions = {t: primaries[t].higher_is_better for t in tasks}
    header = ["model", *(p.label for p in primaries.values()), "Δm% vs mean member ↓"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    rows: list[dict[str, object]] = []

    def add(name: str, values: Mapping[str, float], cells: Sequence[str], delta: str) -> None:
        lines.append("| " + " | ".join([name, *cells, delta]) + " |")
        rows.append({"model": name, **{primaries[t].key: values[t] for t in tasks}})

    deltas = []
    for seed, metrics in members.items():
        values = {t: metrics[primaries[t].key] for t in tasks}
        deltas.append(delta_m(values, mean, directions))
        add(f"member seed {seed}", values, [f"{values[t]:.4f}" for t in tasks], f"{deltas[-1]:+.2f}")
    spread = {t: Stat.of([m[primaries[t].key] for m in members.values()]) for t in tasks}
    add(f"mean of {len(members)} members", mean, [spread[t].text(4) for t in tasks], Stat.of(deltas).text(2, sign=True))
    values = {t: ensemble[primaries[t].key] for t in tasks}
    add(
        f"ensemble of {len(members)}",
        values,
        [f"{values[t]:.4f}" for t in tasks],
        f"{delta_m(values, mean, directions):+.2f}",
    )
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    suite = load_suite(args.suite)
    plan = make_plan(suite, extra)
    variants = [j for j in plan.jobs if j.variant != SINGLE_TASK]
    job = next((j for j in variants if j.variant == args.variant), None) if args.variant else variants[0]
    if job is None:
        raise SystemExit(f"suite {suite.name!r} has no variant {args.variant!r}; its variants: {list(suite.variants)}")
    out = args.out or Path("runs") / "bench" / f"{suite.name}_ensemble"
    seeds = suite.pick_seeds(args.seeds)
    members: dict[int, dict[str, float]] = {}
    checkpoints = []
    for seed in seeds:
        spec = RunSpec(job, seed, out)
        print(f"[member seed {seed}] mtl fit {shlex.join(spec.args)}", flush=True)
        path, metrics, seconds = train_member(spec)
        print(f"[member seed {seed}] {seconds:.1f} s, tested {path}", flush=True)
        members[seed], checkpoints = metrics, [*checkpoints, path]
    ensemble, seconds = test_ensemble(job, checkpoints, out / "ensemble")
    print(f"[ensemble] tested in {seconds:.1f} s")
    text, rows = table(members, ensemble, plan.primaries)
    print(f"\n{suite.name}, variant {job.variant}, {len(seeds)} seeds (test split)\n\n{text}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
