"""Python function calls per training step of the quickstart model under Lightning: a figure machine noise cannot
move, to set beside the timings of ``benchmarks/overhead.py`` when comparing two versions of the code.

It fits the quickstart's model and data (3 tasks, MLP encoder, batch 256, train metrics on, logging every 50 steps,
no progress bar, no checkpoints) for ``--steps`` steps under ``cProfile`` and prints the calls per step, the total
and the functions of this package that are called most. Run it on two source trees (``PYTHONPATH=<tree>``) to
compare them; the counts are the same from run to run.

    python benchmarks/calls_per_step.py --steps 200
    PYTHONPATH=/tmp/before python benchmarks/calls_per_step.py --steps 200   # a git worktree of an older commit
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import warnings

import torch
from lightning.pytorch import Trainer, seed_everything

from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.module import MultiTaskModule

TASKS = [
    {"name": "purchase", "kind": "binary"},
    {"name": "segment", "kind": "multiclass", "num_outputs": 4},
    {"name": "spend", "kind": "regression"},
]


def fit(steps: int) -> None:
    seed_everything(0)
    data = SyntheticDataModule(TASKS, num_samples=20000, missing_rate=0.1, batch_size=256)
    model = MultiTaskModule(MLPEncoder((64,), hidden=[256, 128], dropout=0.1, norm="layer"), TASKS)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
    )
    trainer.fit(model, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--top", type=int, default=8, help="how many of this package's functions to list")
    args = p.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    fit(5)  # imports and first-call set-up outside the count
    profile = cProfile.Profile()
    profile.enable()
    fit(args.steps)
    profile.disable()
    stats = pstats.Stats(profile)
    total = stats.total_calls  # type: ignore[attr-defined]
    print(f"{total} Python calls in {args.steps} steps: {total / args.steps:.0f} per step (set-up included)")
    ours = [(n, key) for key, (_, n, *_rest) in stats.stats.items() if "mtl_lightning" in key[0]]  # type: ignore[attr-defined]
    for n, (path, line, name) in sorted(ours, reverse=True)[: args.top]:
        print(f"  {n / args.steps:8.1f} per step  {name} ({path.rpartition('mtl_lightning/')[2]}:{line})")


if __name__ == "__main__":
    main()
