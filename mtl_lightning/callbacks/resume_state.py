"""The random state of every process, saved with each checkpoint and restored when the run resumes.

Lightning checkpoints hold the weights, the optimizers and the loops' progress, but not the random number
generators, so a resumed run draws other dropout masks (and other random balancer weights) than the run it
continues. This callback adds torch's, CUDA's, numpy's and Python's generator states of every rank to the
checkpoint and puts them back when training starts again. With the training loader of
:mod:`mtl_lightning.data.loaders` (order from the seeds and the epoch, position saved mid-epoch) a run killed after
a checkpoint and resumed with ``--ckpt_path last`` ends with the weights an uninterrupted run ends with.

The states are put back in ``on_train_start``: after Lightning's sanity check (which runs under ``isolate_rng``)
and after the training loader's iterator exists, i.e. at the point where an uninterrupted run saving this
checkpoint was about to draw its next random number.
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


def capture() -> dict[str, Any]:
    """This process's generator states, as tensors and lists only (a checkpoint loads with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, state, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": [int(version), list(state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore(states: dict[str, Any]) -> None:
    """Put back the generator states :func:`capture` returned."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(Callback):
    """Saves each rank's random generator states with every checkpoint and restores them on resume (see module)."""

    def __init__(self) -> None:
        self._loaded: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank (only rank 0 writes it), so the gather is collective.
        mine = capture()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
            return {"ranks": every}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks") or [])

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._loaded:
            return
        saved, self._loaded = self._loaded, None
        if len(saved) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random state of {len(saved)} processes and this run has "
                f"{trainer.world_size}: training continues, but not with the random draws the saved run would make"
            )
        restore(saved[trainer.global_rank % len(saved)])
