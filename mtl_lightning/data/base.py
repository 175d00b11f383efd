"""Base class of multi-task data modules: task specs, input shape, deterministic splits and data loaders."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from mtl_lightning.data.datasets import MultiTaskTensorDataset, collate_batch
from mtl_lightning.data.loaders import epoch_sampler, resumable_loader
from mtl_lightning.errors import ConfigError
from mtl_lightning.targets import check_targets
from mtl_lightning.tasks import TaskSpec, parse_tasks

SPLITS = ("train", "val", "test", "predict")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class DataError(ConfigError):
    """The data does not fit the declared tasks or the split settings."""


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into consecutive parts of the given fractions (the rest
    is the first part), so a split depends only on ``n``, the fractions and the seed."""
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise DataError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(n * f) for f in fractions]
    parts, start = [], n - sum(sizes)
    parts.append(perm[:start])
    for size in sizes:
        parts.append(perm[start : start + size])
        start += size
    return parts


def split_generated(data: MultiTaskTensorDataset, fractions: Sequence[float], seed: int) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` subsets of generated rows, cut by :func:`split_indices`."""
    train, val, test = split_indices(len(data), fractions, seed)
    return {"train": data.subset(train), "val": data.subset(val), "test": data.subset(test)}


class MultiTaskDataModule(LightningDataModule):
    """Yields batches ``{"inputs": x, "targets": {task: y}}``; subclasses only build the datasets.

    Subclasses implement :meth:`build_datasets` (returning datasets for some of ``train``, ``val``, ``test``,
    ``predict``) and :attr:`input_shape`. The CLI links ``tasks`` and ``input_shape`` into the model.

    Args:
        tasks: The task specs (declared here, once, and linked into the model).
        batch_size: Training batch size.
        eval_batch_size: Batch size for val/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory for faster transfers to a GPU.
        persistent_workers: Keep workers alive between epochs (needs ``num_workers > 0``).
        seed: Seed of the train/val/test split, independent of the training seed.
        shuffle: Reshuffle the training set every epoch. ``False`` gives every process count the same global
            batches (rank ``r`` of ``W`` takes rows ``r, r + W, ...`` of them), which makes a DDP run comparable
            step by step with a single process.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise DataError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        if persistent_workers and num_workers == 0:
            raise DataError("persistent_workers=True needs num_workers > 0")
        self.tasks: list[TaskSpec] = parse_tasks(tasks)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.shuffle = shuffle
        self._datasets: dict[str, Dataset] | None = None

    # ------------------------------------------------------------------------------------ for subclasses
    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, linked into the encoder's ``input_shape``."""

    @abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """Datasets by split name; ``predict`` defaults to ``test``."""

    # -------------------------------------------------------------------------------------------- set-up
    @property
    def datasets(self) -> dict[str, Dataset]:
        """The validated datasets (built on first use, once per process)."""
        if self._datasets is None:
            datasets: dict[str, Dataset | None] = dict(self.build_datasets())
            datasets.setdefault("predict", datasets.get("test"))
            built = {k: v for k, v in datasets.items() if v is not None}
            for split, ds in built.items():
                self._validate(split, ds)
            self._datasets = built  # only once valid: a later access must not skip a check that failed
        return self._datasets

    def __repr__(self) -> str:
        # LightningDataModule's __str__ builds every data loader and hides their errors; jsonargparse formats the
        # data module while it links it into the model, which read the whole data set and swallowed a failed check.
        return f"{type(self).__name__}(tasks={[t.name for t in self.tasks]})"

    __str__ = __repr__

    def setup(self, stage: str) -> None:
        for split in _STAGE_SPLITS.get(stage, ()):
            if split not in self.datasets:
                raise DataError(f"{type(self).__name__} has no {split!r} split, which stage {stage!r} needs")

    def _validate(self, split: str, ds: Dataset) -> None:
        n = len(ds)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(
                f"the {split!r} split is empty: give more rows or change the split fractions of {type(self).__name__}"
            )
        if not isinstance(ds, MultiTaskTensorDataset):
            return
        specs = {t.name: t for t in self.tasks}
        if split == "train":
            absent = sorted(set(specs) - set(ds.targets))
            if absent:
                raise DataError(
                    f"tasks {absent} are declared but the training data has no targets for them; "
                    f"targets found: {sorted(ds.targets)}. Fix the task names or the data's target columns"
                )
        check_targets(specs, ds.targets, n, f"the {split!r} split", values=True)
        if split == "predict":
            return  # predict data may legitimately come without labels
        for name, target in ds.targets.items():
            # A task with no label in a split still trains its head (train) and reports nan loss and metrics there.
            kind = specs[name].task_kind
            if not bool(kind.label_mask(specs[name], kind.canonical_target(specs[name], target)).any()):
                raise DataError(
                    f"task {name!r} has no labels in the {split!r} split (all {n} rows missing), so its loss and "
                    f"metrics there would be nan: give that split rows labelled for {name!r} (fill its target "
                    "column, or change the seed or split fractions) or remove the task"
                )

    # ------------------------------------------------------------------------------------------- loaders
    def _replicas(self) -> tuple[int, int]:
        """(num_replicas, rank) of the data-parallel group, from the strategy ((1, 0) on one process or outside a
        Trainer, e.g. a loader built by hand)."""
        kwargs = getattr(getattr(self.trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _current_epoch(self) -> int:
        """The epoch the training loader is built for: the number of epochs the fit loop has processed (restored from
        the checkpoint on resume), which is what Lightning passes to ``set_epoch``; 0 outside a Trainer."""
        progress = getattr(getattr(self.trainer, "fit_loop", None), "epoch_progress", None)
        return int(progress.current.processed) if progress is not None else 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        collate = collate_batch if isinstance(ds, MultiTaskTensorDataset) else default_collate
        if split == "train":
            # Always a DistributedSampler, also on one process: Lightning leaves one alone (its own always shuffles,
            # so with shuffle=False W processes would see other batches than one process), calls its set_epoch, and
            # its order depends only on the seeds and the epoch, which an exact resume needs (data/loaders.py).
            num_replicas, rank = self._replicas()
            sampler = epoch_sampler(ds, shuffle, self.seed, num_replicas, rank)
            return resumable_loader(
                ds,
                sampler,
                self.seed,
                self.batch_size,
                collate,
                self.num_workers,
                self.pin_memory,
                self.persistent_workers,
                self._current_epoch(),
            )
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
