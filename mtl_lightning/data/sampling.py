"""Task samplers for per-task datasets: which task each training step draws, and which rows each process takes.

A sampler here yields, per step, the *parts* of one batch: ``((task, rows), ...)`` with ``rows`` a 1-D int64
tensor of this process's row indices into that task's dataset (evaluation parts may carry a third element, the
number of trailing padding rows whose labels are masked). One part for ``round_robin``, ``proportional`` and
``temperature`` (homogeneous batches, as in MT-DNN), one part per task for ``all``.
:class:`~mtl_lightning.data.per_task.PerTaskDataset` turns the parts into ``{"inputs": x, "targets": {task: y}}``.

Why the samplers subclass :class:`~torch.utils.data.DistributedSampler` and are passed as the DataLoader's
``sampler`` with ``batch_size=None`` (each item is already a batch):

- Lightning (``use_distributed_sampler=True``, its default) replaces the sampler of every loader under a
  distributed strategy unless ``isinstance(loader.sampler, DistributedSampler)``
  (``DataConnector._requires_distributed_sampler`` in ``lightning/pytorch/trainer/connectors/data_connector.py``).
  A ``batch_sampler`` does not help: the DataLoader then sets ``loader.sampler`` to a ``SequentialSampler``, so
  Lightning injects a DistributedSampler *into* the batch sampler (re-instantiating it with a ``sampler`` argument,
  or raising "Lightning can't inject a (distributed) sampler into your batch sampler",
  ``_dataloader_init_kwargs_resolve_sampler`` in ``lightning/pytorch/utilities/data.py``), so the batches would no
  longer be this module's rank-aware, task-by-task layout. As the loader's ``sampler`` and a DistributedSampler,
  ours is left alone (in ``predict`` Lightning re-creates the loader around the same sampler), and the fit loop
  calls its ``set_epoch`` at the start of every epoch (``_set_sampler_epoch``), which reshuffles. This holds whatever
  the trainer's ``use_distributed_sampler``.
- The samplers take ``num_replicas``/``rank`` from the data module (``trainer.strategy.distributed_sampler_kwargs``),
  never from ``torch.distributed`` at construction, so they also work outside a Trainer (tests, notebooks).

Determinism: everything is a function of ``(seed, epoch)`` and the task sizes, never of the rank or of global RNG
state, so every rank draws the same task at the same step and the ranks' rows of one step are disjoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from mtl_lightning.data.base import DataError

SAMPLING = ("round_robin", "proportional", "temperature", "all")
"""Training sampling strategies (see :func:`task_probabilities`)."""

Part = tuple[str, Tensor] | tuple[str, Tensor, int]
"""``(task, rows)``, or ``(task, rows, masked)`` whose last ``masked`` rows are padding with their labels masked."""
Parts = tuple[Part, ...]
"""One batch's parts; ``rows`` are this process's row indices into the task's dataset."""

# Stream tags mixed into the seed, so that the task sequence and each task's row order are independent streams.
_TASK_STREAM, _ROW_STREAM = 0, 1


def check_sampling(sampling: str, temperature: float) -> None:
    """A DataError for an unknown strategy or a temperature that is not > 0."""
    if sampling not in SAMPLING:
        raise DataError(f"unknown sampling {sampling!r}; choose one of {list(SAMPLING)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise DataError(
            f"temperature must be a finite number > 0 (1 = proportional, larger = closer to uniform), got {temperature}"
        )


def task_probabilities(sizes: Sequence[int], sampling: str, temperature: float = 1.0) -> np.ndarray:
    """Probability of drawing each task at a step: ``p_t ∝ n_t^(1/T)``.

    ``proportional`` is ``T = 1`` (``p_t = n_t / Σ n``), ``temperature`` uses the given ``T`` (``T → ∞`` tends to
    uniform); ``round_robin`` and ``all`` give every task ``1 / T_tasks`` (their share of steps, not a draw).
    """
    check_sampling(sampling, temperature)
    n = np.asarray(sizes, dtype=np.float64)
    if sampling in ("round_robin", "all"):
        return np.full(len(n), 1.0 / len(n))
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    # In log space: n_t^(1/T) for huge n_t and small T would overflow.
    logits = power * np.log(n)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _rng(seed: int, *keys: int) -> np.random.Generator:
    # SeedSequence mixes the whole tuple: (seed, epoch) pairs never collide the way seed + epoch would.
    return np.random.default_rng([seed % 2**63, *keys])


class _RowStream:
    """Consecutive global chunks of one task's rows: a fresh permutation (or ``0..n-1`` when not shuffling) per
    pass; a chunk never spans two passes, so the rows of one global batch are distinct."""

    def __init__(self, size: int, shuffle: bool, rng: np.random.Generator):
        self.size, self.shuffle, self.rng = size, shuffle, rng
        self.order = np.empty(0, dtype=np.int64)
        self.pos = 0

    def take(self, count: int) -> np.ndarray:
        count = min(count, self.size)
        if self.pos + count > len(self.order):  # leftover rows of this pass wait for the next (reshuffled) pass
            self.order = self.rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            self.pos = 0
        chunk = self.order[self.pos : self.pos + count]
        self.pos += count
        return chunk


class TaskBatchSampler(DistributedSampler):
    """Training batches drawn task by task; every process draws the same task at the same step.

    At each step a task ``t`` is chosen (``round_robin``: in turn; ``proportional``/``temperature``: at random with
    :func:`task_probabilities`; ``all``: every task), then the next *global* chunk of ``batch_size * num_replicas``
    rows of its row stream (all ``n_t`` rows when the task has fewer), of which this process takes every
    ``num_replicas``-th row from ``rank`` on, like DistributedSampler. A process with ``batch_size`` ``b`` on ``W``
    processes therefore sees, step by step, the rows one process with batch size ``b * W`` would see.

    An epoch is ``steps_per_epoch`` steps (default: ``ceil(Σ_t n_t / (batch_size * num_replicas))``, the steps one
    pass over all training rows takes; for ``all``, ``ceil(max_t n_t / (batch_size * num_replicas))``: one pass over
    the largest task, smaller tasks cycling). Each task's rows are consumed pass by pass (a new permutation per
    pass), so a task drawn more often than its size warrants repeats rows within an epoch and one drawn less often
    leaves rows for the next epoch's fresh start. The task sequence and the row order depend only on ``seed`` and
    the epoch (:meth:`set_epoch`): the same on every rank, reproducible, and different each epoch.

    Args:
        sizes: Training rows per task, in task order.
        batch_size: Rows per process and step (per task and step for ``all``).
        sampling: ``round_robin``, ``proportional``, ``temperature`` or ``all``.
        temperature: ``T`` of ``temperature`` sampling (> 0).
        steps_per_epoch: Steps per epoch (default above).
        shuffle: Shuffle each task's rows (each pass); the task sequence is always drawn from ``seed``.
        seed: Seed of the task sequence and row order (combined with the epoch).
        num_replicas: Number of processes (data-parallel ranks).
        rank: This process's rank.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        sampling: str = "proportional",
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        check_sampling(sampling, temperature)
        if not sizes:
            raise DataError("TaskBatchSampler needs at least one task")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise DataError(f"steps_per_epoch must be >= 1 (or null for one pass over the data), got {steps_per_epoch}")
        small = {t: n for t, n in sizes.items() if n < num_replicas}
        if small:
            raise DataError(
                f"tasks {sorted(small)} have fewer training rows ({small}) than the {num_replicas} processes; every "
                "process needs at least one row of each task: give those tasks more rows or use fewer processes"
            )
        # The "dataset" only sizes DistributedSampler's unused bookkeeping; explicit num_replicas and rank keep its
        # constructor from querying torch.distributed.
        super().__init__(
            range(sum(sizes.values())),  # type: ignore[arg-type]  # typed Dataset; it only takes len() of it
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
        )
        self.sizes = {t: int(n) for t, n in sizes.items()}
        self.tasks = list(self.sizes)
        self.batch_size = batch_size
        self.sampling = sampling
        self.temperature = temperature
        self.probabilities = task_probabilities(list(self.sizes.values()), sampling, temperature)
        global_batch = batch_size * num_replicas
        rows = max(self.sizes.values()) if sampling == "all" else sum(self.sizes.values())
        self.steps_per_epoch = steps_per_epoch or max(1, math.ceil(rows / global_batch))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def task_sequence(self, epoch: int | None = None) -> np.ndarray:
        """Task indices of the steps of ``epoch`` (default: the current one); for ``all`` every step holds all."""
        epoch = self.epoch if epoch is None else epoch
        steps, num_tasks = self.steps_per_epoch, len(self.tasks)
        if self.sampling == "round_robin":
            # The cycle continues across epochs, so no task is favoured when steps_per_epoch % num_tasks != 0.
            return (epoch * steps + np.arange(steps)) % num_tasks
        if self.sampling == "all":
            return np.full(steps, -1)
        return _rng(self.seed, _TASK_STREAM, epoch).choice(num_tasks, size=steps, p=self.probabilities)

    def __iter__(self) -> Iterator[Parts]:
        epoch = self.epoch
        streams = [
            _RowStream(n, self.shuffle, _rng(self.seed, _ROW_STREAM, epoch, t))
            for t, n in enumerate(self.sizes.values())
        ]
        global_batch = self.batch_size * self.num_replicas
        for task in self.task_sequence(epoch).tolist():
            chosen = range(len(self.tasks)) if task < 0 else (task,)
            parts = []
            for t in chosen:
                chunk = streams[t].take(global_batch)
                parts.append((self.tasks[t], torch.from_numpy(chunk[self.rank :: self.num_replicas].copy())))
            yield tuple(parts)


class EvalBatchSampler(DistributedSampler):
    """Validation/test/predict batches, one task each, over every row of every task once.

    Each task's rows, in order, are cut into global chunks of ``batch_size * num_replicas`` rows; rank ``r`` takes
    rows ``r, r + W, ...`` of each chunk. ``interleave=True`` alternates tasks chunk by chunk (task 1, task 2, ...,
    task 1, ...), so a limited number of batches (``limit_val_batches``, the sanity check, ``fast_dev_run``) still
    sees every task; ``False`` gives all batches of task 1, then task 2, ... (the order of predictions).

    ``aligned=True`` (validation and test): every rank gets the same number of batches with the same task at each
    position, and a rank's share of a chunk that is short (a task's last chunk, or a task with fewer rows than
    processes) is padded to the others' size with copies of the chunk's first rows *whose labels are masked* (the
    third element of the part, see :class:`~mtl_lightning.data.per_task.PerTaskDataset`). So each rank updates the
    metrics of every task it evaluates, which torchmetrics needs (it all-gathers each task's states from every rank
    at ``compute``: a rank that never updated a task's metric would send a wrongly typed empty state and break the
    collective), while the padding changes no loss or metric value (unlike DistributedSampler's duplicated rows).
    ``aligned=False`` (predict): each rank gets only its own rows, no padding.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        batch_size: int,
        interleave: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        aligned: bool = True,
    ):
        if batch_size < 1:
            raise DataError(f"eval batch size must be >= 1, got {batch_size}")
        super().__init__(
            range(sum(sizes.values())),  # type: ignore[arg-type]  # typed Dataset; it only takes len() of it
            num_replicas=num_replicas,
            rank=rank,
            shuffle=False,
        )
        self.sizes = {t: int(n) for t, n in sizes.items()}
        self.batch_size = batch_size
        self.interleave = interleave
        self.aligned = aligned
        per_task = [self._task_batches(task, n) for task, n in self.sizes.items()]
        if interleave:
            longest = max((len(b) for b in per_task), default=0)
            order = [b[i] for i in range(longest) for b in per_task if i < len(b)]
        else:
            order = [part for batches in per_task for part in batches]
        self.batches: list[Parts] = [(part,) for part in order]

    def _task_batches(self, task: str, size: int) -> list[Part]:
        world, rank = self.num_replicas, self.rank
        batches: list[Part] = []
        for chunk in torch.arange(size).split(self.batch_size * world):
            rows = chunk[rank::world]
            if not self.aligned:
                if len(rows):
                    batches.append((task, rows))
                continue
            pad = math.ceil(len(chunk) / world) - len(rows)
            batches.append((task, torch.cat([rows, chunk[:pad]]), pad) if pad else (task, rows))
        return batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Parts]:
        return iter(self.batches)
