"""``benchmarks/overhead.py`` on two source trees of this project, side by side: did a change make a step slower?

Each round runs the overhead benchmark once per tree, in a new seeded random order, each in its own process with
that tree first on ``PYTHONPATH`` (a ``git worktree`` of the older commit, say). Inside every run the plain PyTorch
loop (a) is timed alternately with ``MultiTaskModule`` under Lightning (b), so b/a is paired within the run and
cancels most of what the machine's load does to both; the table gives, per tree, the median of the runs' b/a and
of (b)'s ms/step, and the per-round ratio new/old of b/a.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py --old /tmp/before --new . --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_tree(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One overhead run on ``tree``: {"b/a": median ratio of the run, "b_ms": median ms/step of (b)}."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    script = Path(__file__).resolve().parent / "overhead.py"
    command = [sys.executable, str(script), "--models", args.model, "--repeats", str(args.repeats), "--no-bare"]
    command += ["--progress-bar", "none", "--threads", str(args.threads), "--out", str(out)]
    subprocess.run(command, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads(out.read_text())["summary"][0]
    return {"b/a": summary["b/a"], "b_ms": summary["b_ms"], "a_ms": summary["a_ms"]}


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the source tree before the change")
    p.add_argument("--new", type=Path, default=Path("."), help="the source tree after the change")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="overhead.py's interleaved (a, b) rounds per run")
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ["old", "new"]
            rng.shuffle(order)
            for side in order:
                results[side].append(run_tree(getattr(args, side), args, Path(tmp) / f"{side}{round_}.json"))
            old, new = results["old"][-1], results["new"][-1]
            print(f"round {round_ + 1} ({' then '.join(order)}): b/a old {old['b/a']:.3f} new {new['b/a']:.3f}")
    ratios = [n["b/a"] / o["b/a"] for o, n in zip(results["old"], results["new"], strict=True)]
    for side in ("old", "new"):
        ba = [r["b/a"] for r in results[side]]
        ms = [r["b_ms"] for r in results[side]]
        print(
            f"{side}: b/a median {statistics.median(ba):.3f} [{min(ba):.3f}, {max(ba):.3f}]; (b) ms/step median {statistics.median(ms):.3f}"
        )
    print(f"new/old of b/a per round: median {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
    return results


if __name__ == "__main__":
    main()
