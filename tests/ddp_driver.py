"""Train a few SGD steps of ``MultiTaskModule`` on 1 or N CPU processes and save the final weights (rank 0).

Not collected by pytest (no ``test_`` prefix): ``tests/test_ddp.py`` runs it as a subprocess, because DDP inside
the pytest process would re-launch pytest. Lightning's DDP launcher re-runs this script once per extra rank; every
rank builds the same model (same seed) and the same global batches, and takes its own rows of each one.

    python tests/ddp_driver.py --devices 2 --out /tmp/ddp static@full upgrad@missing graddrop@full

Each run is ``balancer@data`` or ``balancer@data@desync`` (each rank seeds its own RNG stream, see
:class:`SeedEachStep`); its final ``state_dict`` goes to ``<out>/<run>.pt`` from rank 0 and ``<out>/<run>.rank<r>.pt``
from the other ranks. The global batches are identical whatever the number of processes: one process takes the
whole batch of ``--batch-size`` rows, rank ``r`` of ``N`` the ``r``-th contiguous block of ``batch_size / N`` rows.
No sampler is involved (``use_distributed_sampler=False``); the loader yields pre-built batches.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch import Tensor
from torch.utils.data import DataLoader

from mtl_lightning import balancers as B
from mtl_lightning.encoders.mlp import MLPEncoder
from mtl_lightning.module import MultiTaskModule
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

FEATURES = 16
TASKS = [
    TaskSpec("bin", "binary", weight=1.0),
    TaskSpec("cls", "multiclass", num_outputs=3, weight=2.0),
    TaskSpec("reg", "regression", weight=0.5),
]
BALANCERS = {
    "equal": B.EqualWeighting,
    "static": B.StaticWeighting,  # the specs' weights 1, 2, 0.5
    "upgrad": B.UPGrad,
    "mgda": B.MGDA,
    "pcgrad": B.PCGrad,
    "graddrop": B.GradDrop,
    "upgrad_param": functools.partial(B.UPGrad, mode="parameter"),
}

# "missing" data is laid out for 2 ranks: per step, the tasks whose key is absent from the batch of some ranks
# ("all" = absent from the whole global batch, so also from the single-process batch). In the single-process batch
# a key absent on some ranks only is present, with those ranks' rows unlabelled: the same global batch.
LAYOUT_RANKS = 2
ABSENT = {1: {"reg": "all"}, 2: {"cls": [1]}}


def global_batches(kind: str, steps: int, batch_size: int) -> list[dict[str, object]]:
    """``steps`` global batches, a function of the arguments only; missing labels per ``kind``."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    half = batch_size // LAYOUT_RANKS
    for step in range(steps):
        x = torch.randn(batch_size, FEATURES, generator=gen)
        w = torch.randn(3, FEATURES, generator=gen)
        signal = x @ w.T
        targets: dict[str, Tensor] = {
            "bin": (signal[:, 0] > 0).float(),
            "cls": torch.bucketize(signal[:, 1], torch.tensor([-0.5, 0.5])),
            "reg": signal[:, 2] + 0.1 * torch.randn(batch_size, generator=gen),
        }
        absent: dict[str, object] = {}
        if kind == "missing":
            # Scattered missing labels everywhere, then uneven cases: a task with no label at all on rank 1,
            # a task with no label in the whole global batch (key present), a task with one labelled row in all.
            for t in targets.values():
                drop = torch.rand(batch_size, generator=gen) < 0.25
                t[drop] = IGNORE_INDEX if not t.is_floating_point() else float("nan")
            if step == 0:
                targets["bin"][half:] = float("nan")  # no label at all on rank 1
            if step == 2:
                targets["reg"][:] = float("nan")
            if step == 3:
                keep = targets["bin"][-1].clone()
                targets["bin"][:] = float("nan")
                targets["bin"][-1] = 1.0 if torch.isnan(keep) else keep
            absent = dict(ABSENT.get(step, {}))
        batches.append({"inputs": x, "targets": targets, "absent": absent})
    return batches


def rank_batch(batch: dict[str, object], rank: int, world: int) -> dict[str, object]:
    """Rank ``rank``'s rows of a global batch (all of it when ``world == 1``), dropping absent task keys."""
    x: Tensor = batch["inputs"]  # type: ignore[assignment]
    n = x.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    targets = {}
    for name, t in batch["targets"].items():  # type: ignore[union-attr]
        where = batch["absent"].get(name)  # type: ignore[union-attr]
        if where == "all":
            continue
        if world > 1 and where is not None and rank in where:
            continue
        t = t.clone()
        if world == 1 and where is not None:  # absent on some ranks only: those ranks' rows are unlabelled here
            block = x.shape[0] // LAYOUT_RANKS
            for r in where:  # type: ignore[union-attr]
                t[r * block : (r + 1) * block] = IGNORE_INDEX if not t.is_floating_point() else float("nan")
        targets[name] = t[rows]
    return {"inputs": x[rows], "targets": targets}


class GlobalBatchData(LightningDataModule):
    """Yields this rank's rows of fixed global batches, in order (the rank is read when the loader is built)."""

    def __init__(self, kind: str, steps: int, batch_size: int):
        super().__init__()
        self.kind, self.steps, self.batch_size = kind, steps, batch_size

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batches = [rank_batch(b, rank, world) for b in global_batches(self.kind, self.steps, self.batch_size)]
        return DataLoader(batches, batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """With missing labels: rank 1 never sees task ``bin`` in validation (its AUROC list state stays empty there)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        batches = global_batches(self.kind, 2, self.batch_size)
        for b in batches:
            b["absent"] = {"bin": [1]} if self.kind == "missing" else {}
        return DataLoader([rank_batch(b, rank, world) for b in batches], batch_size=None, shuffle=False)


class SeedEachStep(Callback):
    """Seed the global RNG before every step: ``step`` (the same on every rank and in the single process), or
    ``step + 1000 * rank`` with ``desync``, which gives each rank its own random stream.

    Randomised weightings (PCGrad, GradVac) draw from the global RNG, and a DDP process does not consume it exactly
    as a single process does (process-group start-up draws from it), so without this the single process and the
    ranks would draw different task orders and only agree in distribution.
    """

    def __init__(self, desync: bool = False):
        self.desync = desync

    def on_train_batch_start(self, trainer: Trainer, pl_module, batch, batch_idx: int) -> None:
        torch.manual_seed(batch_idx + (1000 * trainer.global_rank if self.desync else 0))


def train(run: str, devices: int, steps: int, batch_size: int, out: Path) -> None:
    balancer, data, *flags = run.split("@")
    seed_everything(0, verbose=False)
    model = MultiTaskModule(
        encoder=MLPEncoder((FEATURES,), hidden=[32, 32]),
        tasks=TASKS,
        balancer=BALANCERS[balancer](),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if data == "missing" else 0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        callbacks=[SeedEachStep(desync="desync" in flags)],
    )
    trainer.fit(model, datamodule=GlobalBatchData(data, steps, batch_size))
    if trainer.global_step != steps:
        raise RuntimeError(f"{run}: trained {trainer.global_step} steps instead of {steps}")
    # Every rank saves its copy, so the test can check that the ranks hold the same weights.
    suffix = f".rank{trainer.global_rank}" if trainer.global_rank else ""
    torch.save(model.state_dict(), out / f"{run}{suffix}.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help=f"balancer@data[@desync]; balancers {list(BALANCERS)}; data full, missing")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)  # two ranks on two cores
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        train(run, args.devices, args.steps, args.batch_size, args.out)


if __name__ == "__main__":
    main()
