"""Does sharing help on the built-in synthetic data? Multi-task (equal weights) vs single-task, by relatedness.

Single-task baselines use the same data module, with a static balancer that gives the other tasks weight 0: the
encoder then learns from one task only, on exactly the same rows as the multi-task model. The score per task is
its test metric (AUROC, accuracy, R2); Δ is multi-task minus single-task, so positive Δ means sharing helped.

    python benchmarks/synthetic_sharing.py --correlations 0 0.5 0.9 1.0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORES = {"purchase": "auroc", "segment": "accuracy", "spend": "r2"}


def run(correlation: float, seed: int, weights: dict[str, float] | None, args: argparse.Namespace) -> dict[str, float]:
    """Train once and return the test score of every task with non-zero weight."""
    from mtl_lightning.cli import main

    with tempfile.TemporaryDirectory() as root:
        cli_args = [
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--seed_everything",
            str(seed),
            "--data.init_args.seed",
            str(seed),
            "--data.init_args.correlation",
            str(correlation),
            "--data.init_args.num_samples",
            str(args.num_samples),
            "--data.init_args.val_fraction",
            "0.2",
            "--data.init_args.test_fraction",
            "0.4",
            "--data.init_args.missing_rate",
            "0",
            "--trainer.max_epochs",
            str(args.epochs),
            "--model.init_args.lr_scheduler.init_args.T_max",
            str(args.epochs),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.logger.init_args.save_dir",
            root,
            "--trainer.default_root_dir",
            root,
        ]
        if weights is not None:
            cli_args += [
                "--model.init_args.balancer",
                "mtl_lightning.balancers.StaticWeighting",
                "--model.init_args.balancer.init_args.weights",
                json.dumps(weights),
            ]
        fit = main(["fit", *cli_args])
        test = main(["test", *cli_args, "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path])
        metrics = test.trainer.callback_metrics
        active = [t for t in SCORES if weights is None or weights[t] > 0]
        return {t: float(metrics[f"test/{t}/{SCORES[t]}"]) for t in active}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 0.9, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=2500, help="rows in total (40%% train)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synthetic_sharing.csv")
    args = parser.parse_args()

    rows = []
    for corr in args.correlations:
        for seed in args.seeds:
            mtl = run(corr, seed, None, args)
            stl: dict[str, float] = {}
            for task in SCORES:
                stl.update(run(corr, seed, {t: float(t == task) for t in SCORES}, args))
            for task in SCORES:
                rows.append(
                    {
                        "correlation": corr,
                        "seed": seed,
                        "task": task,
                        "metric": SCORES[task],
                        "single_task": stl[task],
                        "multi_task": mtl[task],
                    }
                )
            print(
                f"corr={corr} seed={seed} " + " ".join(f"{t}: stl={stl[t]:.4f} mtl={mtl[t]:.4f}" for t in SCORES),
                file=sys.stderr,
            )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print(f"\n| correlation | task (metric) | single-task | multi-task | Δ (mean ± std over {len(args.seeds)} seeds) |")
    print("|---|---|---|---|---|")
    for corr in args.correlations:
        for task in SCORES:
            sel = [r for r in rows if r["correlation"] == corr and r["task"] == task]
            stl = [r["single_task"] for r in sel]
            mtl = [r["multi_task"] for r in sel]
            delta = [m - s for m, s in zip(mtl, stl, strict=True)]
            sd = statistics.stdev(delta) if len(delta) > 1 else 0.0
            print(
                f"| {corr} | {task} ({SCORES[task]}) | {statistics.mean(stl):.4f} | {statistics.mean(mtl):.4f} "
                f"| {statistics.mean(delta):+.4f} ± {sd:.4f} |"
            )
    print(f"\nraw numbers: {args.out}")


if __name__ == "__main__":
    main()
