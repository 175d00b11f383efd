"""What exact resume and atomic checkpoints cost, side by side with what they replace, in paired rounds.

- one epoch over the quickstart's training set: torch's ``DataLoader`` with ``shuffle=True`` against the
  project's ``resumable_loader`` (torchdata ``StatefulDataLoader`` over a seeded ``DistributedSampler``);
- one checkpoint save of the quickstart model: Lightning's ``TorchCheckpointIO`` against ``AtomicCheckpointIO``
  (temporary file in the folder, fsync, rename);
- ``RandomStateCheckpoint.state_dict()`` (done once per checkpoint).

    python benchmarks/resume_cost.py --rounds 15
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from mtl_lightning import MultiTaskModule
from mtl_lightning.callbacks.resume_state import RandomStateCheckpoint
from mtl_lightning.checkpoint_io import AtomicCheckpointIO
from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.data.datasets import collate_batch
from mtl_lightning.data.loaders import epoch_sampler, resumable_loader
from mtl_lightning.encoders import MLPEncoder


def _epoch(loader: DataLoader) -> None:
    for _ in loader:
        pass


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = [
        {"name": "purchase", "kind": "binary"},
        {"name": "segment", "kind": "multiclass", "num_outputs": 4},
        {"name": "spend", "kind": "regression"},
    ]
    dm = SyntheticDataModule(tasks=tasks, num_samples=20000, num_features=64, batch_size=256)
    train = dm.datasets["train"]
    model = MultiTaskModule(MLPEncoder(input_shape=(64,), hidden=[256, 128]), tasks=dm.tasks)
    checkpoint = {"state_dict": model.state_dict(), "epoch": 1}
    folder = Path(tempfile.mkdtemp())
    plain_io, atomic_io = TorchCheckpointIO(), AtomicCheckpointIO()
    sides: dict[str, Callable[[], None]] = {
        "epoch: DataLoader(shuffle=True)": lambda: _epoch(
            DataLoader(train, batch_size=256, shuffle=True, collate_fn=collate_batch)
        ),
        "epoch: resumable_loader": lambda: _epoch(
            resumable_loader(train, epoch_sampler(train, True, 0), 0, 256, collate_batch)
        ),
        "save: TorchCheckpointIO": lambda: plain_io.save_checkpoint(checkpoint, folder / "plain.ckpt"),
        "save: AtomicCheckpointIO": lambda: atomic_io.save_checkpoint(checkpoint, folder / "atomic.ckpt"),
        "RandomStateCheckpoint.state_dict": lambda: RandomStateCheckpoint().state_dict() and None,
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        order = list(sides)
        random.shuffle(order)
        for name in order:
            times[name].append(_timed(sides[name]))
    print(f"{'side':36s} {'median ms':>10s} {'min':>8s} {'max':>8s}   ({args.rounds} paired rounds, random order)")
    for name, values in times.items():
        ms = [v * 1e3 for v in values]
        print(f"{name:36s} {statistics.median(ms):10.2f} {min(ms):8.2f} {max(ms):8.2f}")
    pairs = (
        ("epoch: resumable_loader", "epoch: DataLoader(shuffle=True)"),
        ("save: AtomicCheckpointIO", "save: TorchCheckpointIO"),
    )
    for new, old in pairs:
        ratios = [a / b for a, b in zip(times[new], times[old], strict=True)]
        print(f"{new} / {old}: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"checkpoint size: {(folder / 'atomic.ckpt').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
