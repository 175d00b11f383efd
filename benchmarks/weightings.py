"""In-project vectorised Gramian weightings against TorchJD's, on the same Gramians, in paired rounds.

For each method with ``impl: fast`` (PCGrad, MGDA, UPGrad, DualProj, GradVac, CAGrad, ...) and each number of tasks
T, the time of one weighting call on a T x T Gramian of random task gradients (d = 256, float32, CPU), TorchJD's side
and ours run in a random order in every round; the median of the per-round ratios is printed with its range, and the
largest weight difference between the two sides. A factory sized to its tasks (NashMTL's) is given T; a TorchJD side
that aggregates the Jacobian itself (NashMTL's) has its weighting timed on the Jacobian, as ``impl: torchjd`` runs
it. Stateful sides (NashMTL) see the same Gramian on every call, so both warm-start from its solution.

    python benchmarks/weightings.py --rounds 20 --tasks 2 10 40 [--methods GradVac CAGrad]
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torchjd.aggregation import WeightedAggregator

from mtl_lightning.balancers.gradient_methods import _fast_impls


def _time(fn: Callable[[Tensor], Tensor], gramian: Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(gramian)
    return (time.perf_counter() - start) / calls


def _side(factory: Callable[..., Callable[[Tensor], Tensor]], num_tasks: int) -> Callable[[Tensor], Tensor]:
    """A side's weighting, sized to ``num_tasks`` where its factory asks for it (NashMTL's)."""
    return factory(num_tasks=num_tasks) if "num_tasks" in inspect.signature(factory).parameters else factory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="calls per timing")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--methods", nargs="+", default=None, help="the methods to time (default: every one)")
    args = parser.parse_args()
    impls = _fast_impls()
    unknown = sorted(set(args.methods or ()) - set(impls))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(impls)}")
    torch.set_num_threads(2)
    print(
        f"{'method':10s} {'T':>3s} {'torchjd ms':>11s} {'fast ms':>9s} {'fast/torchjd':>13s} {'range':>13s} {'max |dw|':>9s}"
    )
    for name, (reference, fast) in impls.items():
        if args.methods and name not in args.methods:
            continue
        for t in args.tasks:
            jac = torch.randn(t, 256, generator=torch.Generator().manual_seed(t))
            gramian = jac @ jac.T
            sides = {"torchjd": _side(reference, t), "fast": _side(fast, t)}
            inputs = dict.fromkeys(sides, gramian)
            reference_side = sides["torchjd"]
            if isinstance(reference_side, WeightedAggregator):  # it weighs the Jacobian itself (NashMTL)
                sides["torchjd"], inputs["torchjd"] = reference_side.weighting, jac
            torch.manual_seed(0)
            w_ref = sides["torchjd"](inputs["torchjd"])
            torch.manual_seed(0)
            w_fast = sides["fast"](gramian)
            times: dict[str, list[float]] = {"torchjd": [], "fast": []}
            for side, fn in sides.items():  # warm-up
                fn(inputs[side])
            for _ in range(args.rounds):
                order = list(sides)
                random.shuffle(order)
                for side in order:
                    times[side].append(_time(sides[side], inputs[side], args.calls))
            ratios = [f / r for f, r in zip(times["fast"], times["torchjd"], strict=True)]
            print(
                f"{name:10s} {t:3d} {statistics.median(times['torchjd']) * 1e3:11.3f} "
                f"{statistics.median(times['fast']) * 1e3:9.3f} {statistics.median(ratios):13.2f} "
                f"{min(ratios):6.2f}-{max(ratios):<6.2f} {float((w_ref - w_fast).abs().max()):9.1e}"
            )


if __name__ == "__main__":
    main()
