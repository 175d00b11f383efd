"""Per-task datasets: tasks that come from different datasets (different rows, different sizes), as in MT-DNN
(Liu et al., 2019) and jiant.

Each task has its own train (and optionally val/test) dataset; all share one input shape. Training batches hold one
task each (``{"inputs": x, "targets": {task: y}}``), the task of each step drawn by a sampling strategy
(:mod:`mtl_lightning.data.sampling`), or, with ``sampling: all``, one sub-batch of every task concatenated into one
batch whose targets mark the other tasks' rows as missing. The module treats a task absent from a batch as a zero
loss (still touching its head, so DDP sees every parameter used) and balancers renormalise over present tasks.
See docs/per_task_data.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from mtl_lightning.data.base import SPLITS, DataError, MultiTaskDataModule, split_indices
from mtl_lightning.data.datasets import MultiTaskTensorDataset, collate_batch
from mtl_lightning.data.loaders import resumable_loader
from mtl_lightning.data.sampling import (
    EvalBatchSampler,
    Part,
    Parts,
    TaskBatchSampler,
    check_sampling,
    task_probabilities,
)
from mtl_lightning.data.synthetic import _drop_labels, _label, latent_signals, task_directions
from mtl_lightning.data.tabular import TabularDataModule
from mtl_lightning.targets import check_targets
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

EVAL_SPLITS = ("val", "test")
_TABLE_PATHS = ("path", "train_path", "val_path", "test_path")
_SHARED_KEYS = ("val_fraction", "test_fraction")
SYNTHETIC_KEYS = ("num_samples", "seed", "missing_rate", *_SHARED_KEYS)
TABLE_KEYS = (*_TABLE_PATHS, "features", "categorical", "drop", "target", *_SHARED_KEYS)


# ------------------------------------------------------------------------------------------- reading rows
def _sample(item: Any, task: str) -> tuple[Any, Any]:
    """``(input, target)`` of one item of a user's dataset: ``(x, y)``, or ``{"inputs": x, "targets": y}`` where
    ``y`` is a tensor/number or a ``{task: y}`` dict."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, Mapping) and "inputs" in item and "targets" in item:
        target = item["targets"]
        if isinstance(target, Mapping):
            if task not in target:
                raise DataError(f"the dataset of task {task!r} gives targets for {sorted(target)} but not for {task!r}")
            target = target[task]
        return item["inputs"], target
    raise DataError(
        f"the dataset of task {task!r} gives items of type {type(item).__name__}; per-task datasets must give "
        "(input, target) pairs or {'inputs': x, 'targets': y} dicts (y a tensor or {task: tensor})"
    )


def _single(value: Any) -> Any:
    """float64 -> float32 (what numpy arrays and Python floats collate to): the model and losses are float32."""
    if isinstance(value, Tensor) and value.dtype == torch.float64:
        return value.float()
    if isinstance(value, Mapping):
        return {k: _single(v) for k, v in value.items()}
    return value


def task_rows(dataset: Dataset, task: str, rows: Tensor) -> tuple[Any, Tensor]:
    """``(inputs, target)`` of the given rows of one task's dataset (inputs a tensor or a dict of tensors).

    Tensor-backed datasets (:class:`MultiTaskTensorDataset`, ``TensorDataset``, ``Subset`` of either) are read by
    one index per tensor; any other map-style dataset item by item, then collated.
    """
    if isinstance(dataset, Subset):
        return task_rows(dataset.dataset, task, torch.as_tensor(dataset.indices, dtype=torch.long)[rows])
    if isinstance(dataset, MultiTaskTensorDataset):
        if task not in dataset.targets:
            raise DataError(
                f"the dataset of task {task!r} has targets for {sorted(dataset.targets)} but not for {task!r}"
            )
        batch = dataset.__getitems__(rows)
        return batch["inputs"], batch["targets"][task]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x.index_select(0, rows), y.index_select(0, rows)
    inputs, targets = zip(*(_sample(dataset[i], task) for i in rows.tolist()), strict=True)
    return _single(default_collate(list(inputs))), _single(default_collate(list(targets)))


def _missing_like(target: Tensor, count: int) -> Tensor:
    """``count`` rows of missing labels shaped and typed like ``target``'s rows (NaN, or -100 for class indices)."""
    fill = float("nan") if target.is_floating_point() else IGNORE_INDEX
    return torch.full((count, *target.shape[1:]), fill, dtype=target.dtype)


def _cat_inputs(inputs: Sequence[Any]) -> Any:
    if isinstance(inputs[0], Mapping):
        return {k: torch.cat([x[k] for x in inputs]) for k in inputs[0]}
    return torch.cat(list(inputs))


class PerTaskDataset(Dataset):
    """One split of per-task datasets, indexed by the samplers' parts ``((task, rows), ...)``.

    One part gives ``{"inputs": x, "targets": {task: y}}``. Several parts (``sampling: all``) give their rows
    concatenated in part order, each task's target covering every row with the other tasks' rows missing (NaN, or
    -100 for class indices), so the batch keeps the one batch format the module knows. A part ``(task, rows, k)``
    has its last ``k`` labels masked the same way (padding of evaluation batches under DDP).
    """

    def __init__(self, datasets: Mapping[str, Dataset]):
        self.datasets = dict(datasets)

    @property
    def sizes(self) -> dict[str, int]:
        return {task: len(ds) for task, ds in self.datasets.items()}  # type: ignore[arg-type]

    def __len__(self) -> int:
        return sum(self.sizes.values())

    def _fetch(self, part: Part) -> tuple[str, Any, Tensor]:
        task, rows, *masked = part
        x, y = task_rows(self.datasets[task], task, torch.as_tensor(rows))
        if masked and masked[0]:  # padding rows of evaluation batches: present, but unlabelled
            y = y.float() if y.dtype == torch.bool else y.clone()
            y[len(y) - masked[0] :] = float("nan") if y.is_floating_point() else IGNORE_INDEX
        return task, x, y

    def __getitem__(self, parts: Parts) -> dict[str, Any]:
        if not (isinstance(parts, (tuple, list)) and parts and all(len(p) in (2, 3) for p in parts)):
            raise TypeError(
                "PerTaskDataset is indexed by ((task, rows), ...) as TaskBatchSampler and EvalBatchSampler yield, "
                f"got {type(parts).__name__}"
            )
        fetched = [self._fetch(part) for part in parts]
        if len(fetched) == 1:
            task, x, y = fetched[0]
            return {"inputs": x, "targets": {task: y}}
        counts = [int(y.shape[0]) for _, _, y in fetched]
        total, start = sum(counts), 0
        targets: dict[str, Tensor] = {}
        for (task, _, y), n in zip(fetched, counts, strict=True):
            y = y.float() if y.dtype == torch.bool else y
            targets[task] = torch.cat([_missing_like(y, start), y, _missing_like(y, total - start - n)])
            start += n
        return {"inputs": _cat_inputs([x for _, x, _ in fetched]), "targets": targets}


# ----------------------------------------------------------------------------------------- the data module
class PerTaskDataModule(MultiTaskDataModule):
    """One dataset per task, with per-task sizes; training batches hold one task each, chosen by ``sampling``.

    Declare each task's data in ``sources`` (one entry per declared task), either generated or read from a table:

    - synthetic: ``{num_samples: 4000, seed: 1, missing_rate: 0.1}`` — rows from the MMoE-paper generator of
      :class:`SyntheticDataModule` with this task's size and seed (default: derived from ``seed`` and the task's
      position). Every task draws its own inputs but shares the generator's task directions (``correlation``) and
      non-linearity, so the tasks stay related; all use ``num_features`` inputs.
    - a table: ``{path: file.csv, target: column, drop: [id]}`` (or ``train_path``/``val_path``/``test_path``;
      ``features``/``categorical`` as in :class:`TabularDataModule`): read and encoded by a TabularDataModule of that
      one task. Each table is standardised with its own train split; the tables must encode to the same feature
      columns (same names and categories), else a DataError names the difference.

    ``val_fraction``/``test_fraction`` (here or per source) split each task's rows. From Python, pass datasets with
    :meth:`from_datasets`, or subclass and override :meth:`build_task_datasets`. Every task's inputs must have one
    shape and dtype (the encoder's ``input_shape``).

    Training (``sampling``; see :class:`~mtl_lightning.data.sampling.TaskBatchSampler`): ``round_robin`` cycles the
    tasks; ``proportional`` draws task ``t`` with ``p_t = n_t / Σ n``; ``temperature`` with ``p_t ∝ n_t^(1/T)``;
    ``all`` takes one sub-batch of ``batch_size`` rows of every task each step, concatenated. One epoch is
    ``steps_per_epoch`` steps (default: total train rows / global batch size; for ``all``, the largest task's rows /
    global batch size). Validation and test go over every task's own val/test rows, one task per batch.

    Args:
        tasks: Task specs.
        sources: ``{task: source}`` as above (not needed with :meth:`from_datasets` or an override).
        sampling: ``round_robin``, ``proportional``, ``temperature`` or ``all``.
        temperature: ``T`` of ``temperature`` sampling (> 0; 1 = proportional, large = uniform).
        steps_per_epoch: Training steps per epoch; default one pass over the rows (see above).
        num_features: Input dimension of synthetic sources.
        correlation: Relatedness of the synthetic tasks (cosine of their weight vectors).
        scale: Norm of the synthetic weight vectors.
        num_sin: Sine terms of the synthetic signal.
        noise: Label noise of synthetic sources.
        missing_rate: Fraction of missing labels in synthetic sources (overridable per source).
        val_fraction: Fraction of each task's rows for validation (overridable per source).
        test_fraction: Fraction of each task's rows for testing (overridable per source).
        **kwargs: Loader settings and ``seed`` of :class:`MultiTaskDataModule` (``seed`` also seeds the sampling;
            ``shuffle: false`` keeps each task's rows in order, the task sequence is still drawn from ``seed``).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        sources: dict[str, dict[str, Any]] | None = None,
        sampling: str = "proportional",
        temperature: float = 2.0,
        steps_per_epoch: int | None = None,
        num_features: int = 64,
        correlation: float = 0.8,
        scale: float = 1.0,
        num_sin: int = 10,
        noise: float = 0.1,
        missing_rate: float = 0.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ):
        # jsonargparse follows **kwargs into the base class, so the CLI still shows the loader settings.
        super().__init__(tasks, **kwargs)
        check_sampling(sampling, temperature)
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise DataError(f"steps_per_epoch must be >= 1 (or null for one pass over the data), got {steps_per_epoch}")
        self.sampling = sampling
        self.temperature = temperature
        self.steps_per_epoch = steps_per_epoch
        self.num_features = num_features
        self.correlation = correlation
        self.scale = scale
        self.num_sin = num_sin
        self.noise = noise
        self.missing_rate = missing_rate
        self.fractions = (val_fraction, test_fraction)
        split_indices(1, self.fractions, 0)  # fail now, not at setup, on impossible fractions
        # Table sources: one TabularDataModule per task, built now so that a missing file fails at construction.
        self._tables: dict[str, TabularDataModule] = {}
        self.sources = self._checked_sources(sources) if sources is not None else None
        self._given: Mapping[str, Any] | None = None
        self._task_datasets: dict[str, dict[str, Dataset]] | None = None
        self._signature: tuple[Any, str] | None = None

    @classmethod
    def from_datasets(  # type: ignore[override]  # other arguments than LightningDataModule's: tasks come first
        cls, tasks: Sequence[TaskSpec], datasets: Mapping[str, Dataset | Mapping[str, Dataset]], **kwargs: Any
    ) -> PerTaskDataModule:
        """A data module over your own datasets: ``{task: {"train": ds, "val": ds, "test": ds}}`` (val/test optional),
        or ``{task: ds}`` to split ``ds`` by ``val_fraction``/``test_fraction`` and ``seed``. Items are ``(x, y)``
        pairs or ``{"inputs": x, "targets": y}`` dicts; :class:`MultiTaskTensorDataset` and ``TensorDataset`` are
        read fastest (one index per tensor)."""
        module = cls(tasks, **kwargs)
        module._given = dict(datasets)
        return module

    # --------------------------------------------------------------------------------------------- sources
    def _checked_sources(self, sources: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        names = [t.name for t in self.tasks]
        unknown = sorted(set(sources) - set(names))
        if unknown:
            raise DataError(f"sources names tasks that are not declared: {unknown}; declared tasks are {names}")
        self._check_all_tasks_have_data(sources, "sources")
        checked = {}
        for spec in self.tasks:
            source = sources[spec.name]
            if not isinstance(source, Mapping):
                raise DataError(
                    f"sources.{spec.name} must be a mapping such as {{num_samples: 1000}} or {{path: file.csv}}, "
                    f"got {source!r}"
                )
            source = dict(source)
            table = any(source.get(k) is not None for k in _TABLE_PATHS)
            if table and source.get("num_samples") is not None:
                raise DataError(
                    f"sources.{spec.name} gives both num_samples (synthetic data) and a table path; give one of them"
                )
            if not table and source.get("num_samples") is None:
                raise DataError(
                    f"sources.{spec.name} needs num_samples (generated rows) or path/train_path (a CSV or Parquet "
                    f"table); got keys {sorted(source)}"
                )
            allowed = TABLE_KEYS if table else SYNTHETIC_KEYS
            stray = sorted(set(source) - set(allowed))
            if stray:
                raise DataError(
                    f"sources.{spec.name} ({'table' if table else 'synthetic'}) has unknown keys {stray}; allowed "
                    f"keys: {list(allowed)}"
                )
            if table:
                self._tables[spec.name] = self._table_module(spec, source)
            else:
                if int(source["num_samples"]) < 1:
                    raise DataError(
                        f"task {spec.name!r} has an empty dataset: sources.{spec.name}.num_samples must be >= 1, "
                        f"got {source['num_samples']}"
                    )
                rate = source.get("missing_rate", self.missing_rate)
                if not 0.0 <= rate < 1.0:
                    raise DataError(f"sources.{spec.name}.missing_rate must be in [0, 1), got {rate}")
                split_indices(1, self._fractions(source), 0)
            checked[spec.name] = source
        if len(self._tables) < len(checked):  # synthetic sources: fail now on impossible generator settings
            task_directions(self.num_features, len(self.tasks), self.correlation, self.scale, torch.Generator())
        return checked

    def _check_all_tasks_have_data(self, given: Mapping[str, Any], what: str) -> None:
        absent = [t.name for t in self.tasks if given.get(t.name) is None]
        if absent:
            raise DataError(
                f"tasks {absent} are declared but have no dataset in {what}; give each declared task its data "
                f"(found: {sorted(k for k, v in given.items() if v is not None)}) or remove the task"
            )

    def _fractions(self, source: Mapping[str, Any]) -> tuple[float, float]:
        return (
            float(source.get("val_fraction", self.fractions[0])),
            float(source.get("test_fraction", self.fractions[1])),
        )

    def _table_module(self, spec: TaskSpec, source: Mapping[str, Any]) -> TabularDataModule:
        """A TabularDataModule of this one task: it reads, splits and encodes the table (lazily)."""
        val_fraction, test_fraction = self._fractions(source)
        target = source.get("target")
        return TabularDataModule(
            [spec],
            **{k: source.get(k) for k in (*_TABLE_PATHS, "features", "categorical", "drop")},
            target_columns={spec.name: target} if target is not None else None,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=self.seed,
        )

    def _synthetic(self, spec: TaskSpec, source: Mapping[str, Any]) -> dict[str, Dataset]:
        """This task's generated rows, split; the task directions and the non-linearity are shared by all tasks."""
        index = [t.name for t in self.tasks].index(spec.name)
        shared = torch.Generator().manual_seed(self.seed)
        directions = task_directions(self.num_features, len(self.tasks), self.correlation, self.scale, shared)
        seed = source.get("seed")
        if seed is None:  # a per-task seed of its own, independent of the others'
            seed = int(np.random.SeedSequence([self.seed % 2**63, index]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn(int(source["num_samples"]), self.num_features, generator=gen)
        # latent_signals draws the sine terms from its generator: a copy of the shared one gives every task the same.
        sines = torch.Generator()
        sines.set_state(shared.get_state())
        signal = latent_signals(x, directions[index : index + 1], self.num_sin, sines)[:, 0]
        target = _label(spec, signal, self.noise, gen)
        rate = source.get("missing_rate", self.missing_rate)
        if rate:
            target = _drop_labels(target, rate, gen)
        data = MultiTaskTensorDataset(x, {spec.name: target})
        parts = split_indices(len(data), self._fractions(source), int(seed))
        return {split: data.subset(rows) for split, rows in zip(("train", "val", "test"), parts, strict=True)}

    # --------------------------------------------------------------------------------- for subclasses/users
    def build_task_datasets(self) -> Mapping[str, Dataset | Mapping[str, Dataset]]:
        """The datasets of each task: ``{task: {"train": ds, "val": ds, "test": ds}}`` (val/test optional), or
        ``{task: ds}`` to split ``ds`` by ``val_fraction``/``test_fraction``. Override this to plug in your own.

        Items are ``(x, y)`` pairs or ``{"inputs": x, "targets": y}`` dicts, ``y`` a tensor (or number) or a dict
        holding this task's target; every task's ``x`` has the same shape and dtype.
        """
        if self._given is not None:
            return self._given
        if self.sources is None:
            raise DataError(
                f"{type(self).__name__} has no data: set sources (one entry per task), build it with "
                "PerTaskDataModule.from_datasets(tasks, {task: dataset}), or override build_task_datasets"
            )
        out: dict[str, Dataset | Mapping[str, Dataset]] = {}
        for spec in self.tasks:
            table = self._tables.get(spec.name)
            out[spec.name] = (
                dict(table.datasets) if table is not None else self._synthetic(spec, self.sources[spec.name])
            )
        return out

    # ------------------------------------------------------------------------------------------ checking
    @property
    def task_datasets(self) -> dict[str, dict[str, Dataset]]:
        """``{task: {split: dataset}}`` after checks (built once): every task has a non-empty train set, the inputs
        share one shape and dtype, targets fit their specs. Empty val/test sets are dropped."""
        if self._task_datasets is None:
            given = dict(self.build_task_datasets())
            names = [t.name for t in self.tasks]
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise DataError(
                    f"datasets given for tasks that are not declared: {unknown}; declared tasks are {names}"
                )
            self._check_all_tasks_have_data(given, "the per-task datasets")
            self._check_features()
            built = {}
            for spec in self.tasks:
                built[spec.name] = self._checked_task(spec, self._splits(spec.name, given[spec.name]))
            self._task_datasets = built
        return self._task_datasets

    def _splits(self, task: str, data: Dataset | Mapping[str, Dataset]) -> dict[str, Dataset]:
        if isinstance(data, Mapping):
            stray = sorted(set(data) - set(SPLITS))
            if stray:
                raise DataError(f"the datasets of task {task!r} have unknown splits {stray}; use train, val, test")
            return {k: v for k, v in data.items() if k != "predict" and v is not None}
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"the dataset of task {task!r} is empty: give it at least one row")
        parts = split_indices(n, self.fractions, self.seed)
        if isinstance(data, MultiTaskTensorDataset):
            return {s: data.subset(rows) for s, rows in zip(("train", "val", "test"), parts, strict=True)}
        return {s: Subset(data, rows.tolist()) for s, rows in zip(("train", "val", "test"), parts, strict=True)}

    def _checked_task(self, spec: TaskSpec, splits: dict[str, Dataset]) -> dict[str, Dataset]:
        if len(splits.get("train") or ()) == 0:  # type: ignore[arg-type]
            raise DataError(
                f"task {spec.name!r} has an empty training set: give it rows (or lower its val/test fractions)"
            )
        kept = {}
        for split, ds in splits.items():
            n = len(ds)  # type: ignore[arg-type]
            if n == 0:
                continue  # no val/test rows for this task: it gets no val/test metrics
            where = f"the {split!r} data of task {spec.name!r}"
            tensor_backed = isinstance(ds, (MultiTaskTensorDataset, TensorDataset))
            x, y = task_rows(ds, spec.name, torch.arange(n) if tensor_backed else torch.arange(1))
            self._check_inputs(x, where)
            check_targets({spec.name: spec}, {spec.name: y}, int(y.shape[0]), where, values=True)
            kept[split] = ds
        return kept

    def _check_inputs(self, x: Any, where: str) -> None:
        if isinstance(x, Mapping):
            signature: Any = {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in x.items()}
        elif isinstance(x, Tensor):
            signature = (tuple(x.shape[1:]), str(x.dtype))
        else:
            raise DataError(f"{where}: inputs must be tensors (or dicts of tensors), got {type(x).__name__}")
        if self._signature is None:
            self._signature = (signature, where)
        elif signature != self._signature[0]:
            raise DataError(
                f"every task's inputs must have one shape and dtype (the encoder's input_shape), but {where} has "
                f"{_describe(signature)} while {self._signature[1]} has {_describe(self._signature[0])}. Give the "
                "tasks the same features (synthetic sources use num_features; tables must encode to the same columns)"
            )

    def _check_features(self) -> None:
        """Tables of different tasks must encode to the same columns, in the same order (a width check alone would
        let ``region=east`` of one table meet ``region=west`` of another)."""
        seen: tuple[str, list[str]] | None = None
        for spec in self.tasks:
            if self._given is not None or spec.name not in self._tables:
                continue
            names = self._tables[spec.name].feature_names
            if seen is None:
                seen = (spec.name, names)
            elif names != seen[1]:
                diff = sorted(set(names) ^ set(seen[1])) or "the same columns in another order"
                raise DataError(
                    f"the tables of tasks {seen[0]!r} and {spec.name!r} encode to different feature columns "
                    f"(differing: {diff}); give them the same feature columns and categories (set features/drop/"
                    "categorical per source), or one table with every task (TabularDataModule)"
                )

    # --------------------------------------------------------------------------------------- base-class API
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input row, common to every task (checked)."""
        _ = self.task_datasets
        assert self._signature is not None
        signature = self._signature[0]
        if isinstance(signature, dict):
            raise DataError(
                f"the tasks' inputs are dicts ({_describe(signature)}), which have no single input_shape: override "
                f"{type(self).__name__}.input_shape for your encoder"
            )
        return signature[0]

    def build_datasets(self) -> dict[str, Dataset]:
        out: dict[str, Dataset] = {}
        for split in ("train", *EVAL_SPLITS):
            parts = {t: d[split] for t, d in self.task_datasets.items() if split in d}
            if parts:
                out[split] = PerTaskDataset(parts)
        return out

    @property
    def task_sizes(self) -> dict[str, dict[str, int]]:
        """Rows per split and task: ``{split: {task: n}}``."""
        return {split: ds.sizes for split, ds in self.datasets.items() if split != "predict"}  # type: ignore[attr-defined]

    @property
    def sampling_probabilities(self) -> dict[str, float]:
        """Each task's probability of being drawn at a training step (its share of steps for round_robin/all)."""
        sizes = self.datasets["train"].sizes  # type: ignore[attr-defined]
        p = task_probabilities(list(sizes.values()), self.sampling, self.temperature)
        return dict(zip(sizes, p.tolist(), strict=True))

    # ------------------------------------------------------------------------------------------- loaders
    def _per_task_loader(self, dataset: Dataset, sampler: TaskBatchSampler | EvalBatchSampler) -> DataLoader:
        # batch_size=None: each sampler item is a whole batch (see mtl_lightning/data/sampling.py for why the
        # sampler is the loader's `sampler`, not its `batch_sampler`). Training resumes mid-epoch (data/loaders.py).
        if isinstance(sampler, TaskBatchSampler):
            return resumable_loader(
                dataset,
                sampler,
                self.seed,
                None,
                collate_batch,
                self.num_workers,
                self.pin_memory,
                self.persistent_workers,
                self._current_epoch(),
            )
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_batch,
        )

    def train_sampler(self) -> TaskBatchSampler:
        """This process's training sampler (its ``set_epoch`` is called by Lightning every epoch)."""
        num_replicas, rank = self._replicas()
        return TaskBatchSampler(
            self.datasets["train"].sizes,  # type: ignore[attr-defined]
            self.batch_size,
            sampling=self.sampling,
            temperature=self.temperature,
            steps_per_epoch=self.steps_per_epoch,
            shuffle=self.shuffle,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        probabilities = ", ".join(f"{t} {p:.3f}" for t, p in self.sampling_probabilities.items())
        rank_zero_info(
            f"per-task training data: rows {self.datasets['train'].sizes}; sampling {self.sampling}"  # type: ignore[attr-defined]
            f"{f' (T={self.temperature:g})' if self.sampling == 'temperature' else ''}: {probabilities}; "
            f"{len(sampler)} steps per epoch"
        )
        return self._per_task_loader(self.datasets["train"], sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        num_replicas, rank = self._replicas()
        ds = self.datasets[split]
        # Predict: task by task, each task's rows in order (on one process, predictions line up with
        # task_datasets[task]["test"]) and no padding. Val/test: interleaved and aligned across ranks (metrics).
        predict = split == "predict"
        sampler = EvalBatchSampler(
            ds.sizes,  # type: ignore[attr-defined]
            self.eval_batch_size,
            interleave=not predict,
            num_replicas=num_replicas,
            rank=rank,
            aligned=not predict,
        )
        return self._per_task_loader(ds, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")


def _describe(signature: Any) -> str:
    if isinstance(signature, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in signature.items()) + "}"
    shape, dtype = signature
    return f"shape {shape} ({dtype.replace('torch.', '')})"
