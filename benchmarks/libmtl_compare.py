"""Training-step time of ``MultiTaskModule`` under Lightning against LibMTL's ``Trainer``, same model and batches.

LibMTL (https://github.com/median-research-group/LibMTL) is not on PyPI here and is not a dependency: point
``--libmtl`` (or ``$LIBMTL``) at a checkout, the folder holding the ``LibMTL`` package. Without one the script says so
and exits. It imports ``torch_geometric`` and ``cvxpy`` at module level for methods not timed here: a missing one is
replaced by an empty stand-in module for this process only. LibMTL hard-codes ``cuda:0``; the trainer is subclassed
to run on the CPU (its ``device`` is set before the model is built), nothing else of it is changed.

Both sides train the same model from the same initial weights on the same batches: ``MLPEncoder`` 64 -> 256 -> 256
(ReLU) and one ``Linear(256, 1)`` head per task, T binary tasks (T in ``--tasks``, default 2, 10 and 40), batches of
256 rows cycled from 8 fixed in-memory batches (no data loading on either side: each library gets a Python list it
iterates), Adam with lr 1e-3 (LibMTL's trainer offers no AdamW), ``--threads`` torch threads.

Sides, for each method LibMTL and this project both have (``--methods``: EW, DWA, RLW, GLS, UW):

- **LibMTL**: ``Trainer.train`` (its ``train_singlelevel`` loop) as its users run it: per step the batch, the forward,
  each task's loss through its ``AbsLoss`` (one ``.item()`` per task), the meter's per-task metric update (a binary
  accuracy in LibMTL's ``AccMetric`` style, one ``.item()`` per task), ``zero_grad``, the weighting's ``backward``
  and ``optimizer.step()``. Its epoch-end work (scores, printing, the test pass) falls outside the timed steps.
- **ours**: ``lightning.Trainer`` + ``MultiTaskModule`` with the balancer of the same method, configured as
  ``mtl fit`` configures a run by default: the progress bar the CLI adds (``default_progress_bar``), a
  TensorBoardLogger, per-task train metrics on (binary: accuracy, F1, AUROC), ``log_every_n_steps=50``; no validation
  and no checkpoint inside the timed steps (both happen at epoch ends, which fall outside them).

What is timed, the same way on both sides: a post-step hook on the optimizer stamps the end of every
``optimizer.step()``; a side's time per step is (stamp of step ``warmup + steps`` - stamp of step ``warmup``) /
``steps``, so it covers everything either loop does between two optimizer steps, inside one epoch. Each round times
every (method, side) pair of a T once, in a seeded random order; the table gives each side's median ms/step and the
median (and interquartile range) over rounds of the per-round ratio ours / LibMTL.

``--check-updates`` also takes one SGD step (lr 1) on both sides from the same weights on the same batch and prints how
far apart the two encoder updates point (the largest entry of the difference of the unit-norm updates) and the ratio
of their norms: where the definitions match up to the scale of the loss (LibMTL's EW sums the task losses, our equal
weighting takes their mean, a factor T) the directions agree to rounding.

    python benchmarks/libmtl_compare.py --libmtl /tmp/libmtl                # T = 2, 10, 40; ~10 min on 2 CPU cores
    python benchmarks/libmtl_compare.py --libmtl /tmp/libmtl --tasks 10 --methods EW DWA --repeats 15
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURES, HIDDEN, BATCH, NUM_BATCHES, LR = 64, [256, 256], 256, 8, 1e-3
# LibMTL weighting name -> (our balancer class in mtl_lightning.balancers, its init args, LibMTL weight_args)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "EW": ("EqualWeighting", {}, {}),
    "DWA": ("DWA", {"temperature": 2.0}, {"T": 2.0}),
    "RLW": ("RandomLossWeighting", {}, {}),
    "GLS": ("GeometricMean", {}, {}),
    "UW": ("UncertaintyWeighting", {}, {}),
}
SIDES = ("libmtl", "ours")


@dataclass
class Timing:
    tasks: int
    method: str
    side: str
    ms: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libmtl", default=os.environ.get("LIBMTL"), help="folder holding the LibMTL package ($LIBMTL)")
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40], help="numbers of tasks T")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=15, help="rounds; each times every (method, side) pair once")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones, in the same epoch")
    p.add_argument("--steps", type=int, default=100, help="timed steps per side and round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-updates", action="store_true", help="compare both sides' weights after a few steps")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--out", default=None, help="write the per-round numbers to this .csv file")
    return p.parse_args(argv)


def quiet() -> None:
    """Keep the output to the table: Lightning's info lines and expected warnings say nothing here."""
    import lightning.pytorch  # noqa: F401  (configures its loggers on import; set their levels after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------------------------ LibMTL
def import_libmtl(path: str | None) -> types.ModuleType | None:
    """LibMTL from ``path``, with empty stand-ins for its module-level imports that are not installed."""
    if not path or not os.path.isdir(os.path.join(path, "LibMTL")):
        return None
    sys.path.insert(0, path)
    for name in ("torch_geometric", "cvxpy"):  # imported by LibMTL.trainer; used only by methods not timed here
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    with contextlib.redirect_stdout(io.StringIO()):
        import LibMTL

    return LibMTL


def libmtl_parts(lib: types.ModuleType) -> tuple[type, type, type]:
    """(a CPU Trainer, a BCE loss, a binary-accuracy metric) in LibMTL's own classes and style."""
    from LibMTL import Trainer
    from LibMTL.loss import AbsLoss
    from LibMTL.metrics import AbsMetric

    class CPUTrainer(Trainer):
        def _prepare_model(self, *args: Any, **kwargs: Any) -> None:
            self.device = torch.device("cpu")  # LibMTL's __init__ sets cuda:0 just before building the model
            super()._prepare_model(*args, **kwargs)

    class BCELoss(AbsLoss):
        def compute_loss(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(pred.squeeze(-1), gt)

    class BinaryAccMetric(AbsMetric):  # LibMTL's AccMetric, for one logit
        def update_fun(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
            self.record.append(((pred.squeeze(-1) > 0).float() == gt).sum().item())
            self.bs.append(pred.size()[0])

        def score_fun(self) -> list[float]:
            return [sum(self.record) / sum(self.bs)]

    return CPUTrainer, BCELoss, BinaryAccMetric


def build_libmtl(lib: types.ModuleType, method: str, names: list[str], ours: nn.Module, sgd: bool = False) -> Any:
    """LibMTL's trainer with the HPS architecture, ``method``'s weighting and ``ours``'s initial weights."""
    from mtl_lightning.encoders import MLPEncoder

    trainer_cls, loss_cls, metric_cls = libmtl_parts(lib)
    task_dict = {
        n: {"metrics": ["Acc"], "metrics_fn": metric_cls(), "loss_fn": loss_cls(), "weight": [1]} for n in names
    }
    decoders = nn.ModuleDict({n: nn.Linear(HIDDEN[-1], 1) for n in names})
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = trainer_cls(
            task_dict=task_dict,
            weighting=method,
            architecture="HPS",
            encoder_class=functools.partial(MLPEncoder, (FEATURES,), hidden=HIDDEN),
            decoders=decoders,
            rep_grad=False,
            multi_input=False,
            optim_param={"optim": "sgd", "lr": 1.0} if sgd else {"optim": "adam", "lr": LR},
            scheduler_param=None,
            weight_args=METHODS[method][2],
            arch_args={},
        )
    trainer.model.encoder.load_state_dict(ours.encoder.state_dict())
    for n in names:
        trainer.model.decoders[n].load_state_dict(ours.heads[n].net[0].state_dict())
    return trainer


def libmtl_batches(batches: Any) -> Batches:
    """The same batches as LibMTL's loaders give them: ``(inputs, {task: labels})``."""
    items = [(b["inputs"], dict(b["targets"])) for b in batches]
    return Batches(items, len(items))


# -------------------------------------------------------------------------------------------------- ours
def build_ours(method: str, names: list[str], seed: int, sgd: bool = False) -> nn.Module:
    import mtl_lightning.balancers as balancers
    from mtl_lightning import MultiTaskModule
    from mtl_lightning.encoders import MLPEncoder

    cls_name, init_args, _ = METHODS[method]
    torch.manual_seed(seed)
    return MultiTaskModule(
        encoder=MLPEncoder((FEATURES,), hidden=HIDDEN),
        tasks=[{"name": n, "kind": "binary"} for n in names],
        balancer=getattr(balancers, cls_name)(**init_args),
        optimizer=(lambda params: torch.optim.SGD(params, lr=1.0)) if sgd else (lambda p: torch.optim.Adam(p, lr=LR)),
    )


def make_batches(names: list[str], seed: int) -> list[dict[str, Any]]:
    """8 batches of a fixed random problem: each task's label is the sign of its own random projection."""
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(FEATURES, len(names), generator=gen)
    out = []
    for _ in range(NUM_BATCHES):
        x = torch.randn(BATCH, FEATURES, generator=gen)
        y = (x @ w + 0.5 * torch.randn(BATCH, len(names), generator=gen) > 0).float()
        out.append({"inputs": x, "targets": {n: y[:, i].contiguous() for i, n in enumerate(names)}})
    return out


class Batches:
    """``n`` batches cycled from a list: an iterable with a length, which both loops take as their loader (Lightning
    would read a bare list as several loaders)."""

    def __init__(self, batches: list[Any], n: int) -> None:
        self.items = [batches[i % len(batches)] for i in range(n)]

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def cycled(batches: list[Any], n: int) -> Batches:
    return Batches(batches, n)


# ------------------------------------------------------------------------------------------------ timing
class StepStamps:
    """Timestamps of the ends of ``optimizer.step()`` calls (a post-step hook), the same on both sides."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())

    def ms_per_step(self, warmup: int, steps: int) -> float:
        return 1000.0 * (self.stamps[warmup + steps - 1] - self.stamps[warmup - 1]) / steps


def run_libmtl(lib, method: str, names: list[str], batches, args: argparse.Namespace, steps: int) -> float:
    trainer = build_libmtl(lib, method, names, build_ours(method, names, args.seed))
    stamps = StepStamps()
    trainer.optimizer.register_step_post_hook(stamps)
    data = libmtl_batches(cycled(batches, args.warmup + steps))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per epoch, after the timed steps
        trainer.train(data, libmtl_batches(batches[:1]), epochs=1)
    return stamps.ms_per_step(args.warmup, steps)


def cli_progress_bar() -> Any:
    """The bar ``mtl fit`` adds by default (an older tree without ``default_progress_bar``: its RichProgressBar)."""
    try:
        from mtl_lightning.lightning_cli import default_progress_bar
    except ImportError:  # before the function existed the CLI added RichProgressBar(refresh_rate=10)
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(refresh_rate=10)
    return default_progress_bar()


def run_ours(method: str, names: list[str], batches, args: argparse.Namespace, steps: int) -> float:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    stamps = StepStamps()

    class HookOptimizer(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            trainer.optimizers[0].register_step_post_hook(stamps)

    model = build_ours(method, names, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.warmup + steps,
            logger=TensorBoardLogger(tmp, name="libmtl_compare"),
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[HookOptimizer(), cli_progress_bar()],
        )
        trainer.fit(model, train_dataloaders=cycled(batches, args.warmup + steps))
    return stamps.ms_per_step(args.warmup, steps)


def check_updates(lib, method: str, names: list[str], batches, args: argparse.Namespace) -> tuple[float, float]:
    """(largest difference of the two unit-norm encoder updates, LibMTL's update norm / ours) after one step.

    One step of SGD with lr 1 from the same weights on the same batch, so each side's update is minus its gradient:
    where the methods agree up to the scale of the loss (LibMTL's EW sums the losses, ours takes their mean) the
    directions agree to rounding and the norm ratio is that scale.
    """
    from lightning.pytorch import Trainer

    model = build_ours(method, names, args.seed, sgd=True)
    theirs = build_libmtl(lib, method, names, model, sgd=True)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    data = cycled(batches, 1)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs.train(libmtl_batches(data), libmtl_batches(batches[:1]), epochs=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=data)
    ours_w = dict(model.encoder.named_parameters())
    d_theirs = torch.cat([(p.detach() - before[n]).flatten() for n, p in theirs.model.encoder.named_parameters()])
    d_ours = torch.cat([(ours_w[n].detach() - before[n]).flatten() for n in before])
    ratio = float(d_theirs.norm() / d_ours.norm())
    return float((d_theirs / d_theirs.norm() - d_ours / d_ours.norm()).abs().max()), ratio


def measure(lib, args: argparse.Namespace) -> list[Timing]:
    timings: list[Timing] = []
    rng = random.Random(args.seed)
    for t in args.tasks:
        names = [f"t{i}" for i in range(t)]
        batches = make_batches(names, args.seed)
        fns: dict[str, Callable[[str, int], float]] = {
            "libmtl": lambda m, n, names=names, batches=batches: run_libmtl(lib, m, names, batches, args, n),
            "ours": lambda m, n, names=names, batches=batches: run_ours(m, names, batches, args, n),
        }
        pairs = {(m, s): Timing(t, m, s) for m in args.methods for s in SIDES}
        for m, s in pairs:  # one short untimed run of each: imports, allocator, first-call costs
            fns[s](m, 10)
        for _ in range(args.repeats):
            order = list(pairs)
            rng.shuffle(order)
            for m, s in order:
                pairs[(m, s)].ms.append(fns[s](m, args.steps))
        timings += pairs.values()
    return timings


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def report(
    timings: list[Timing], checks: dict[tuple[int, str], tuple[float, float]], args: argparse.Namespace
) -> list[dict]:
    import lightning

    by = {(x.tasks, x.method, x.side): x for x in timings}
    rows = []
    for t in args.tasks:
        for m in args.methods:
            theirs, ours = by[(t, m, "libmtl")], by[(t, m, "ours")]
            ratios = [o / lm for o, lm in zip(ours.ms, theirs.ms, strict=True)]
            lo, hi = quartiles(ratios)
            rows.append(
                {
                    "T": t,
                    "method": m,
                    "balancer": METHODS[m][0],
                    "libmtl_ms": statistics.median(theirs.ms),
                    "ours_ms": statistics.median(ours.ms),
                    "ratio": statistics.median(ratios),
                    "iqr": (lo, hi),
                    "check": checks.get((t, m)),
                }
            )
    bar = cli_progress_bar()
    print(
        f"\ntorch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, torch threads {args.threads}; 1-min load average before/after: "
        f"{args.load_before:.2f}/{args.load_after:.2f}; stdout a terminal: {sys.stdout.isatty()}; ours with "
        f"{type(bar).__name__}(refresh_rate={bar.refresh_rate}); {args.repeats} rounds of {args.warmup} + "
        f"{args.steps} steps"
    )
    head = ["T", "LibMTL", "ours", "LibMTL ms/step", "ours ms/step", "ours / LibMTL", "IQR"]
    if checks:
        head += ["update direction: max diff", "norm LibMTL / ours"]
    lines = []
    for r in rows:
        line = [
            str(r["T"]),
            r["method"],
            r["balancer"],
            f"{r['libmtl_ms']:.3f}",
            f"{r['ours_ms']:.3f}",
            f"**{r['ratio']:.2f}**" if args.markdown else f"{r['ratio']:.2f}",
            f"{r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}",
        ]
        if checks:
            line += ["", ""] if r["check"] is None else [f"{r['check'][0]:.1e}", f"{r['check'][1]:.3f}"]
        lines.append(line)
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        print("\n".join("| " + " | ".join(x) + " |" for x in lines))
    else:
        widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in lines))
    return rows


def write_csv(path: str, timings: list[Timing]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tasks", "method", "side", "round", "ms_per_step"])
        for x in timings:
            writer.writerows([x.tasks, x.method, x.side, i, ms] for i, ms in enumerate(x.ms))


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    lib = import_libmtl(args.libmtl)
    if lib is None:
        print(
            f"LibMTL not found (--libmtl {args.libmtl!r}): give the folder that holds the LibMTL package, e.g. a "
            "checkout of https://github.com/median-research-group/LibMTL; nothing was measured."
        )
        return None
    quiet()
    torch.set_num_threads(args.threads)
    checks: dict[tuple[int, str], tuple[float, float]] = {}
    if args.check_updates:
        for t in args.tasks:
            names = [f"t{i}" for i in range(t)]
            for m in args.methods:
                if m != "RLW":  # random weights: the two libraries draw different ones
                    checks[(t, m)] = check_updates(lib, m, names, make_batches(names, args.seed), args)
    args.load_before = os.getloadavg()[0]
    timings = measure(lib, args)
    args.load_after = os.getloadavg()[0]
    rows = report(timings, checks, args)
    if args.out:
        write_csv(args.out, timings)
        print(f"per-round numbers: {args.out}")
    return rows


if __name__ == "__main__":
    main()
