"""Task grouping by measured affinity (TAG) on synthetic data with planted groups: does the measurement find the
groups, and do the proposed groups train better than all tasks together or each task alone?

Data: ``SyntheticDataModule`` with ``--tasks`` regression tasks in ``--planted`` groups (task ``t{i}`` in group
``i % planted``, so the groups are interleaved in the task order), weight vectors at cosine ``--correlation`` inside a
group and orthogonal across groups; targets standardised (an MSE of 1 predicts the mean). The data seed is the run's
seed; every model of a seed sees the same rows (70 / 10 / 20 % train / val / test).

Per seed:

1. **all together**: one model on every task, trained with the :class:`~mtl_lightning.callbacks.TaskAffinity`
   callback (``--every-n-steps``). The callback does not change the training (bit-identical weights, see
   tests/test_affinity.py), so this one run is both the affinity measurement (TAG trains once) and the
   all-tasks-together baseline.
2. **proposed groups**: the best partition into ``--groups`` groups of the averaged affinity
   (:func:`mtl_lightning.affinity.grouping.best_partitions`), then one model per group.
3. **single task**: one model per task.

Every model has the same architecture (an MLP encoder ``--hidden``, a linear head per task, AdamW at 3e-3 with a
cosine schedule, as ``configs/model/mlp.yaml``) and trains ``--epochs`` epochs; the *final* model is evaluated (no
model selection). A group or single-task model is the same module with only its tasks active
(``set_active_tasks``): the other heads see no rows and get no gradient. Reported: per-task validation MSE and the
mean over tasks (mean +- std over seeds), the test mean, and the parameters and training time of each setting.

Cost: in the all-together run the steps alternate (with ``--every-n-steps 2``) between measured and plain ones; the
time of each measured step is paired with the plain step right after it (the same model size, the next batch),
from the start of the step's batch hooks to their end (forward, backward, optimizer; data loading excluded). The
ratio's median and quartiles over all pairs are printed.

    python benchmarks/affinity_groups.py                    # 6 tasks in 3 planted groups, 3 seeds
    python benchmarks/affinity_groups.py --quick            # 1 seed, 4 epochs: a smoke run
    python benchmarks/affinity_groups.py --tasks 4 --planted 2 --seeds 2 --epochs 10
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback

METRIC = "mse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=6, help="regression tasks t0 .. t{N-1}")
    p.add_argument("--planted", type=int, default=3, help="planted groups (task i in group i %% planted)")
    p.add_argument("--groups", type=int, default=None, help="groups to propose (default: --planted)")
    p.add_argument("--correlation", type=float, default=0.9, help="cosine of the task directions inside a group")
    p.add_argument("--num-samples", type=int, default=2000, help="rows in total (70%% train, 10%% val, 20%% test)")
    p.add_argument("--num-features", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.5, help="label noise std")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 32], help="MLP encoder widths")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every-n-steps", type=int, default=2, help="TaskAffinity: measure every N steps")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (data and weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the models are tiny)")
    p.add_argument("--quick", action="store_true", help="1 seed, 4 epochs (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 4
    args.groups = args.groups or args.planted
    return args


def quiet() -> None:
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: lower them after it)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def task_names(args: argparse.Namespace) -> list[str]:
    return [f"t{i}" for i in range(args.tasks)]


def planted_groups(args: argparse.Namespace) -> list[list[str]]:
    names = task_names(args)
    return [[n for i, n in enumerate(names) if i % args.planted == g] for g in range(args.planted)]


def make_data(seed: int, args: argparse.Namespace) -> Any:
    from mtl_lightning.data import SyntheticDataModule
    from mtl_lightning.tasks import TaskSpec

    return SyntheticDataModule(
        [TaskSpec(n, "regression") for n in task_names(args)],
        num_samples=args.num_samples,
        num_features=args.num_features,
        correlation=args.correlation,
        noise=args.noise,
        groups=planted_groups(args),
        val_fraction=0.1,
        test_fraction=0.2,
        batch_size=args.batch_size,
        seed=seed,
    )


def make_model(active: list[str], args: argparse.Namespace) -> Any:
    from mtl_lightning import MultiTaskModule
    from mtl_lightning.encoders import MLPEncoder
    from mtl_lightning.tasks import TaskSpec

    model = MultiTaskModule(
        MLPEncoder((args.num_features,), hidden=args.hidden, dropout=0.1, norm="layer"),
        [TaskSpec(n, "regression") for n in task_names(args)],
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs),
        train_metrics=False,
    )
    model.set_active_tasks(active)
    return model


def trained_parameters(model: Any, active: list[str]) -> int:
    """The encoder's parameters and the active tasks' heads (inactive heads never train)."""
    return sum(p.numel() for p in model.encoder.parameters()) + sum(
        p.numel() for n in active for p in model.heads[n].parameters()
    )


class StepTimer(Callback):
    """Wall time of each training step, from its first batch hook to its last (make it the first callback)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        # global_step has moved on by one: the step that just ran is global_step - 1.
        self.steps.append((trainer.global_step - 1, time.perf_counter() - self._start))


def fit_and_evaluate(
    active: list[str], seed: int, args: argparse.Namespace, callbacks: list[Any]
) -> tuple[dict[str, float], dict[str, float], int, float]:
    """(val MSE per active task, test MSE per active task, trained parameters, fit seconds)."""
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(seed, verbose=False)
    model = make_model(active, args)
    data = make_data(seed, args)
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # nothing selects on validation: the final model is evaluated
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    evaluator = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    val = evaluator.validate(model, datamodule=data, verbose=False)[0]
    test = evaluator.test(model, datamodule=data, verbose=False)[0]
    return (
        {n: float(val[f"val/{n}/{METRIC}"]) for n in active},
        {n: float(test[f"test/{n}/{METRIC}"]) for n in active},
        trained_parameters(model, active),
        seconds,
    )


def paired_ratios(steps: list[tuple[int, float]], every: int) -> list[tuple[float, float]]:
    """(measured, plain) seconds of each measured step and the plain step right after it; the first pair is warm-up."""
    times = dict(steps)
    pairs = [(times[s], times[s + 1]) for s in sorted(times) if s % every == 0 and (s + 1) % every and s + 1 in times]
    return pairs[1:]


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from mtl_lightning.affinity.grouping import best_partitions
    from mtl_lightning.affinity.report import matrix_table, proposals_table
    from mtl_lightning.callbacks import TaskAffinity

    names = task_names(args)
    timer, affinity = StepTimer(), TaskAffinity(every_n_steps=args.every_n_steps)
    val, test, params, seconds = fit_and_evaluate(names, seed, args, [timer, affinity])
    out: dict[str, Any] = {"all together": (val, test, params, seconds)}
    z = affinity.affinity.tolist()
    proposals = best_partitions(z, args.groups, top=3)
    proposed = proposals[0].named(names)
    planted = planted_groups(args)
    recovered = sorted(map(sorted, proposed)) == sorted(map(sorted, planted))
    print(f"\nseed {seed}: affinity (row -> column), mean of {affinity.measurements} measured steps")
    print(matrix_table(z, names))
    print(proposals_table(proposals, names))
    print(f"planted groups {planted}: {'recovered' if recovered else 'NOT recovered'}")
    for setting, groups in (("proposed groups", proposed), ("single task", [[n] for n in names])):
        val, test, params, seconds = {}, {}, 0, 0.0
        for group in groups:
            v, t, p, s = fit_and_evaluate(group, seed, args, [])
            val.update(v)
            test.update(t)
            params, seconds = params + p, seconds + s
        out[setting] = (val, test, params, seconds)
    out["recovered"] = recovered
    out["pairs"] = paired_ratios(timer.steps, args.every_n_steps)
    return out


def summarise(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    names = task_names(args)
    settings = ("all together", "proposed groups", "single task")

    def spread(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    width = 22
    print(f"\nvalidation {METRIC} per task (mean over {len(results)} seed(s); lower is better)")
    print(f"{'task':<8}" + "".join(f"{s:>{width}}" for s in settings))
    for n in names:
        print(f"{n:<8}" + "".join(f"{spread([r[s][0][n] for r in results]):>{width}}" for s in settings))
    for label, index in (("val mean", 0), ("test mean", 1)):
        cells = [spread([statistics.mean(r[s][index].values()) for r in results]) for s in settings]
        print(f"{label:<8}" + "".join(f"{c:>{width}}" for c in cells))
    # Paired by seed (same data, same initial seed): the seeds differ in difficulty far more than the settings do.
    for setting in settings[1:]:
        ratios = [
            statistics.mean(r[setting][0].values()) / statistics.mean(r[settings[0]][0].values()) for r in results
        ]
        print(
            f"{setting} / all together, val mean per seed: median {statistics.median(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})"
        )
    ratios = [
        statistics.mean(r[settings[2]][0].values()) / statistics.mean(r[settings[1]][0].values()) for r in results
    ]
    print(
        f"single task / proposed groups, val mean per seed: median {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    params = [results[0][s][2] for s in settings]
    print(f"{'params':<8}" + "".join(f"{p:>{width},}" for p in params))
    secs = [statistics.mean(r[s][3] for r in results) for s in settings]
    print(f"{'fit s':<8}" + "".join(f"{s:>{width}.1f}" for s in secs))
    print("(fit s of 'all together' includes the affinity measurement)")
    print(f"planted groups recovered: {sum(r['recovered'] for r in results)} of {len(results)} seeds")
    pairs = [p for r in results for p in r["pairs"]]
    if pairs:
        ratios = sorted(m / p for m, p in pairs)
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        plain = statistics.median(p for _, p in pairs) * 1e3
        measured = statistics.median(m for m, _ in pairs) * 1e3
        print(
            f"measured step / plain step ({args.tasks} tasks, {len(pairs)} pairs): median {med:.2f}x "
            f"(quartiles {q1:.2f}-{q3:.2f}); median step {measured:.2f} ms measured, {plain:.2f} ms plain"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    print(
        f"{args.tasks} regression tasks in {args.planted} planted groups {planted_groups(args)}, correlation "
        f"{args.correlation} inside, 0 across; {args.num_samples} rows, d={args.num_features}, MLP {args.hidden}, "
        f"{args.epochs} epochs, batch {args.batch_size}, affinity every {args.every_n_steps} steps"
    )
    start = time.perf_counter()
    results = [run_seed(seed, args) for seed in range(args.seeds)]
    summarise(results, args)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
