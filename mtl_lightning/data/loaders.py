"""The training loader every data module uses: its order is a function of the seeds and the epoch, and its position
inside an epoch is saved with each checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.

Three things make that hold:

- The loader is torchdata's ``StatefulDataLoader``. Lightning saves the ``state_dict`` of a training loader that has
  one with every checkpoint and loads it on resume (``FitLoop.on_save_checkpoint``), so a run resumed from a
  mid-epoch checkpoint (``every_n_train_steps``) continues with the next batch instead of restarting the epoch. For
  a sampler without a state of its own, StatefulDataLoader fast-forwards it by the number of batches already
  yielded, which is exact here because the samplers are deterministic (next point).
- The sampler is always a :class:`~torch.utils.data.DistributedSampler` (one replica on one process), seeded by
  :func:`sampler_seed` and reshuffled by ``set_epoch``, which Lightning calls every epoch. Torch's default
  ``RandomSampler`` draws its seed from the global random state at the start of each epoch, which a resumed run
  cannot replay.
- The loader has its own generator for the base seed it draws at every ``iter()``: with the global one, creating
  the iterator (which a resumed run does at another moment than an uninterrupted one) would shift every later
  random draw — dropout masks, random balancer weights.

The global random states themselves (torch, CUDA, numpy, Python) are saved and restored by
:class:`~mtl_lightning.callbacks.resume_state.RandomStateCheckpoint`, which the CLI adds to every run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

# Set by Lightning's seed_everything (the config's seed_everything), in every process of a run, DDP children included.
_GLOBAL_SEED_ENV = "PL_GLOBAL_SEED"


def sampler_seed(data_seed: int) -> int:
    """The training order's seed: the data module's ``seed`` mixed with the run's ``seed_everything``.

    The run's seed takes part so that runs with other seeds also see other orders; it is read from the environment
    variable Lightning sets, which every rank shares (``torch.initial_seed()`` would differ between ranks when a run
    sets no seed, and their shards would then overlap).
    """
    run_seed = int(os.environ.get(_GLOBAL_SEED_ENV, "0"))
    # SeedSequence-free mixing that stays in int64 and gives distinct seeds for distinct (data, run) pairs in practice.
    return (data_seed * 1_000_003 + run_seed) % 2**63


def epoch_sampler(
    dataset: Dataset, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0
) -> DistributedSampler:
    """This process's share of ``dataset``, in an order that depends only on ``seed`` and the epoch."""
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=sampler_seed(seed))


def resumable_loader(
    dataset: Dataset,
    sampler: Sampler,
    seed: int,
    batch_size: int | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    epoch: int = 0,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``sampler`` with its own base-seed generator (see the module docstring).

    ``epoch`` is the epoch the loader starts in (the number of epochs the fit loop has processed): on resume the loader fast-forwards
    its sampler as soon as Lightning creates its iterator, before Lightning's own ``set_epoch`` of that epoch, so the
    sampler must already be in the resumed epoch's order.
    """
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which recent torch deprecates, on every loader it builds: noise.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(sampler_seed(seed)),
        )
