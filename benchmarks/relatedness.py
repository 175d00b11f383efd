"""Shared-bottom vs MMoE vs PLE as task relatedness falls: the synthetic study of the MMoE paper, with this template.

Ma et al. (2018), "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD,
section 3.2 (the generator) and section 5 (results): two regression tasks whose weight vectors have cosine similarity
``correlation``; the paper reports that shared-bottom degrades as the tasks become less related while MMoE degrades
less.

Data: ``SyntheticDataModule`` (the paper's generator) with two regression tasks ``y1`` and ``y2`` (targets
standardised, so an MSE of 1 is predicting the mean), ``--num-samples`` rows split 70/10/20 (train/val/test). The data
seed is the run's seed and it draws, in order, the orthonormal basis, the inputs and the sine parameters, so for a
given seed every correlation shares the same inputs and sine terms: only the angle between the tasks changes, and
every architecture sees exactly the same rows.

Models (built in-process from the settings of ``configs/model/{shared_bottom,mmoe,ple}.yaml``: norm, dropout,
activation, AdamW lr and weight decay, cosine schedule over the run), every task with the same MLP head
(``--tower`` hidden units, the paper's per-task tower):

- ``shared_bottom``: one shared MLP layer of width H (``SharedBottom(shared=[H], tower=[])``), then the towers;
- ``mmoe``: ``--experts`` single-layer experts of ``--expert-width`` units and one softmax gate per task (the paper
  uses 8 single-layer experts);
- ``ple``: ``PLE`` with the levels and expert counts of ``ple.yaml`` and single-layer experts of width W.

MMoE's parameter count is the reference; H and W are chosen so that the whole models (encoder + heads) have about
the same number of parameters (printed). Each run trains ``--epochs`` epochs with batch ``--batch-size``, no logger,
no checkpoints and no progress bar, and the *final* model is tested (no early stopping, no model selection). The
score is the test MSE of each task and their mean (``test/loss``). For MMoE the script also records the gates'
overlap on the test rows, ``mean_n sum_i min(g1_i, g2_i)`` (1 = both tasks use the same experts, 0 = disjoint), and
for PLE the weight the task gates put on the shared experts (averaged over tasks and levels).

    python benchmarks/relatedness.py                 # 5 correlations x 3 architectures x 3 seeds
    python benchmarks/relatedness.py --quick         # 1 seed, correlations 0 and 1: a smoke run (writes nothing)
    python benchmarks/relatedness.py --correlations 0 0.5 0.9 1 --seeds 5 --num-samples 10000

Writes every run to ``--csv`` (default docs/relatedness.csv) and, when matplotlib is installed, test MSE against
correlation with std error bars to ``--plot`` (default docs/relatedness.png); ``--quick`` writes only where told.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("shared_bottom", "mmoe", "ple")
TASKS = ("y1", "y2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1); each draws new data and weights")
    p.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    p.add_argument("--num-samples", type=int, default=8000, help="rows in total (70%% train, 10%% val, 20%% test)")
    p.add_argument("--num-features", type=int, default=100, help="input dimension d (100 in the paper)")
    p.add_argument("--noise", type=float, default=0.1, help="label noise std (variance 0.01 as in the paper)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--experts", type=int, default=8, help="MMoE experts (8 in the paper)")
    p.add_argument("--expert-width", type=int, default=32, help="units of each single-layer MMoE expert")
    p.add_argument("--tower", type=int, default=16, help="hidden units of every task's tower (head)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the models are tiny)")
    p.add_argument("--quick", action="store_true", help="1 seed, correlations 0 and 1 (a smoke run)")
    p.add_argument("--csv", type=Path, default=None, help="per-run CSV (default docs/relatedness.csv)")
    p.add_argument("--plot", type=Path, default=None, help="PNG plot (default docs/relatedness.png)")
    args = p.parse_args(argv)
    if args.quick:  # a smoke run does not overwrite the documented results unless told where to write
        args.seeds, args.correlations = 1, [0.0, 1.0]
    else:
        args.csv = args.csv or REPO / "docs" / "relatedness.csv"
        args.plot = args.plot or REPO / "docs" / "relatedness.png"
    return args


def quiet() -> None:
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: lower them after it)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------- configs
def model_config(arch: str) -> dict[str, Any]:
    """``init_args`` of ``configs/model/<arch>.yaml`` (encoder settings, optimizer)."""
    with (REPO / "configs" / "model" / f"{arch}.yaml").open() as f:
        return yaml.safe_load(f)["init_args"]


def task_specs(args: argparse.Namespace) -> list[Any]:
    from mtl_lightning.tasks import TaskSpec

    return [TaskSpec(name, "regression", head_hidden=[args.tower]) for name in TASKS]


def build_encoder(arch: str, width: int, args: argparse.Namespace) -> torch.nn.Module:
    """The encoder of ``arch`` with its config's norm/dropout/activation and the given single-layer width."""
    from mtl_lightning.encoders import PLE, MMoE, SharedBottom

    enc = model_config(arch)["encoder"]["init_args"]
    common = {k: enc[k] for k in ("dropout", "norm", "activation")}
    shape = (args.num_features,)
    if arch == "shared_bottom":
        return SharedBottom(shape, shared=[width], tower=[], **common)
    if arch == "mmoe":
        return MMoE(shape, num_experts=args.experts, expert_hidden=[width], **common)
    levels = {k: enc[k] for k in ("num_levels", "num_shared_experts", "num_task_experts")}
    return PLE(shape, expert_hidden=[width], **levels, **common)


def build_model(arch: str, width: int, args: argparse.Namespace) -> Any:
    from mtl_lightning import MultiTaskModule

    opt = model_config(arch)["optimizer"]
    return MultiTaskModule(
        encoder=build_encoder(arch, width, args),
        tasks=task_specs(args),
        optimizer=functools.partial(getattr(torch.optim, opt["class_path"].rsplit(".", 1)[1]), **opt["init_args"]),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
        train_metrics=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_widths(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """``{arch: (width, parameters)}``: MMoE as given, the others at the width closest to MMoE's parameter count."""
    target = count_parameters(build_model("mmoe", args.expert_width, args))
    out = {"mmoe": (args.expert_width, target)}
    for arch in ("shared_bottom", "ple"):
        count = functools.cache(lambda w, arch=arch: count_parameters(build_model(arch, w, args)))
        lo, hi = 1, 8192  # the count grows with the width: bisect for the last width at or below the target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if count(mid) <= target else (lo, mid - 1)
        best = min((lo, lo + 1), key=lambda w: abs(count(w) - target))
        out[arch] = (best, count(best))
    return out


# ---------------------------------------------------------------------------------------------------- runs
def make_data(correlation: float, seed: int, args: argparse.Namespace) -> Any:
    from mtl_lightning.data import SyntheticDataModule

    return SyntheticDataModule(
        tasks=task_specs(args),
        num_samples=args.num_samples,
        num_features=args.num_features,
        correlation=correlation,
        noise=args.noise,
        val_fraction=0.1,
        test_fraction=0.2,
        batch_size=args.batch_size,
        seed=seed,
    )


@torch.no_grad()
def gate_statistic(arch: str, encoder: torch.nn.Module, x: torch.Tensor) -> float:
    """MMoE: overlap of the two tasks' gates; PLE: weight of the shared experts; shared-bottom: NaN."""
    encoder.eval()
    if arch == "mmoe":
        g1, g2 = (torch.softmax(encoder.gates[t](x), dim=-1) for t in TASKS)
        return float(torch.minimum(g1, g2).sum(-1).mean())
    if arch == "ple":
        shared, task_in, weights = x, dict.fromkeys(TASKS, x), []
        for level in encoder.levels:
            shared, task_in, gates = level(shared, task_in)
            weights += [float(g[:, encoder.num_task_experts :].sum(-1).mean()) for g in gates.values()]
        return statistics.mean(weights)
    return math.nan


def run_one(arch: str, width: int, data: Any, seed: int, args: argparse.Namespace) -> dict[str, float]:
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(seed, verbose=False)
    model = build_model(arch, width, args)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # nothing selects on validation: the final model is tested
        num_sanity_val_steps=0,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    x = data.datasets["test"].inputs
    return {
        "test_mse": metrics["test/loss"],
        **{f"test_mse_{t}": metrics[f"test/{t}/loss"] for t in TASKS},
        "gate_statistic": gate_statistic(arch, model.encoder, x),
        "train_seconds": seconds,
    }


# ------------------------------------------------------------------------------------------------- reports
def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def select(rows: list[dict[str, Any]], corr: float, arch: str, key: str) -> list[float]:
    return [
        r[key] for r in sorted(rows, key=lambda r: r["seed"]) if r["correlation"] == corr and r["architecture"] == arch
    ]


def print_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    archs = args.architectures
    n = args.seeds
    print(f"\nTest MSE averaged over the two tasks (mean ± std over {n} seed{'s' * (n > 1)}; lower is better)\n")
    deltas = [a for a in archs if a != "shared_bottom"] if "shared_bottom" in archs else []
    header = ["correlation", *archs, *(f"{a} - shared_bottom (paired)" for a in deltas)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for corr in args.correlations:
        cells = [mean_std(select(rows, corr, a, "test_mse")) for a in archs]
        base = select(rows, corr, "shared_bottom", "test_mse") if deltas else []
        for a in deltas:
            diff = [m - b for m, b in zip(select(rows, corr, a, "test_mse"), base, strict=True)]
            sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
            cells.append(f"{statistics.mean(diff):+.4f} ± {sd:.4f}")
        print(f"| {corr} | " + " | ".join(cells) + " |")

    print("\nPer task: test MSE of y1 / y2 (mean ± std)\n")
    print("| correlation | " + " | ".join(f"{a} {t}" for a in archs for t in TASKS) + " |")
    print("|---|" + "---|" * (len(archs) * len(TASKS)))
    for corr in args.correlations:
        cells = [mean_std(select(rows, corr, a, f"test_mse_{t}")) for a in archs for t in TASKS]
        print(f"| {corr} | " + " | ".join(cells) + " |")

    gated = [a for a in archs if a in ("mmoe", "ple")]
    if gated:
        names = {"mmoe": "MMoE gate overlap (1 = same experts)", "ple": "PLE weight on shared experts"}
        print("\nGates on the test rows (mean ± std)\n")
        print("| correlation | " + " | ".join(names[a] for a in gated) + " |")
        print("|---|" + "---|" * len(gated))
        for corr in args.correlations:
            print(f"| {corr} | " + " | ".join(mean_std(select(rows, corr, a, "gate_statistic")) for a in gated) + " |")


def plot(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed in this environment: no plot written ({args.plot} skipped)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in args.architectures:
        values = [select(rows, c, arch, "test_mse") for c in args.correlations]
        means = [statistics.mean(v) for v in values]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(args.correlations, means, yerr=sds, marker="o", capsize=3, label=arch)
    ax.set_xlabel("task correlation (cosine of the weight vectors)")
    ax.set_ylabel("test MSE, mean of the two tasks")
    ax.set_title(f"Synthetic two-task regression ({args.seeds} seeds, ±1 std)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    widths = matched_widths(args)
    print("Parameters (encoder + two towers/heads):")
    for arch in args.architectures:
        width, params = widths[arch]
        print(f"  {arch:<14} {params:>7,d}  (single-layer width {width})")

    rows: list[dict[str, Any]] = []
    for corr in args.correlations:
        for seed in range(args.seeds):
            data = make_data(corr, seed, args)
            for arch in args.architectures:
                width, params = widths[arch]
                result = run_one(arch, width, data, seed, args)
                rows.append({"correlation": corr, "seed": seed, "architecture": arch, "width": width})
                rows[-1].update(parameters=params, **result)
                print(
                    f"corr={corr} seed={seed} {arch:<14} test MSE {result['test_mse']:.4f} "
                    f"(y1 {result['test_mse_y1']:.4f}, y2 {result['test_mse_y2']:.4f}) {result['train_seconds']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )

    print_tables(rows, args)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nraw numbers: {args.csv}")
    if args.plot is not None:
        plot(rows, args)
    if args.quick and args.csv is None and args.plot is None:
        print("\n--quick: nothing written (give --csv/--plot to keep the numbers)")
    print(f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
