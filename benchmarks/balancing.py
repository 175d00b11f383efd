"""Training-step time of every balancer relative to equal weighting, its operator and sync counts, and parameter mode
against TorchJD's recipe.

Every side trains the same model (``--model``, see ``benchmarks/balancing_models.py``): by default ``MLPEncoder``
(``--features`` 64 -> ``--hidden`` 256, 256) and one linear head per task, T binary tasks (T in ``--tasks``, default
2, 10 and 40), batches of ``--batch-size`` 256 rows cycled from 8 fixed batches, AdamW, the same initial weights for
every side of a given T. ``--model multimnist`` and ``--model census`` build the model sections of
``configs/experiment/multimnist_hps.yaml`` and ``census_mmoe.yaml`` (their encoder, heads and optimizer; synthetic
inputs of the right shapes, T = 2 as in the configs; MMoE's gradient methods in parameter mode, as that config
says); ``--model resnet18`` is a ResNet-18 with T binary heads (for ``--device cuda``).

A *step* of ``MultiTaskModule`` is what Lightning's automatic optimisation runs, called directly in a loop with no
``Trainer`` (so Lightning's own ~0.6 ms of per-step hooks, the progress bar and the loggers, the same for every
method, do not dilute the ratios): ``training_step`` (forward, masked per-task losses, the balancer), ``backward``,
``optimizer.step``, ``zero_grad`` and ``on_train_batch_end`` (where stateful balancers such as FAMO learn). A stub
trainer says "do not log this step" (Lightning writes step values every ``log_every_n_steps`` steps only), so
balancer telemetry is off as on 49 of 50 steps by default; train metrics are off (``--train-metrics`` turns them on).

Sides, all timed in the same rounds:

- every class exported by ``mtl_lightning.balancers`` that subclasses ``Balancer``, built with its defaults
  (loss-weighting ones added later are picked up; classes that fail to build or to run a step are listed as skipped
  with the reason); gradient methods in representation mode (their default; parameter mode on ``census``);
- gradient methods with two implementations of their weighting (``impl: fast | torchjd``) also with the one that
  is not their default, as "Method (impl=...)";
- gradient methods that have a parameter mode, as ``Method(mode="parameter")`` (its default Gramian, one T-batched
  backward to the encoder's parameters), and UPGrad also as ``UPGrad(mode="parameter", gramian="autogram")``;
- TorchJD's own recipes on the same encoder and heads (``mlp`` and ``resnet18``), with TorchJD's ``UPGrad``:
  ``mtl_backward(losses, features=z)`` + ``jac_to_grad(encoder parameters, UPGrad())`` + ``optimizer.step()``
  (autojac, the full Jacobian: what ``gramian="batched"`` computes), and ``Engine(encoder leaves)
  .compute_gramian(losses)`` + ``UPGradWeighting`` + ``losses.backward(weights)`` (autogram, what
  ``gramian="autogram"`` uses inside);
- with ``--walk-heads-twice``, every gradient-method side again as "(heads walked twice)": the module gives the
  balancer no task parameters (as under FSDP), so the heads' gradients, and in parameter mode the encoder's, come
  from a second walk in Lightning's backward instead of being handed over.

Each round times every side once, in a new (seeded) random order, so drifts of the machine and the after-effects of
an expensive neighbour hit all sides alike: ``--warmup`` untimed steps, then enough steps for ``--min-time``
seconds (at least ``--min-steps``; on CUDA the clock is read, after a synchronisation, only at powers of two of
steps, so timing adds no sync per step). Over ``--repeats`` rounds (default 20) the table gives each side's median
ms/step and the median of its per-round ratios to equal weighting (EqualWeighting) with their interquartile range.

Noise does not move the second table: after the rounds, ``--op-steps`` steps of each side run under
``torch.profiler`` and it counts, per step, the ``aten::`` operator calls (every event whose name starts with
``aten::``, nested ones included: ``aten::linear`` and the ``aten::addmm`` it calls are two) and the
device-to-host synchronisations. On CUDA these are the ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` /
``cudaEventSynchronize`` calls, and beside them the DtoH copies (``Memcpy DtoH`` activities) and the host reads.
On a CPU nothing synchronises, so the proxy is what would on an accelerator: host reads of tensor values
(``.item()``, ``.tolist()``, ``.numpy()``, ``bool()``, ``float()``, ``int()``, seen through a ``TorchFunctionMode``)
and the value-dependent-size operators ``aten::nonzero`` (boolean-mask indexing) and ``aten::masked_select``; the
optimizer's reads are left out (AdamW reads its CPU step counters, no sync on any device), and ``.cpu()`` copies
are not seen (on a CPU nothing tells a device tensor from a host one). Both are shown for each T with their growth over the smallest T.

    python benchmarks/balancing.py                          # T = 2, 10, 40; 10+ minutes on 2 CPU cores
    python benchmarks/balancing.py --tasks 10 --methods UPGrad FAMO --out balancing.csv
    python benchmarks/balancing.py --model census --markdown   # the census MMoE step, tables to paste
    python benchmarks/balancing.py --device cuda --model resnet18 --tasks 40 --no-parameter-mode
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import inspect
import logging
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import balancing_models
from balancing_models import BenchModel

BASELINE = "EqualWeighting"
TORCHJD_SIDES = ("torchjd autojac: mtl_backward+jac_to_grad", "torchjd autogram: Engine+UPGradWeighting")
AUTOGRAM_SIDE = "UPGrad (parameter, autogram)"  # our parameter mode with gramian="autogram", against TorchJD's
TWICE_SUFFIX = " (heads walked twice)"  # --walk-heads-twice: a side without the hand-over
# Published time per epoch relative to equal weighting on CelebA (40 tasks), given with this benchmark's targets.
PUBLISHED_CELEBA = {"PCGrad": 8.1, "NashMTL": 6.1, "MGDA": 5.6, "CAGrad": 4.5, "FAMO": 1.08}
# What makes the host wait for an accelerator (the CPU proxy for a device-to-host synchronisation): reads of a
# tensor's values on the host (seen as Tensor methods through a TorchFunctionMode: .tolist() and .numpy() call no
# aten operator) and the operators whose output size depends on the values.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
HOST_SYNC_OPS = ("aten::nonzero", "aten::masked_select")
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
STEP_RANGE = "bench::step"  # the profiler range around each counted step
FAULT_STEPS = 10  # steps over which count_ops counts the page faults
# The optimizer's range: on a CPU its scalar reads are not counted as syncs (count_ops says why).
OPTIMIZER_RANGE = "bench::optimizer"


@dataclass
class OpCount:
    """Per-step counts from the profiler: aten operator calls, host syncs, and (on CUDA) DtoH copies."""

    ops: float
    syncs: float
    dtoh: float = 0.0
    host_reads: float = 0.0  # .item()/.tolist()/bool()/... of tensors (on CUDA beside the real syncs, to compare)
    faults: float = 0.0  # the process's minor page faults per step (new host pages the kernel zero-fills)


@dataclass
class Side:
    name: str
    kind: str  # "representation" (the balancer's default), "parameter", "torchjd", "loss"
    step: Callable[[int], None]
    ms: list[float] = field(default_factory=list)
    steps: int = 0
    counts: OpCount | None = None
    module: nn.Module | None = None  # the MultiTaskModule a module side trains (None for TorchJD's recipes)


@dataclass
class Skipped:
    name: str
    tasks: int
    reason: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40], help="numbers of tasks T (mlp, resnet18)")
    p.add_argument(
        "--model",
        choices=balancing_models.MODELS,
        default="mlp",
        help="mlp (fixed MLP), multimnist / census (the experiment configs' models, T = 2), resnet18 (T binary heads)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]: every side's model, batches and optimizer")
    p.add_argument("--methods", nargs="+", default=None, help="balancer class names to time (default: all)")
    p.add_argument("--no-parameter-mode", action="store_true", help="skip parameter mode and the TorchJD sides")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (each side once per round)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds timed per side per round")
    p.add_argument("--min-steps", type=int, default=3, help="steps timed per side per round, at least")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side per round")
    p.add_argument("--op-steps", type=int, default=2, help="profiled steps per side for the counts (0: no counts)")
    p.add_argument("--features", type=int, default=64, help="mlp: input features")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256], help="mlp: hidden widths")
    p.add_argument("--image-size", type=int, default=64, help="resnet18: image side (3 channels)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: mlp 256, resnet18 128, the config's for the others"
    )
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--train-metrics", action="store_true", help="update the per-task train metrics every step")
    p.add_argument(
        "--walk-heads-twice",
        action="store_true",
        help="also time each gradient method with the heads' gradients not handed over (Lightning's backward walks "
        "the heads, and in parameter mode the encoder, a second time): the gain of the hand-over, side by side",
    )
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown (for docs/benchmarks.md)")
    p.add_argument(
        "--counts",
        choices=("long", "wide"),
        default="long",
        help="the counts table: one row per method and T (long), or per method with every T in columns (wide)",
    )
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is; by default the process keeps freed memory for reuse, as `mtl` does "
        "(mtl_lightning/allocator.py)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every timed round as CSV")
    args = p.parse_args(argv)
    if args.model in balancing_models.FIXED_TASKS:
        args.tasks = [balancing_models.FIXED_TASKS[args.model]]  # the experiment config's tasks
    args.device = torch.device(args.device)
    return args


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


_in_optimizer = False  # set by optimizer_range(): host reads there are not counted (count_ops says why)


@contextlib.contextmanager
def optimizer_range() -> Iterator[None]:
    """A profiler range around the optimizer's step, which also tells HostReads to look away."""
    global _in_optimizer
    _in_optimizer = True
    try:
        with torch.profiler.record_function(OPTIMIZER_RANGE):
            yield
    finally:
        _in_optimizer = False


class HostReads(TorchFunctionMode):
    """Counts the Tensor methods that read values on the host (:data:`HOST_READS`), outside the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not _in_optimizer and getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that the clock reads what it did (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------- data
def bench_model(num_tasks: int, args: argparse.Namespace) -> BenchModel:
    return balancing_models.build(args.model, num_tasks, args)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def make_batches(model: BenchModel, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The model's fixed batches (the same for every side of a given T), on ``--device``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [to_device(b, args.device) for b in model.make_batches(gen)]


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


def build_module(balancer: nn.Module, model: BenchModel, args: argparse.Namespace):
    from mtl_lightning.module import MultiTaskModule

    torch.manual_seed(args.seed)  # the same initial weights for every side of a given T
    module = MultiTaskModule(model.make_encoder(), model.tasks, balancer=balancer, train_metrics=args.train_metrics).to(
        args.device
    )
    module.trainer = _StubTrainer()
    module._log_every_train_step = False  # set by setup() under a Trainer; nothing here monitors a train/ value
    return module


def module_side(
    name: str,
    kind: str,
    make: Callable[[], nn.Module],
    batches: list[dict[str, Any]],
    model: BenchModel,
    args: argparse.Namespace,
    hand_over: bool = True,
) -> Side:
    module = build_module(make(), model, args)
    if not hand_over:
        # What the module gives under FSDP: no task parameters, so the balancer falls back to the second walk.
        module._task_parameters = list  # type: ignore[method-assign]
    module.train()
    optimizer = model.make_optimizer(module.parameters())
    trainer = module.trainer

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        loss = module.training_step(batch, i)
        loss.backward()
        with optimizer_range():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        module.on_train_batch_end(None, batch, i)
        trainer.global_step += 1

    return Side(name, kind, step, module=module)


def _binary_heads(model: BenchModel) -> bool:
    """TorchJD's recipes below compute BCE losses of heads named t0, t1, ... (the mlp and resnet18 models)."""
    return all(t.name == f"t{i}" and t.kind == "binary" for i, t in enumerate(model.tasks))


def torchjd_sides(batches, model: BenchModel, args: argparse.Namespace) -> list[Side]:
    """TorchJD's recipes with UPGrad on the encoder and heads of a module built like the others."""
    from torchjd.aggregation import UPGrad, UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    from mtl_lightning.balancers import EqualWeighting

    num_tasks = len(model.tasks)
    sides = []
    for name in TORCHJD_SIDES:
        module = build_module(EqualWeighting(), model, args)  # for its encoder and heads only
        encoder, heads = module.encoder, [module.heads[f"t{i}"] for i in range(num_tasks)]
        shared = list(encoder.parameters())
        optimizer = model.make_optimizer(module.parameters())

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
                with optimizer_range():
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
                with optimizer_range():
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        sides.append(Side(name, "torchjd", step))
    return sides


def check_against_torchjd(batches, model: BenchModel, args: argparse.Namespace, gramian: str = "batched") -> float:
    """Max |difference| of the encoder's weights after one step: our UPGrad(mode="parameter") against TorchJD's autojac.

    Both give the encoder UPGrad's combination of the task gradients w.r.t. its parameters, so its update agrees up
    to float rounding: the two sides time the same computation. The heads are left out: TorchJD gives each head
    its loss's full gradient, the module scales the heads' gradients alike under every balancer (one scale for
    the heads, docs/balancing.md), so they differ by design.
    """
    from torchjd.aggregation import UPGrad as TorchJDUPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    from mtl_lightning.balancers import EqualWeighting, UPGrad

    num_tasks = len(model.tasks)
    a = build_module(UPGrad(mode="parameter", gramian=gramian), model, args)
    b = build_module(EqualWeighting(), model, args)  # same seed: the same initial weights
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
    return max((sa[k] - sb[k]).abs().max().item() for k in sa if k.startswith("encoder.") and sa[k].is_floating_point())


def candidates_for(model: BenchModel, args: argparse.Namespace) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    """``(side name, kind, factory)`` of every side to time on ``model``."""
    from mtl_lightning.balancers import GradientBalancer

    # On an encoder without a shared representation (MMoE) the gradient methods' own sides are parameter mode.
    only_parameter = model.gradient_mode == "parameter"
    out: list[tuple[str, str, Callable[[], nn.Module]]] = []
    for name, cls in exported_balancers().items():
        if args.methods and name not in args.methods and name != BASELINE:
            continue
        gradient = issubclass(cls, GradientBalancer)
        own = {"mode": "parameter"} if only_parameter and has_parameter_mode(cls) else {}
        kind = ("parameter" if own else "representation") if gradient else "loss"
        out.append((name, kind, functools.partial(cls, **own) if own else cls))
        impl = inspect.signature(cls).parameters.get("impl")
        if impl is not None:  # the method's other implementation of its weighting (fast | torchjd)
            other = "torchjd" if impl.default == "fast" else "fast"
            out.append((f"{name} (impl={other})", kind, functools.partial(cls, impl=other, **own)))
        if not args.no_parameter_mode and has_parameter_mode(cls):
            if not only_parameter:
                out.append((f"{name} (parameter)", "parameter", functools.partial(cls, mode="parameter")))
            if name == "UPGrad":
                autogram = functools.partial(cls, mode="parameter", gramian="autogram")
                out.append((AUTOGRAM_SIDE, "parameter", autogram))
    if args.walk_heads_twice:
        out += [(f"{n}{TWICE_SUFFIX}", k, m) for n, k, m in out if k != "loss"]
    return out


def build_sides(
    model: BenchModel, batches: list[dict[str, Any]], args: argparse.Namespace, skipped: list[Skipped]
) -> list[Side]:
    num_tasks = len(model.tasks)
    sides = []
    for name, kind, make in candidates_for(model, args):
        try:
            hand_over = not name.endswith(TWICE_SUFFIX)
            side = module_side(name, kind, make, batches, model, args, hand_over=hand_over)
            for i in range(2):  # fails here rather than in the timed rounds; first-call costs (solver set-up)
                side.step(i)
        except Exception as err:  # a balancer that cannot run with its defaults is reported, not timed
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if not isinstance(err, (TypeError, ValueError)) and "ConfigError" not in type(err).__name__:
                reason += f" ({traceback.extract_tb(err.__traceback__)[-1].name})"
            skipped.append(Skipped(name, num_tasks, reason))
            continue
        sides.append(side)
    if not args.no_parameter_mode and _binary_heads(model):
        for side in torchjd_sides(batches, model, args):
            side.step(0)
            side.step(1)
            sides.append(side)
    return sides


def time_side(side: Side, start: int, args: argparse.Namespace) -> int:
    """Warm up, then time steps until ``--min-time`` has passed (at least ``--min-steps``); returns the next index.

    On CUDA each reading of the clock synchronises first, so the clock is read at powers of two of steps only
    (the side's own syncs stay the only ones inside the window).
    """
    device, i = args.device, start
    for _ in range(args.warmup):
        side.step(i)
        i += 1
    every_step = device.type != "cuda"
    synchronize(device)
    n, t0 = 0, time.perf_counter()
    while True:
        side.step(i)
        i += 1
        n += 1
        if n >= args.min_steps and (every_step or n & (n - 1) == 0):
            synchronize(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= args.min_time:
                break
    side.ms.append(1000.0 * elapsed / n)
    side.steps += n
    return i


def count_ops(step: Callable[[int], None], start: int, steps: int, device: torch.device) -> OpCount:
    """aten operator calls and host synchronisations per step of ``step``, from ``steps`` profiled steps.

    The steps before ``start`` warmed the side up, so first-call work (solver set-up, lazy buffers) is not counted.
    Host-side events count only inside a step's ``bench::step`` range (the profiler's and our own synchronisation
    around the steps are not the steps'); device copies (DtoH) have no host range and are all counted. The
    optimizer's host reads are left out: AdamW (capturable=False, the default) reads its step counters, CPU tensors
    on every device, with .item(), which synchronises nothing on CUDA either; the same optimizer runs every side.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # Page faults first, without the profiler (which allocates), in this side's steady state: after as many steps
    # again (the other sides ran just before and left the heap laid out for them). The indices only pick the batch.
    for i in range(start, start + FAULT_STEPS):
        step(i)
    synchronize(device)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(start, start + FAULT_STEPS):
        step(i)
    synchronize(device)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / FAULT_STEPS
    reads = HostReads()
    with profile(activities=activities) as prof:
        for i in range(start, start + steps):
            with record_function(STEP_RANGE), reads:
                step(i)
        synchronize(device)
    events = prof.profiler.kineto_results.events()

    def spans(name: str) -> list[tuple[int, int]]:
        return [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == name]

    steps_at, optimizer_at = spans(STEP_RANGE), spans(OPTIMIZER_RANGE)

    def within(e: Any, at: list[tuple[int, int]]) -> bool:
        return any(a <= e.start_ns() <= b for a, b in at)

    # By time only, not device type: CUDA runtime calls (cudaStreamSynchronize) are host events of their own kind.
    inside = [e for e in events if within(e, steps_at)]
    ops = sum(1 for e in inside if e.name().startswith("aten::"))
    if device.type == "cuda":
        names = Counter(e.name() for e in inside)
        syncs = sum(names[c] for c in CUDA_SYNC_CALLS)
        dtoh = sum(1 for e in events if "Memcpy DtoH" in e.name())  # the copies on the device's timeline
    else:
        names = Counter(e.name() for e in inside if not within(e, optimizer_at))
        syncs, dtoh = reads.count + sum(names[c] for c in HOST_SYNC_OPS), 0
    return OpCount(ops / steps, syncs / steps, dtoh / steps, reads.count / steps, faults)


def measure(
    args: argparse.Namespace,
) -> tuple[dict[int, list[Side]], list[Skipped], dict[int, dict[str, float]]]:
    results, skipped, checks = {}, [], {}
    for num_tasks in args.tasks:
        t0 = time.perf_counter()
        model = bench_model(num_tasks, args)
        batches = make_batches(model, args)
        sides = build_sides(model, batches, args, skipped)
        if not args.no_parameter_mode and _binary_heads(model):
            checks[num_tasks] = {g: check_against_torchjd(batches, model, args, g) for g in ("batched", "autogram")}
        counters = dict.fromkeys((s.name for s in sides), 2)
        shuffler = random.Random(args.seed)
        for _ in range(args.repeats):
            # A new order every round: a side timed after an expensive one (cold caches, a throttled core) is a
            # different side each round, not always the same neighbour.
            for side in shuffler.sample(sides, len(sides)):
                counters[side.name] = time_side(side, counters[side.name], args)
        if args.op_steps > 0:
            for side in sides:
                side.counts = count_ops(side.step, counters[side.name], args.op_steps, args.device)
                counters[side.name] += args.op_steps
        results[num_tasks] = sides
        print(
            f"T = {num_tasks}: {len(sides)} sides timed in {time.perf_counter() - t0:.0f} s, 1-min load average "
            f"{os.getloadavg()[0]:.2f} (this benchmark alone: ~{args.threads}; more means other jobs shared the CPUs)",
            flush=True,
        )
    return results, skipped, checks


# --------------------------------------------------------------------------------------------------- report
def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method: defined for 1 value, and within the data's range)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summarise(results: dict[int, list[Side]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{side: {T: {"ms", "ratio" (median per-round ratio to EW), "q1", "q3", "lo", "hi", counts...}}}``."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for num_tasks, sides in results.items():
        base = next(s for s in sides if s.name == BASELINE)
        for side in sides:
            ratios = [m / b for m, b in zip(side.ms, base.ms, strict=True)]
            q1, q3 = quartiles(ratios)
            row: dict[str, Any] = {
                "ms": statistics.median(side.ms),
                "ratio": statistics.median(ratios),
                "q1": q1,
                "q3": q3,
                "lo": min(ratios),
                "hi": max(ratios),
                "kind": side.kind,
                "rounds": side.ms,
            }
            if side.counts is not None:
                row.update(vars(side.counts))
            table.setdefault(side.name, {})[num_tasks] = row
    return table


def versus(a: dict, b: dict) -> str:
    """Two sides' median ms, and the median (min-max) over rounds of a / b in the same round."""
    ratios = [x / y for x, y in zip(a["rounds"], b["rounds"], strict=True)]
    return f"{a['ms']:.2f} vs {b['ms']:.2f} ms: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, left: int = 1) -> str:
    """An aligned text table, or a markdown one; the first ``left`` columns are left-aligned."""
    if markdown:
        rule = ["---" if i < left else "---:" for i in range(len(headers))]
        return "\n".join("| " + " | ".join(r) + " |" for r in [list(headers), rule, *map(list, rows)])
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


KIND_ORDER = {"loss": 0, "representation": 1, "parameter": 2, "torchjd": 3}


def ordered(table: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    """Loss weightings, then representation mode, parameter mode and TorchJD; equal weighting first of all."""
    return sorted(table, key=lambda n: (n != BASELINE, KIND_ORDER[next(iter(table[n].values()))["kind"]], n.lower()))


def ratio_table(table, tasks: list[int], markdown: bool) -> str:
    headers = ["method", "mode"]
    for t in tasks:
        headers += [f"T={t} ms", f"T={t} x EW", f"T={t} IQR"]
    rows = []
    for name in ordered(table):
        per_t = table[name]
        cells = [name, next(iter(per_t.values()))["kind"]]
        for t in tasks:
            row = per_t.get(t)
            cells += (
                [f"{row['ms']:.2f}", f"{row['ratio']:.2f}", f"{row['q1']:.2f}-{row['q3']:.2f}"] if row else ["-"] * 3
            )
        rows.append(cells)
    return render(headers, rows, markdown, left=2)


def counts_table(table, tasks: list[int], device: torch.device, markdown: bool, layout: str = "long") -> str:
    """ops/step and syncs/step (and DtoH on CUDA) per method and T, with several T their growth over the first.

    ``long``: one row per method and T (method, T, ops/step, syncs/step, ...); ``wide``: one row per method.
    """
    cuda, growth, first, last = device.type == "cuda", len(tasks) > 1, min(tasks), max(tasks)
    names = [n for n in ordered(table) if any("ops" in row for row in table[n].values())]

    def ratio(a: dict | None, b: dict | None, key: str) -> str:
        return f"{a[key] / b[key]:.2f}" if a and b and b.get(key) else "-"

    if layout == "wide":
        headers = ["method", *(f"ops T={t}" for t in tasks), *([f"ops x T={first}->{last}"] if growth else [])]
        headers += [f"syncs T={t}" for t in tasks] + ([f"DtoH T={t}" for t in tasks] if cuda else [])
        rows = []
        for name in names:
            per_t = table[name]
            cells = [name, *(f"{per_t[t]['ops']:.0f}" if t in per_t else "-" for t in tasks)]
            cells += [ratio(per_t.get(last), per_t.get(first), "ops")] if growth else []
            cells += [f"{per_t[t]['syncs']:.1f}" if t in per_t else "-" for t in tasks]
            cells += [f"{per_t[t]['dtoh']:.1f}" if t in per_t else "-" for t in tasks] if cuda else []
            rows.append(cells)
        return render(headers, rows, markdown)
    headers = ["method", "T", "ops/step", *([f"ops x T={first}"] if growth else [])]
    headers += ["syncs/step", *([f"syncs x T={first}"] if growth else [])]
    headers += ["DtoH/step", "host reads/step"] if cuda else []
    headers += ["page faults/step"]
    rows = []
    for name in names:
        per_t = table[name]
        for t in tasks:
            row = per_t.get(t)
            if row is None or "ops" not in row:
                continue
            cells = [name, str(t), f"{row['ops']:.0f}", *([ratio(row, per_t.get(first), "ops")] if growth else [])]
            cells += [f"{row['syncs']:.1f}", *([ratio(row, per_t.get(first), "syncs")] if growth else [])]
            cells += [f"{row['dtoh']:.1f}", f"{row['host_reads']:.1f}"] if cuda else []
            cells += [f"{row.get('faults', 0.0):.0f}"]
            rows.append(cells)
    return render(headers, rows, markdown)


def print_report(table, skipped: list[Skipped], checks: dict[int, dict[str, float]], args: argparse.Namespace) -> None:
    tasks = args.tasks
    model = bench_model(tasks[0], args)
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\n{model.description}, batch {model.batch_size}; {device}, torch {torch.__version__}, python "
        f"{platform.python_version()}, torch threads {torch.get_num_threads()}; {args.repeats} rounds in a seeded "
        f"random order, >= {args.min_time} s and >= {args.min_steps} steps per side per round; train metrics "
        f"{'on' if args.train_metrics else 'off'}; 1-min load average {os.getloadavg()[0]:.2f}"
    )
    print("\nms/step: median over rounds; x EW: median of per-round ratios to EqualWeighting; IQR: their quartiles\n")
    print(ratio_table(table, tasks, args.markdown))
    if args.op_steps > 0:
        proxy = (
            "cudaStreamSynchronize/cudaDeviceSynchronize/cudaEventSynchronize calls; DtoH: Memcpy DtoH activities "
            "and calls"
            if args.device.type == "cuda"
            else "CPU proxy, what would synchronise on an accelerator: host reads ("
            + ", ".join(HOST_READS)
            + ") and "
            + " + ".join(HOST_SYNC_OPS)
            + ", the optimizer's excluded"
        )
        print(
            f"\nper training step, from {args.op_steps} profiled steps: aten:: operator calls (nested included); syncs: {proxy}\n"
        )
        print(counts_table(table, tasks, args.device, args.markdown, args.counts))
    if not args.no_parameter_mode and "UPGrad (parameter)" in table and TORCHJD_SIDES[0] in table:
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
                    f"{versus(ours_ag, autogram)}; max |Δ encoder weights| after one step vs autojac: batched "
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
    if quoted and args.model in ("mlp", "resnet18"):
        print(f"\npublished x EW, CelebA (40 tasks, time per epoch) against ours at T={big}:")
        print("  " + "; ".join(f"{n} {PUBLISHED_CELEBA[n]} vs {table[n][big]['ratio']:.2f}" for n in quoted))
    for s in skipped:
        print(f"skipped {s.name} at T={s.tasks}: {s.reason}")


def write_csv(path: str, results: dict[int, list[Side]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "tasks",
                "side",
                "kind",
                "round",
                "ms_per_step",
                "ratio_to_equal_weighting",
                "ops_per_step",
                "syncs_per_step",
            ]
        )
        for num_tasks, sides in results.items():
            base = next(s for s in sides if s.name == BASELINE)
            for side in sides:
                ops = f"{side.counts.ops:.1f}" if side.counts else ""
                syncs = f"{side.counts.syncs:.2f}" if side.counts else ""
                for r, (m, b) in enumerate(zip(side.ms, base.ms, strict=True)):
                    writer.writerow([num_tasks, side.name, side.kind, r, f"{m:.4f}", f"{m / b:.4f}", ops, syncs])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    if not args.system_malloc:
        from mtl_lightning.allocator import keep_freed_memory

        print(f"keep freed memory (as mtl does): {keep_freed_memory()}")
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
