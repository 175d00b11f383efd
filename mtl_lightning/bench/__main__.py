"""``python -m mtl_lightning.bench SUITE.yaml``: run a benchmark suite over seeds and print its Δm% table.

    python -m mtl_lightning.bench configs/bench/quickstart.yaml                 # every run, 3 seeds
    python -m mtl_lightning.bench configs/bench/quickstart.yaml --seeds 5 --resume   # add seeds 3 and 4
    python -m mtl_lightning.bench configs/bench/quickstart.yaml --only pcgrad --dry-run   # the commands only
    python -m mtl_lightning.bench configs/bench/quickstart.yaml -- --trainer.max_epochs 3   # args for every run

Writes ``<out>/results.csv`` (every test value of every run, appended as runs end), ``<out>/results.md`` (the table)
and each run's logs and checkpoints under ``<out>/runs/<run>/seed_<seed>/``; ``<out>`` defaults to
``runs/bench/<suite name>``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mtl_lightning.bench.delta import markdown, summarise
from mtl_lightning.bench.plan import Plan, RunSpec, make_plan
from mtl_lightning.bench.results import append_rows, done_runs, read_rows, rows_of
from mtl_lightning.bench.runner import RunResult, run_in_process, run_in_subprocess
from mtl_lightning.bench.suite import SINGLE_TASK, SuiteError, load_suite
from mtl_lightning.errors import ConfigError


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, the arguments after ``--``, which go to every run)."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="mtl-bench",
        usage="%(prog)s SUITE [options] [-- MTL_FIT_ARGS ...]",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are added to every run, e.g. -- --trainer.max_epochs 3.",
    )
    p.add_argument("suite", type=Path, help="the suite file, e.g. configs/bench/quickstart.yaml")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/<suite name>)")
    p.add_argument("--seeds", type=int, default=None, help="use the first N seeds of the suite (more: continue)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help=f"run only these variants ({SINGLE_TASK}: baselines)")
    done = p.add_mutually_exclusive_group()
    done.add_argument("--resume", action="store_true", help="skip the (run, seed) pairs the CSV already holds")
    done.add_argument("--overwrite", action="store_true", help="discard the results CSV of an earlier benchmark")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands and stop")
    p.add_argument("--isolate", action="store_true", help="each run in a fresh Python process (~5 s more per run)")
    p.add_argument("--keep-going", action="store_true", help="after a failed run, go on with the others")
    p.add_argument(
        "--logger",
        type=Path,
        default=None,
        help="the runs' logger config, e.g. configs/logger/mlflow.yaml (default TensorBoard); each run is named "
        "after its variant and seed",
    )
    return p.parse_args(own), extra


def load_logger(path: Path | None) -> dict[str, Any] | None:
    """The logger config of ``--logger`` (a ``class_path`` with its ``init_args``), or None."""
    if path is None:
        return None
    try:
        logger = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SuiteError(
            f"--logger {path}: cannot read it ({err}); give a file such as configs/logger/mlflow.yaml"
        ) from None
    if not isinstance(logger, dict) or "class_path" not in logger:
        raise SuiteError(f"--logger {path}: a logger config has a class_path (and init_args), e.g. configs/logger/")
    return logger


def _command(spec: RunSpec) -> str:
    return f"mtl fit {shlex.join(spec.args)}   # then test on the best validation checkpoint"


def _check_logged(spec: RunSpec, result: RunResult, plan: Plan) -> None:
    for task in spec.job.tasks:
        key = plan.primaries[task].key
        if key not in result.metrics:
            raise SuiteError(
                f"run {spec.job.run!r} (seed {spec.seed}) did not log metric {key!r}; the test metrics it logged are "
                f"{sorted(result.metrics)}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a suite and write its table; returns the exit code (1 when a run failed)."""
    opts, extra = parse_args(sys.argv[1:] if argv is None else argv)
    suite = load_suite(opts.suite)
    variants = [SINGLE_TASK, *suite.variants]
    unknown = sorted(set(opts.only or ()) - set(variants))
    if unknown:
        raise SuiteError(f"--only names unknown variant(s) {unknown}; the suite's are {variants}")
    plan = make_plan(suite, extra)
    seeds = suite.pick_seeds(opts.seeds)
    out = opts.out if opts.out is not None else Path("runs") / "bench" / suite.name
    csv_path, md_path = out / "results.csv", out / "results.md"
    if opts.dry_run:
        if suite.tune:
            print(f"# each job is tuned first: {suite.tune['trials']} sweep trials over {list(suite.tune['space'])}")
        print("\n".join(_command(r) for r in plan.runs(seeds, out, opts.only, load_logger(opts.logger))))
        return 0
    if suite.tune:
        from mtl_lightning.bench.tuning import tune_plan

        plan = tune_plan(plan, suite.tune, out, opts.only)
    runs = plan.runs(seeds, out, opts.only, load_logger(opts.logger))
    if opts.overwrite:
        csv_path.unlink(missing_ok=True)
    existing = read_rows(csv_path)
    if existing and not opts.resume:
        raise SuiteError(f"{csv_path} already holds results: pass --resume to continue it or --overwrite to start over")
    done = done_runs(existing)
    todo = [r for r in runs if (r.job.run, r.seed) not in done]
    if len(todo) < len(runs):
        print(f"mtl-bench: {len(runs) - len(todo)} of {len(runs)} runs already in {csv_path}: skipped", file=sys.stderr)
    run = run_in_subprocess if opts.isolate else run_in_process
    failed = []
    for i, spec in enumerate(todo, 1):
        print(f"mtl-bench: [{i}/{len(todo)}] {spec.job.run} seed {spec.seed}", file=sys.stderr, flush=True)
        shutil.rmtree(spec.run_dir, ignore_errors=True)  # an interrupted attempt's logs and checkpoints
        try:
            result = run(spec.args)
            _check_logged(spec, result, plan)
        except Exception:
            if not opts.keep_going:
                raise
            failed.append(f"{spec.job.run} seed {spec.seed}")
            traceback.print_exc()
            continue
        append_rows(csv_path, rows_of(spec, result))
    rows = [r for r in read_rows(csv_path) if r.seed in seeds]
    table = markdown(summarise(rows, plan.primaries, list(suite.variants)), plan.primaries)
    command = shlex.join(["mtl-bench", *(sys.argv[1:] if argv is None else argv)])
    tested = ", ".join(sorted({r.checkpoint for r in rows})) or "none yet"
    note = (
        f"Suite `{suite.name}`, seeds {seeds}; checkpoint tested: {tested}. Test metrics as mean ± sample std over "
        "seeds; Δm% of each seed against the single-task means, lower is better, negative = better than single-task; "
        "its 95% t-interval, and Welch's t-test p-values of its per-seed Δm% against equal weighting and single-task."
        + (
            f" Tuned protocol: every job got {suite.tune['trials']} sweep trials over {list(suite.tune['space'])} on "
            "the validation split; its best configuration ran the seeds."
            if suite.tune
            else ""
        )
        + "\n"
        f"Command: `{command}`"
    )
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(f"{table}\n\n{note}\n")
    print(f"\n{table}\n\n{note}\nResults: {csv_path}, {md_path}")
    if failed:
        print(f"mtl-bench: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def console_main() -> None:
    """Console-script entry point (``mtl-bench``): bad input ends with one line and exit code 2."""
    try:
        code = main()
    except ConfigError as err:
        print(f"mtl-bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    console_main()
