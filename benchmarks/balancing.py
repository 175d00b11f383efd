"""Training-step time of every balancer relative to equal weighting, and parameter mode against TorchJD's recipe.

Every side trains the same model: ``MLPEncoder`` (``--features`` 64 -> ``--hidden`` 256, 256) and one linear head
per task, T binary tasks (T in ``--tasks``, default 2, 10 and 40), batches of ``--batch-size`` 256 rows cycled from
8 fixed batches, AdamW, the same initial weights for every side of a given T.

A *step* of ``MultiTaskModule`` is what Lightning's automatic optimisation runs, called directly in a loop with no
``Trainer`` (so Lightning's own ~0.6 ms of per-step hooks, the progress bar and the loggers, the same for every
method, do not dilute the ratios): ``training_step`` (forward, masked per-task losses, the balancer), ``backward``,
``optimizer.step``, ``zero_grad`` and ``on_train_batch_end`` (where stateful balancers such as FAMO learn). A stub
trainer says "do not log this step" (Lightning writes step values every ``log_every_n_steps`` steps only), so
balancer telemetry is off as on 49 of 50 steps by default; train metrics are off (``--train-metrics`` turns them on).

Sides, all timed in the same rounds:

- every class exported by ``mtl_lightning.balancers`` that subclasses ``Balancer``, built with its defaults
  (loss-weighting ones added later are picked up; classes that fail to build or to run a step are listed as skipped
  with the reason); gradient methods in representation mode (their default);
- gradient methods with two implementations of their weighting (``impl: fast | torchjd``) also with the one that
  is not their default, as "Method (impl=...)";
- gradient methods that have a parameter mode, as ``Method(mode="parameter")`` (its default Gramian, one T-batched
  backward to the encoder's parameters), and UPGrad also as ``UPGrad(mode="parameter", gramian="autogram")``;
- TorchJD's own recipes on the same encoder and heads, with TorchJD's ``UPGrad``: ``mtl_backward(losses, features=z)``
  + ``jac_to_grad(encoder parameters, UPGrad())`` + ``optimizer.step()`` (autojac, the full Jacobian: what
  ``gramian="batched"`` computes), and ``Engine(encoder leaves).compute_gramian(losses)`` + ``UPGradWeighting`` +
  ``losses.backward(weights)`` (autogram, what ``gramian="autogram"`` uses inside);
- with ``--walk-heads-twice``, every gradient-method side again as "(heads walked twice)": the module gives the
  balancer no task parameters (as under FSDP), so the heads' gradients, and in parameter mode the encoder's, come
  from a second walk in Lightning's backward instead of being handed over.

Each round times every side once, in a new (seeded) random order, so drifts of the machine and the after-effects of
an expensive neighbour hit all sides alike: ``--warmup`` untimed steps, then enough steps for ``--min-time``
seconds (at least ``--min-steps``). Over ``--repeats`` rounds the table gives each side's median ms/step and the
median of its per-round ratios to equal weighting (EqualWeighting).

    python benchmarks/balancing.py                          # T = 2, 10, 40; about 2.5 minutes on 2 CPU cores
    python benchmarks/balancing.py --tasks 10 --methods UPGrad FAMO --out balancing.csv
"""

from __future__ import annotations

import argparse
import csv
import functools
import inspect
import logging
import math
import os
import platform
import random
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

BASELINE = "EqualWeighting"
TORCHJD_SIDES = ("torchjd autojac: mtl_backward+jac_to_grad", "torchjd autogram: Engine+UPGradWeighting")
AUTOGRAM_SIDE = "UPGrad (parameter, autogram)"  # our parameter mode with gramian="autogram", against TorchJD's
TWICE_SUFFIX = " (heads walked twice)"  # --walk-heads-twice: a side without the hand-over
# Published time per epoch relative to equal weighting on CelebA (40 tasks), given with this benchmark's targets.
PUBLISHED_CELEBA = {"PCGrad": 8.1, "NashMTL": 6.1, "MGDA": 5.6, "CAGrad": 4.5, "FAMO": 1.08}


@dataclass
class Side:
    name: str
    kind: str  # "representation" (the balancer's default), "parameter", "torchjd", "loss"
    step: Callable[[int], None]
    ms: list[float] = field(default_factory=list)
    steps: int = 0


@dataclass
class Skipped:
    name: str
    tasks: int
    reason: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40], help="numbers of tasks T")
    p.add_argument("--methods", nargs="+", default=None, help="balancer class names to time (default: all)")
    p.add_argument("--no-parameter-mode", action="store_true", help="skip parameter mode and the TorchJD sides")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each side once per round)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds timed per side per round")
    p.add_argument("--min-steps", type=int, default=3, help="steps timed per side per round, at least")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side per round")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--train-metrics", action="store_true", help="update the per-task train metrics every step")
    p.add_argument(
        "--walk-heads-twice",
        action="store_true",
        help="also time each gradient method with the heads' gradients not handed over (Lightning's backward walks "
        "the heads, and in parameter mode the encoder, a second time): the gain of the hand-over, side by side",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every timed round as CSV")
    return p.parse_args(argv)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------- data
def make_batches(num_tasks: int, args: argparse.Namespace, count: int = 8) -> list[dict[str, Any]]:
    """``count`` fixed batches of binary tasks, each a noisy threshold of its own random projection."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    directions = torch.randn(num_tasks, args.features, generator=gen)
    batches = []
    for _ in range(count):
        x = torch.randn(args.batch_size, args.features, generator=gen)
        signal = x @ directions.T + 0.5 * torch.randn(args.batch_size, num_tasks, generator=gen)
        batches.append({"inputs": x, "targets": {f"t{i}": (signal[:, i] > 0).float() for i in range(num_tasks)}})
    return batches


def task_specs(num_tasks: int) -> list[Any]:
    from mtl_lightning.tasks import TaskSpec

    return [TaskSpec(f"t{i}", "binary") for i in range(num_tasks)]


# ----------------------------------------------------------------------------------------------- balancers
def exported_balancers() -> dict[str, type]:
    """Every class exported by ``mtl_lightning.balancers`` that subclasses ``Balancer``, but the base classes."""
    import mtl_lightning.balancers as balancers

    names = getattr(balancers, "__all__", dir(balancers))
    bases = (balancers.Balancer, balancers.GradientBalancer)  # base classes, not methods
    found = {}
    for name in names:
        obj = getattr(balancers, name, None)
        if inspect.isclass(obj) and issubclass(obj, balancers.Balancer) and obj not in bases:
            found[name] = obj
    return found


def has_parameter_mode(cls: type) -> bool:
    from mtl_lightning.balancers import GradientBalancer

    return issubclass(cls, GradientBalancer) and "mode" in inspect.signature(cls).parameters


class _StubTrainer(SimpleNamespace):
    """What ``MultiTaskModule.training_step`` reads from its trainer: one process, and "this step is not logged"."""

    def __init__(self) -> None:
        super().__init__(
            world_size=1,
            global_step=0,
            fast_dev_run=False,
            is_last_batch=False,
            _logger_connector=SimpleNamespace(should_update_logs=False),
        )


def build_module(balancer: nn.Module, num_tasks: int, args: argparse.Namespace):
    from mtl_lightning.encoders.mlp import MLPEncoder
    from mtl_lightning.module import MultiTaskModule

    torch.manual_seed(args.seed)  # the same initial weights for every side of a given T
    encoder = MLPEncoder((args.features,), hidden=args.hidden)
    model = MultiTaskModule(encoder, task_specs(num_tasks), balancer=balancer, train_metrics=args.train_metrics)
    model.trainer = _StubTrainer()
    model._log_every_train_step = False  # set by setup() under a Trainer; nothing here monitors a train/ value
    return model


def module_side(
    name: str, kind: str, make: Callable[[], nn.Module], batches, num_tasks, args, hand_over: bool = True
) -> Side:
    model = build_module(make(), num_tasks, args)
    if not hand_over:
        # What the module gives under FSDP: no task parameters, so the balancer falls back to the second walk.
        model._task_parameters = list  # type: ignore[method-assign]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = model.trainer

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_train_batch_end(None, batch, i)
        trainer.global_step += 1

    return Side(name, kind, step)


def torchjd_sides(batches, num_tasks: int, args: argparse.Namespace) -> list[Side]:
    """TorchJD's recipes with UPGrad on the encoder and heads of a module built like the others."""
    from torchjd.aggregation import UPGrad, UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    from mtl_lightning.balancers import EqualWeighting

    sides = []
    for name in TORCHJD_SIDES:
        model = build_module(EqualWeighting(), num_tasks, args)  # for its encoder and heads only
        encoder, heads = model.encoder, [model.heads[f"t{i}"] for i in range(num_tasks)]
        shared = list(encoder.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def losses_of(i: int, encoder=encoder, heads=heads) -> tuple[torch.Tensor, list[torch.Tensor]]:
            batch = batches[i % len(batches)]
            z = encoder(batch["inputs"])
            targets = batch["targets"]
            losses = [
                F.binary_cross_entropy_with_logits(h(z).squeeze(-1), targets[f"t{t}"]) for t, h in enumerate(heads)
            ]
            return z, losses

        if name.startswith("torchjd autojac"):
            aggregator = UPGrad()

            def step(i: int, losses_of=losses_of, optimizer=optimizer, shared=shared, aggregator=aggregator) -> None:
                z, losses = losses_of(i)
                mtl_backward(losses, features=z)
                jac_to_grad(shared, aggregator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        else:
            leaves = [m for m in encoder.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
            engine, weighting = Engine(*leaves, batch_dim=None), UPGradWeighting()

            def step(i: int, losses_of=losses_of, optimizer=optimizer, engine=engine, weighting=weighting) -> None:
                _, losses = losses_of(i)
                stacked = torch.stack(losses)
                weights = weighting(engine.compute_gramian(stacked))
                stacked.backward(weights)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        sides.append(Side(name, "torchjd", step))
    return sides


def check_against_torchjd(batches, num_tasks: int, args: argparse.Namespace, gramian: str = "batched") -> float:
    """Max |difference| of the weights after one step: our UPGrad(mode="parameter") against TorchJD's autojac.

    Both give each head its own task's gradient and the encoder UPGrad's combination of the task gradients
    w.r.t. its parameters, so the updates agree up to float rounding: the two sides time the same computation.
    """
    from torchjd.aggregation import UPGrad as TorchJDUPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    from mtl_lightning.balancers import EqualWeighting, UPGrad

    a = build_module(UPGrad(mode="parameter", gramian=gramian), num_tasks, args)
    b = build_module(EqualWeighting(), num_tasks, args)  # same seed: the same initial weights
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    batch = batches[0]
    a.training_step(batch, 0).backward()
    opt_a.step()
    z = b.encoder(batch["inputs"])
    losses = [
        F.binary_cross_entropy_with_logits(b.heads[f"t{t}"](z).squeeze(-1), batch["targets"][f"t{t}"])
        for t in range(num_tasks)
    ]
    mtl_backward(losses, features=z)
    jac_to_grad(list(b.encoder.parameters()), TorchJDUPGrad())
    opt_b.step()
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if sa[k].is_floating_point())


def build_sides(num_tasks: int, args: argparse.Namespace, skipped: list[Skipped]) -> list[Side]:
    from mtl_lightning.balancers import GradientBalancer

    batches = make_batches(num_tasks, args)
    candidates: list[tuple[str, str, Callable[[], nn.Module]]] = []
    for name, cls in exported_balancers().items():
        if args.methods and name not in args.methods and name != BASELINE:
            continue
        kind = "representation" if issubclass(cls, GradientBalancer) else "loss"
        candidates.append((name, kind, cls))
        impl = inspect.signature(cls).parameters.get("impl")
        if impl is not None:  # the method's other implementation of its weighting (fast | torchjd)
            other = "torchjd" if impl.default == "fast" else "fast"
            candidates.append((f"{name} (impl={other})", kind, functools.partial(cls, impl=other)))
        if not args.no_parameter_mode and has_parameter_mode(cls):
            candidates.append((f"{name} (parameter)", "parameter", functools.partial(cls, mode="parameter")))
            if name == "UPGrad":
                autogram = functools.partial(cls, mode="parameter", gramian="autogram")
                candidates.append((AUTOGRAM_SIDE, "parameter", autogram))
    if args.walk_heads_twice:
        candidates += [(f"{n}{TWICE_SUFFIX}", k, m) for n, k, m in candidates if k != "loss"]
    sides = []
    for name, kind, make in candidates:
        try:
            hand_over = not name.endswith(TWICE_SUFFIX)
            side = module_side(name, kind, make, batches, num_tasks, args, hand_over=hand_over)
            for i in range(2):  # fails here rather than in the timed rounds; first-call costs (solver set-up)
                side.step(i)
        except Exception as err:  # a balancer that cannot run with its defaults is reported, not timed
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if not isinstance(err, (TypeError, ValueError)) and "ConfigError" not in type(err).__name__:
                reason += f" ({traceback.extract_tb(err.__traceback__)[-1].name})"
            skipped.append(Skipped(name, num_tasks, reason))
            continue
        sides.append(side)
    if not args.no_parameter_mode:
        for side in torchjd_sides(batches, num_tasks, args):
            side.step(0)
            side.step(1)
            sides.append(side)
    return sides


def time_side(side: Side, start: int, args: argparse.Namespace) -> int:
    """Warm up, then time steps until ``--min-time`` has passed (at least ``--min-steps``); returns the next index."""
    i = start
    for _ in range(args.warmup):
        side.step(i)
        i += 1
    n, t0 = 0, time.perf_counter()
    while True:
        side.step(i)
        i += 1
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= args.min_steps and elapsed >= args.min_time:
            break
    side.ms.append(1000.0 * elapsed / n)
    side.steps += n
    return i


def measure(
    args: argparse.Namespace,
) -> tuple[dict[int, list[Side]], list[Skipped], dict[int, dict[str, float]]]:
    results, skipped, checks = {}, [], {}
    for num_tasks in args.tasks:
        t0 = time.perf_counter()
        sides = build_sides(num_tasks, args, skipped)
        if not args.no_parameter_mode:
            checks[num_tasks] = {
                g: check_against_torchjd(make_batches(num_tasks, args), num_tasks, args, g)
                for g in ("batched", "autogram")
            }
        counters = dict.fromkeys((s.name for s in sides), 2)
        shuffler = random.Random(args.seed)
        for _ in range(args.repeats):
            # A new order every round: a side timed after an expensive one (cold caches, a throttled core) is a
            # different side each round, not always the same neighbour.
            for side in shuffler.sample(sides, len(sides)):
                counters[side.name] = time_side(side, counters[side.name], args)
        results[num_tasks] = sides
        print(
            f"T = {num_tasks}: {len(sides)} sides timed in {time.perf_counter() - t0:.0f} s, 1-min load average "
            f"{os.getloadavg()[0]:.2f} (this benchmark alone: ~{args.threads}; more means other jobs shared the CPUs)",
            flush=True,
        )
    return results, skipped, checks


# --------------------------------------------------------------------------------------------------- report
def summarise(results: dict[int, list[Side]]) -> dict[str, dict[int, dict[str, float]]]:
    """``{side: {T: {"ms": median ms/step, "ratio": median per-round ratio to EW, "lo": min, "hi": max}}}``."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for num_tasks, sides in results.items():
        base = next(s for s in sides if s.name == BASELINE)
        for side in sides:
            ratios = [m / b for m, b in zip(side.ms, base.ms, strict=True)]
            table.setdefault(side.name, {})[num_tasks] = {
                "ms": statistics.median(side.ms),
                "ratio": statistics.median(ratios),
                "lo": min(ratios),
                "hi": max(ratios),
                "kind": side.kind,  # type: ignore[dict-item]
                "rounds": side.ms,  # type: ignore[dict-item]
            }
    return table


def versus(a: dict, b: dict) -> str:
    """Two sides' median ms, and the median (min-max) over rounds of a / b in the same round."""
    ratios = [x / y for x, y in zip(a["rounds"], b["rounds"], strict=True)]
    return f"{a['ms']:.2f} vs {b['ms']:.2f} ms: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def print_report(table, skipped: list[Skipped], checks: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    tasks = args.tasks
    print(
        f"\ntorch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}; MLP {args.features}-{'-'.join(map(str, args.hidden))}, batch {args.batch_size}, "
        f"binary tasks, AdamW; {args.repeats} rounds, >= {args.min_time} s and >= {args.min_steps} steps per side per "
        f"round; train metrics {'on' if args.train_metrics else 'off'}; 1-min load average {os.getloadavg()[0]:.2f}"
    )
    head = f"{'method':<48}" + "".join(f" {'T=' + str(t) + ' ms':>10} {'x EW':>6}" for t in tasks)
    print(head)
    print("-" * len(head))
    order = {"loss": 0, "representation": 1, "parameter": 2, "torchjd": 3}
    for name, per_t in sorted(table.items(), key=lambda kv: (order[next(iter(kv[1].values()))["kind"]], kv[0])):
        line = f"{name:<48}"
        for t in tasks:
            row = per_t.get(t)
            line += f" {row['ms']:>10.2f} {row['ratio']:>6.2f}" if row else f" {'-':>10} {'-':>6}"
        print(line)
    if not args.no_parameter_mode and "UPGrad (parameter)" in table:
        print(
            "\nparameter mode against TorchJD (UPGrad, same model): median ms/step, and the median over rounds of "
            "ours / TorchJD's in the same round (min-max)"
        )
        for t in tasks:
            ours, ours_ag = (table.get(n, {}).get(t) for n in ("UPGrad (parameter)", AUTOGRAM_SIDE))
            autojac, autogram = (table.get(n, {}).get(t) for n in TORCHJD_SIDES)
            if ours and ours_ag and autojac and autogram:
                check = checks.get(t, {})
                print(
                    f"  T={t:<3} batched vs autojac {versus(ours, autojac)}; autogram vs autogram "
                    f"{versus(ours_ag, autogram)}; max |Δweights| after one step vs autojac: batched "
                    f"{check.get('batched', math.nan):.1e}, autogram {check.get('autogram', math.nan):.1e}"
                )
    twins = [n for n in table if n.endswith(TWICE_SUFFIX)]
    if twins:
        print("\nthe hand-over against the second walk: median ms/step, and the median over rounds of handed / walked")
        for twin in sorted(twins):
            own = twin[: -len(TWICE_SUFFIX)]
            for t in tasks:
                if t in table.get(own, {}) and t in table[twin]:
                    print(f"  T={t:<3} {own:<40} {versus(table[own][t], table[twin][t])}")
    big = max(tasks)
    quoted = [n for n in PUBLISHED_CELEBA if n in table and big in table[n]]
    if quoted:
        print(f"\npublished x EW, CelebA (40 tasks, time per epoch) against ours at T={big} (representation mode):")
        print("  " + "; ".join(f"{n} {PUBLISHED_CELEBA[n]} vs {table[n][big]['ratio']:.2f}" for n in quoted))
    for s in skipped:
        print(f"skipped {s.name} at T={s.tasks}: {s.reason}")


def write_csv(path: str, results: dict[int, list[Side]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tasks", "side", "kind", "round", "ms_per_step", "ratio_to_equal_weighting"])
        for num_tasks, sides in results.items():
            base = next(s for s in sides if s.name == BASELINE)
            for side in sides:
                for r, (m, b) in enumerate(zip(side.ms, base.ms, strict=True)):
                    writer.writerow([num_tasks, side.name, side.kind, r, f"{m:.4f}", f"{m / b:.4f}"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results, skipped, checks = measure(args)
    table = summarise(results)
    print_report(table, skipped, checks, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        write_csv(args.out, results)
        print(f"raw numbers: {args.out}")
    return table


if __name__ == "__main__":
    main()
