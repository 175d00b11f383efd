"""Per-step overhead of ``MultiTaskModule`` under Lightning against a plain hand-written PyTorch loop.

Every side trains the same model (``MLPEncoder`` + one linear head per task, AdamW, same initial weights) on the
same batches: the ``DataLoader`` of ``SyntheticDataModule.train_dataloader()`` (3 tasks: binary, multiclass 4,
regression; 64 features, batch 256, 10% missing labels as in the quickstart), with the same seed, the same
shuffling and the same number of torch threads.

(a) plain: forward, per-task masked losses (``mtl_lightning.losses.masked_loss``), mean, backward, AdamW step.
    No metrics, no logging: what a competent engineer writes by hand.
(b) mtl: ``lightning.Trainer`` + ``MultiTaskModule`` with the TensorBoardLogger, per-task train metrics on (the
    default), ``log_every_n_steps=50``, the progress bar ``mtl fit`` adds when a config names none
    (``mtl_lightning.lightning_cli.default_progress_bar``), no validation and no checkpointing.
(c) bare Lightning (``--no-bare`` skips it): (a)'s step as the ``training_step`` of a minimal LightningModule,
    under (b)'s Trainer settings but without a progress bar. It logs and measures nothing, so c/a is the
    overhead of Lightning itself and b/c what this project (and the progress bar) add on top.

Time per step is the wall time between the ends of two training steps, averaged over ``--steps`` steps after
``--warmup`` steps (``--clock cpu``: the process's CPU time instead, all its threads, which other processes on a
busy machine move less), so it includes data loading, every hook and logging, and the epoch boundaries that fall
inside the timed window (the train split holds 63 batches). The sides alternate (a, b, c, a, b, c, ...)
``--repeats`` times; the table shows each side's median ms/step and the median of the per-repeat ratios.

    python benchmarks/overhead.py                     # both models, about 2 minutes on 2 CPU cores
    python benchmarks/overhead.py --models tiny --progress-bar none --out overhead.json

Run it in a terminal: Rich draws its progress bar only when stdout is a terminal, so a piped run under-states
what a user pays for it (``script -qc "python benchmarks/overhead.py" /dev/null`` gives a piped run a terminal).
Other processes on the machine inflate both sides and widen the ratios' range; the 1-minute load average is
printed with the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

TASKS = [
    {"name": "purchase", "kind": "binary"},
    {"name": "segment", "kind": "multiclass", "num_outputs": 4},
    {"name": "spend", "kind": "regression"},
]
MODELS = {
    # name: (encoder hidden widths, default timed steps, description)
    "tiny": ([256], 600, "tiny MLP 64-256, 3 heads"),
    "10ms": ([1024, 1024], 150, "MLP 64-1024-1024, 3 heads (~10 ms plain step)"),
}
LR = 1e-3
SIDES = {"a": "plain", "b": "mtl", "c": "bare"}
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Run:
    model: str
    side: str
    repeat: int
    steps: int
    seconds: float
    final_loss: float
    ms_per_step: float = field(init=False)

    def __post_init__(self) -> None:
        self.ms_per_step = 1000.0 * self.seconds / self.steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 600 tiny, 150 10ms)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps before timing starts")
    p.add_argument("--repeats", type=int, default=5, help="interleaved (a, b, c) rounds per model")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads, all sides")
    p.add_argument(
        "--progress-bar",
        default="cli",
        help="(b)'s progress bar: cli (what `mtl fit` adds, the default), lightning (what a bare Trainer picks: "
        "Rich at 100 refreshes/s when rich is installed), rich, rich:N (N refreshes per second), tqdm, tqdm:N "
        "(redrawn every N batches) or none",
    )
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or the process's CPU time")
    p.add_argument("--log-every-n-steps", type=int, default=50, help="(b)'s and (c)'s trainer.log_every_n_steps")
    p.add_argument("--no-train-metrics", action="store_true", help="(b) with train_metrics=False")
    p.add_argument("--no-logger", action="store_true", help="(b) and (c) without the TensorBoard logger")
    p.add_argument("--no-bare", action="store_true", help="skip (c), the bare-Lightning side")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden widths of the 10ms model")
    p.add_argument("--missing-rate", type=float, default=0.1, help="fraction of missing labels per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the raw per-run numbers to this .json or .csv file")
    args = p.parse_args(argv)
    if not (
        args.progress_bar in ("cli", "lightning", "rich", "tqdm", "none")
        or args.progress_bar.startswith(("rich:", "tqdm:"))
    ):
        p.error(f"--progress-bar: unknown {args.progress_bar!r}")
    if args.hidden:
        MODELS["10ms"] = (list(args.hidden), 150, f"MLP 64-{'-'.join(map(str, args.hidden))}, 3 heads")
    return args


def quiet() -> None:
    """Keep the output to the table: Lightning's info lines and its expected warnings say nothing here."""
    import lightning.pytorch  # noqa: F401  (configures its loggers on import; set their levels after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*litlogger.*", ".*LeafSpec.*", ".*no `validation_step`.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def make_datamodule(args: argparse.Namespace):
    from mtl_lightning.data import SyntheticDataModule

    dm = SyntheticDataModule(
        tasks=TASKS, num_features=64, batch_size=256, missing_rate=args.missing_rate, seed=args.seed
    )
    dm.setup("fit")
    return dm


def build_parts(dm, hidden: list[int], seed: int) -> tuple[nn.Module, nn.ModuleDict]:
    """Encoder and heads exactly as MultiTaskModule builds them (same order, so the same initial weights)."""
    from mtl_lightning.encoders import MLPEncoder
    from mtl_lightning.heads import build_head

    torch.manual_seed(seed)
    encoder = MLPEncoder(dm.input_shape, hidden)
    heads = nn.ModuleDict({s.name: build_head(s, encoder.out_features) for s in dm.tasks})
    return encoder, heads


def plain_loss(encoder: nn.Module, heads: nn.ModuleDict, losses: dict, specs: dict, batch: dict) -> torch.Tensor:
    """The hand-written step: mean over tasks of each task's mean loss over its labelled rows."""
    from mtl_lightning.losses import masked_loss

    z = encoder(batch["inputs"])
    task_losses = []
    for name, spec in specs.items():
        out = heads[name](z)
        if spec.num_outputs == 1:
            out = out.squeeze(-1)
        s, c = masked_loss(losses[name], spec, out, batch["targets"][name])
        task_losses.append(s / c.clamp_min(1))
    return torch.stack(task_losses).mean()


# ------------------------------------------------------------------------------------------- (a) plain
def run_plain(dm, hidden: list[int], warmup: int, steps: int, seed: int, args=None) -> tuple[float, float]:
    from mtl_lightning.losses import build_loss

    encoder, heads = build_parts(dm, hidden, seed)
    specs = {s.name: s for s in dm.tasks}
    losses = {s.name: build_loss(s) for s in dm.tasks}
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=LR)
    encoder.train()
    heads.train()
    torch.manual_seed(seed)  # same shuffling as the Lightning sides
    loader = dm.train_dataloader()
    total = warmup + steps
    clock = CLOCKS[args.clock if args is not None else "wall"]
    step, start, loss = 0, 0.0, torch.zeros(())
    while step < total:
        for batch in loader:
            loss = plain_loss(encoder, heads, losses, specs, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == warmup:
                start = clock()
            if step == total:
                break
    return clock() - start, float(loss)


# ------------------------------------------------------------------------------------ Lightning sides
def timer_callback(warmup: int, total: int, clock: Callable[[], float] = time.perf_counter):
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """Timestamps at the end of step ``warmup`` and of the last step; a counter, so epochs do not matter."""

        def __init__(self) -> None:
            self.step, self.start, self.end, self.loss = 0, 0.0, 0.0, float("nan")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step += 1
            if self.step == warmup:
                self.start = clock()
            elif self.step == total:
                self.end = clock()
                self.loss = float(outputs["loss"])

    return StepTimer()


def cli_progress_bar() -> Any:
    """The bar ``mtl fit`` adds by default (an older tree without ``default_progress_bar``: its RichProgressBar)."""
    try:
        from mtl_lightning.lightning_cli import default_progress_bar
    except ImportError:  # before the function existed the CLI added RichProgressBar(refresh_rate=10)
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(refresh_rate=10)
    return default_progress_bar()


def progress_bar(kind: str) -> tuple[list[Any], bool]:
    """(callbacks, enable_progress_bar) of (b) for ``--progress-bar``."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    if kind == "cli":
        return [cli_progress_bar()], True
    if kind.startswith("rich"):  # "rich" or "rich:N" with N refreshes per second
        return [RichProgressBar(refresh_rate=int(kind.partition(":")[2] or 100))], True
    if kind.startswith("tqdm"):  # "tqdm" or "tqdm:N", redrawn every N batches
        return [TQDMProgressBar(refresh_rate=int(kind.partition(":")[2] or 1))], True
    return [], kind == "lightning"


def fit_timed(model, dm, warmup: int, steps: int, seed: int, args, bars: list[Any], bar: bool) -> tuple[float, float]:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    timer = timer_callback(warmup, warmup + steps, CLOCKS[args.clock])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=warmup + steps,
            max_epochs=-1,
            logger=False if args.no_logger else TensorBoardLogger(tmp, name="overhead"),
            log_every_n_steps=args.log_every_n_steps,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bar,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer, *bars],
        )
        torch.manual_seed(seed)  # same shuffling as (a)
        trainer.fit(model, datamodule=dm)
    return timer.end - timer.start, timer.loss


def run_mtl(dm, hidden: list[int], warmup: int, steps: int, seed: int, args) -> tuple[float, float]:
    from mtl_lightning import MultiTaskModule
    from mtl_lightning.encoders import MLPEncoder

    torch.manual_seed(seed)  # the module builds its heads right after: same initial weights as (a)
    model = MultiTaskModule(
        encoder=MLPEncoder(dm.input_shape, hidden),
        tasks=dm.tasks,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        train_metrics=not args.no_train_metrics,
    )
    return fit_timed(model, dm, warmup, steps, seed, args, *progress_bar(args.progress_bar))


def run_bare(dm, hidden: list[int], warmup: int, steps: int, seed: int, args) -> tuple[float, float]:
    from lightning.pytorch import LightningModule

    from mtl_lightning.losses import build_loss

    class Bare(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.heads = build_parts(dm, hidden, seed)
            self.specs = {s.name: s for s in dm.tasks}
            self.task_loss_fns = {s.name: build_loss(s) for s in dm.tasks}

        def training_step(self, batch, batch_idx):
            return plain_loss(self.encoder, self.heads, self.task_loss_fns, self.specs, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    return fit_timed(Bare(), dm, warmup, steps, seed, args, [], False)


# ------------------------------------------------------------------------------------------------ main
def measure(args: argparse.Namespace) -> list[Run]:
    args.load_before = os.getloadavg()[0]
    dm = make_datamodule(args)
    runs: list[Run] = []
    fns: dict[str, Callable[..., tuple[float, float]]] = {"a": run_plain, "b": run_mtl, "c": run_bare}
    if args.no_bare:
        del fns["c"]
    for name in args.models:
        hidden, default_steps, _ = MODELS[name]
        steps = args.steps or default_steps
        for fn in fns.values():  # one untimed run of each side: imports, allocator, first-call costs
            fn(dm, hidden, args.warmup, min(steps, 50), args.seed, args)
        for r in range(args.repeats):
            for side, fn in fns.items():
                seconds, loss = fn(dm, hidden, args.warmup, steps, args.seed, args)
                runs.append(Run(name, side, r, steps, seconds, loss))
                if torch.get_num_threads() != args.threads:
                    raise RuntimeError(f"torch threads changed to {torch.get_num_threads()} in side {side}")
    args.load_after = os.getloadavg()[0]
    return runs


def summarise(runs: list[Run], models: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        by_side = {s: [r for r in runs if r.model == name and r.side == s] for s in SIDES}
        a = by_side["a"]
        row: dict[str, Any] = {"model": name, "description": MODELS[name][2], "steps": a[0].steps}
        for side, side_runs in by_side.items():
            if not side_runs:
                continue
            row[f"{side}_ms"] = statistics.median(r.ms_per_step for r in side_runs)
            row[f"{side}_loss"] = side_runs[-1].final_loss
            if side != "a":
                ratios = [x.ms_per_step / y.ms_per_step for x, y in zip(side_runs, a, strict=True)]
                row[f"{side}/a"] = statistics.median(ratios)
                row[f"{side}/a_range"] = (min(ratios), max(ratios))
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import lightning
    import torchmetrics

    names = {"cli": f"cli ({describe_bar(cli_progress_bar())})", "lightning": "lightning (Rich, 100/s)"}
    bar = names.get(args.progress_bar, args.progress_bar)
    print(
        f"\ntorch {torch.__version__}, lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads {args.threads}; "
        f"1-min load average before/after: {args.load_before:.2f}/{args.load_after:.2f}"
    )
    print(
        f"(b) mtl: TensorBoardLogger {'off' if args.no_logger else 'on'}, train metrics "
        f"{'off' if args.no_train_metrics else 'on'}, log_every_n_steps={args.log_every_n_steps}, progress bar "
        f"{bar}, stdout a terminal: {sys.stdout.isatty()}; warmup {args.warmup} steps, {args.repeats} rounds, "
        f"{args.clock} clock"
    )
    head = f"{'model':<5} {'steps':>5} {'(a) plain':>10} {'(b) mtl':>9} {'b/a':>6} {'b/a range':>11}" + (
        "" if args.no_bare else f" {'(c) bare':>9} {'c/a':>6} {'b/c':>6}"
    )
    print(
        f"{'':<5} {'':>5} {'ms/step':>10} {'ms/step':>9}"
        + ("" if args.no_bare else f" {'':>6} {'':>11} {'ms/step':>9}")
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        lo, hi = r["b/a_range"]
        line = f"{r['model']:<5} {r['steps']:>5} {r['a_ms']:>10.3f} {r['b_ms']:>9.3f} {r['b/a']:>6.3f} {lo:>5.2f}-{hi:<5.2f}"
        if "c_ms" in r:
            line += f" {r['c_ms']:>9.3f} {r['c/a']:>6.3f} {r['b_ms'] / r['c_ms']:>6.3f}"
        print(line)
    print(
        "models: "
        + "; ".join(f"{r['model']} = {r['description']}" for r in rows)
        + "\nfinal-step loss a/b(/c), same data and initial weights: "
        + ", ".join(
            f"{r['model']} " + "/".join(f"{r[f'{s}_loss']:.4f}" for s in SIDES if f"{s}_loss" in r) for r in rows
        )
    )


def describe_bar(bar: Any) -> str:
    """A progress bar as the table names it, e.g. ``TQDMProgressBar, refresh_rate=10``."""
    return f"{type(bar).__name__}, refresh_rate={bar.refresh_rate}"


def write_out(path: str, runs: list[Run], rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(runs[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in runs)
        return
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    with open(path, "w") as f:
        json.dump({"args": vars(args), **meta, "runs": [asdict(r) for r in runs], "summary": rows}, f, indent=2)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    runs = measure(args)
    rows = summarise(runs, args.models)
    print_table(rows, args)
    if args.out:
        write_out(args.out, runs, rows, args)
        print(f"raw numbers: {args.out}")
    return rows


if __name__ == "__main__":
    main()
