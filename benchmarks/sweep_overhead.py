"""What `mtl sweep` costs over the runs it makes, and what local workers gain.

    python benchmarks/sweep_overhead.py                          # both parts, 3 paired rounds
    python benchmarks/sweep_overhead.py --rounds 5 --epochs 15   # a longer trial

1. Overhead per trial: `mtl fit` of the quickstart (static weights) against `mtl sweep --trials 1` of the same
   config (the same run, weights drawn from the simplex), paired in each round in a random order; the ratio's
   median and range over rounds. Also the sweep's fixed cost alone (`--trials 0`: parse, check, open the study, write
   the report), which does not grow with the trial's length, and the per-trial overhead over `--trials 3`.
2. Workers: `--workers 4` against `--workers 1` on the same number of short trials, each in a new folder; wall time,
   and that every trial ran exactly once (the study's trial count, distinct folders, all complete).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SWEEP = """
fixed: {model.init_args.balancer: mtl_lightning.balancers.StaticWeighting}
space: {model.init_args.balancer.init_args.weights: {type: simplex}}
objectives: [val/purchase/auroc, val/spend/mae]
sampler: {class_path: optuna.samplers.TPESampler, init_args: {seed: 0}}
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def mtl(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtl_lightning", *args]


def overhead(tmp: Path, rounds: int, epochs: int) -> dict[str, object]:
    sweep_file = tmp / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    common = ["--config", QUICKSTART, f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false"]
    weights = '--model.init_args.balancer.init_args.weights={"purchase": 0.34, "segment": 0.33, "spend": 0.33}'
    fit = mtl("fit", *common, "--model.init_args.balancer=mtl_lightning.balancers.StaticWeighting", weights)
    ratios, fits, sweeps, fixed = [], [], [], []
    for r in range(rounds):
        sides = ["fit", "sweep", "fixed"]
        random.shuffle(sides)
        for side in sides:
            out = tmp / f"{side}_{r}"
            if side == "fit":
                fits.append(
                    timed([*fit, f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"])
                )
            else:
                trials = "1" if side == "sweep" else "0"
                command = mtl("sweep", "--sweep", str(sweep_file), "--dir", str(out), "--trials", trials, *common)
                (sweeps if side == "sweep" else fixed).append(timed(command))
        ratios.append(sweeps[-1] / fits[-1])
        print(f"round {r}: fit {fits[-1]:.1f} s, sweep of 1 trial {sweeps[-1]:.1f} s, sweep of 0 {fixed[-1]:.1f} s")
    three = timed(mtl("sweep", "--sweep", str(sweep_file), "--dir", str(tmp / "three"), "--trials", "3", *common))
    return {
        "fit_s": statistics.median(fits),
        "sweep_1_trial_s": statistics.median(sweeps),
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "fixed_cost_s": statistics.median(fixed),
        "per_trial_overhead_3_trials": (three / 3) / statistics.median(fits) - 1,
    }


def workers(tmp: Path, trials: int, epochs: int) -> dict[str, object]:
    sweep_file = tmp / "sweep.yaml"
    sweep_file.write_text(SWEEP)
    result: dict[str, object] = {}
    for n in random.sample([1, 4], 2):
        out = tmp / f"workers_{n}"
        command = mtl(
            "sweep", "--config", QUICKSTART, "--sweep", str(sweep_file), "--dir", str(out), "--trials", str(trials),
            "--workers", str(n), f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
        )  # fmt: skip
        wall = timed(command)
        import optuna

        from mtl_lightning.sweep.storage import open_storage

        storage = open_storage(str(out / "study.journal"))
        study = optuna.load_study(study_name=out.name, storage=storage)
        states = [t.state.name for t in study.trials]
        folders = sorted(p.name for p in (out / "trials").iterdir())
        result[f"workers_{n}"] = {
            "wall_s": wall,
            "trials": len(states),
            "complete": states.count("COMPLETE"),
            "distinct_folders": len(set(folders)),
        }
        print(f"{n} worker(s): {wall:.1f} s for {len(states)} trials ({states.count('COMPLETE')} complete)")
    w1, w4 = result["workers_1"], result["workers_4"]
    assert isinstance(w1, dict) and isinstance(w4, dict)
    result["speedup_4_over_1"] = w1["wall_s"] / w4["wall_s"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15, help="the overhead trial's epochs (15: about a minute)")
    p.add_argument("--worker-trials", type=int, default=8)
    p.add_argument("--worker-epochs", type=int, default=2)
    p.add_argument("--only", choices=["overhead", "workers"], default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mtl-sweep-bench-") as tmp:
        results = {}
        if args.only in (None, "overhead"):
            results["overhead"] = overhead(Path(tmp), args.rounds, args.epochs)
        if args.only in (None, "workers"):
            results["workers"] = workers(Path(tmp), args.worker_trials, args.worker_epochs)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
