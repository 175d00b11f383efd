"""The optional hooks of encoders, data modules and balancers, written down as :class:`typing.Protocol`\\ s.

Nothing here has to be inherited: a class satisfies a protocol by having the member, and the code that reads a
hook tests ``isinstance(obj, Protocol)`` (every protocol is runtime-checkable) instead of probing with ``getattr``.
So a forking team learns here what each hook means, when it is called and what it must return, and the type
checker tells it when an implementation does not match.

Who reads what:

====================================  ==========================================================================
protocol                              read by
====================================  ==========================================================================
:class:`Encoder`                      the module, to build one head per task on ``out_features``
:class:`SupportsBindTasks`            the module, whenever its task list is set or changed
:class:`SupportsFSDPUnits`            ``sharding.py`` (FSDP1 auto-wrap policy, FSDP2 ``fully_shard``)
:class:`SupportsTrainingLogs`         the module, on logging steps (``train/encoder/<key>``)
:class:`SupportsFlopsPerSample`       ``callbacks.ThroughputTimer`` (MFU)
:class:`HasInputShape`                ``export.py`` (example inputs of a checkpoint without its config)
:class:`HasVocabSize`                 ``export.py`` (example token ids)
:class:`MultiTaskData`                the CLI (links ``tasks`` and ``input_shape`` into the model), ``export.py``
:class:`HasSplitRows`                 ``callbacks.PredictionWriter`` (``source_row`` column)
:class:`HasClassNames`                ``callbacks.PredictionWriter`` (``<task>_label`` column)
:class:`HasInputSchema`               ``callbacks.InputSchemaCheckpoint`` (what ``mtl serve`` encodes records with)
:class:`BatchPartsSampler`            ``callbacks.PredictionWriter`` (``task`` and ``id`` of per-task batches)
:class:`HasGradientTelemetry`         ``callbacks.GradientConflictHeatmap``, ``callbacks.TaskAffinity``
:class:`HasGradientMode`              ``callbacks.EncoderFinetuning`` (refuses to freeze under parameter mode)
====================================  ==========================================================================

How ``isinstance`` finds a data member (``out_features``, ``split_rows``, ``last_cosine``, ...) depends on the
Python version: up to 3.11 it calls ``hasattr``, so a property behind the member runs (keep it cheap or cached);
from 3.12 it looks the name up statically, so make the member a plain attribute, a property or a class attribute,
not a registered buffer, parameter or submodule (those live in ``nn.Module``'s own dicts, where it does not look).

This module imports nothing at run time beyond :mod:`typing`, so any layer may import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor, nn

    from mtl_lightning.input_schema import InputSchema
    from mtl_lightning.tasks import TaskSpec

__all__ = [
    "BatchPartsSampler",
    "Encoder",
    "HasClassNames",
    "HasGradientMode",
    "HasGradientTelemetry",
    "HasInputSchema",
    "HasInputShape",
    "HasSplitRows",
    "HasVocabSize",
    "MultiTaskData",
    "SupportsBindTasks",
    "SupportsFSDPUnits",
    "SupportsFlopsPerSample",
    "SupportsTrainingLogs",
]


# ------------------------------------------------------------------------------------------------------ encoders
@runtime_checkable
class Encoder(Protocol):
    """The one required contract of an encoder (any ``nn.Module`` given by ``class_path``).

    ``encoder(inputs)`` returns one tensor ``(N, D)`` (hard sharing: every head reads it) or a ``{task: tensor}``
    mapping with a representation per task (MMoE, PLE, cross-stitch, ...). ``out_features`` says how wide:

    - an ``int`` ``D`` for one shared tensor;
    - a ``{task: int}`` mapping for one tensor per task; it must name every task of the model.

    A per-task encoder (one that also has :class:`SupportsBindTasks`) learns the task names in ``bind_tasks``, so
    its ``out_features`` is only valid after that call: before it, the built-in ones return ``{}``. The module
    calls ``bind_tasks`` first and reads ``out_features`` right after, for the tasks it has just bound.
    """

    @property
    def out_features(self) -> int | Mapping[str, int]: ...

    def __call__(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor | Mapping[str, Tensor]: ...


@runtime_checkable
class SupportsBindTasks(Protocol):
    """An encoder with parts per task (gates, towers, columns, embeddings) that must know the task names.

    ``bind_tasks(names)`` is called by the module with the model's task names, in the model's order, when the
    model is built and again whenever a task is added or removed between fits. It must:

    - keep the parts of tasks that stay (the same module objects, so their weights and optimizer-visible
      parameters carry over), build parts for new tasks (on the device and dtype of the existing parameters), and
      drop the parts of tasks that are gone;
    - make ``out_features`` a ``{task: int}`` covering exactly ``names``, and ``forward`` return those keys;
    - forget per-task statistics of the old task list (what ``training_logs`` reports).

    :class:`mtl_lightning.encoders.PerTaskEncoder` implements all of this; subclass it.
    """

    def bind_tasks(self, names: list[str]) -> None: ...


@runtime_checkable
class SupportsFSDPUnits(Protocol):
    """An encoder that names the blocks to shard one by one under FSDP.

    ``fsdp_units()`` returns submodules of the encoder (its layers, experts or columns); each becomes its own FSDP
    unit (FSDP1's auto-wrap policy, FSDP2's ``fully_shard``), so only one block's full parameters are gathered at a
    time. Each must be called through its own forward (FSDP gathers the parameters in forward hooks), so name the
    blocks, not an ``nn.ModuleList`` or ``nn.ModuleDict`` of them. What no unit holds goes in the encoder's own
    unit. Called when the model is built and when it is sharded; return the same modules both times. An encoder
    without the hook is sharded as one unit.
    """

    def fsdp_units(self) -> Sequence[nn.Module]: ...


@runtime_checkable
class SupportsTrainingLogs(Protocol):
    """An encoder that reports scalars about its last training forward (gate entropy, expert load, ...).

    ``training_logs()`` is called by the module on the training steps whose logs are written; each value is
    logged as ``train/encoder/<key>``, averaged over ranks. Return the same keys on every call and on every rank
    (DDP deadlocks otherwise): zeros before the first training forward or after ``bind_tasks``. Keep the forward
    cheap: store detached references there and compute the statistics here, on logging steps only.
    """

    def training_logs(self) -> Mapping[str, Tensor]: ...


@runtime_checkable
class SupportsFlopsPerSample(Protocol):
    """An encoder that counts its own training FLOPs, for the model FLOPs utilisation of ``ThroughputTimer``.

    ``flops_per_sample()``: matmul FLOPs of one sample's forward and backward through the encoder (the
    Transformer counts attention, which ``6 * parameters`` misses). Without the hook the timer uses ``6 *
    parameters``. Called once, before the model is sharded or compiled.
    """

    def flops_per_sample(self) -> int: ...


@runtime_checkable
class HasInputShape(Protocol):
    """An encoder (or data module) that keeps the shape of one input sample.

    ``export`` makes a random example batch from the encoder's ``input_shape`` when the checkpoint does not hold
    the encoder's config.
    """

    @property
    def input_shape(self) -> Sequence[int]: ...


@runtime_checkable
class HasVocabSize(Protocol):
    """An encoder of token ids: its inputs are integers in ``[0, vocab_size)``; ``export`` draws example ids there."""

    @property
    def vocab_size(self) -> int: ...


# -------------------------------------------------------------------------------------------------- data modules
@runtime_checkable
class MultiTaskData(Protocol):
    """What the CLI and ``export`` read off a data module (every ``MultiTaskDataModule`` has both).

    ``tasks``: the task specs, declared once with the data and linked into the model. ``input_shape``: the shape
    of one input sample, linked into the encoder's ``input_shape``.
    """

    @property
    def tasks(self) -> Sequence[TaskSpec]: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class HasSplitRows(Protocol):
    """A data module read from files that can say where each split's rows came from.

    ``split_rows[split]``: the 0-based positions, in the source file, of the split's rows, in dataset order
    (splits ``train``, ``val``, ``test``, ``predict``). The prediction writer adds a ``source_row`` column from
    ``split_rows["predict"]`` (else ``"test"``) when its length matches the predict dataset.
    """

    @property
    def split_rows(self) -> Mapping[str, Sequence[int] | np.ndarray]: ...


@runtime_checkable
class HasInputSchema(Protocol):
    """A data module that encodes named columns (a table): ``input_schema`` is its fitted encoding, or None.

    :class:`~mtl_lightning.callbacks.input_schema.InputSchemaCheckpoint` saves it in every checkpoint, so that
    ``mtl serve`` takes records by column name and encodes them as training did.
    """

    @property
    def input_schema(self) -> InputSchema | None: ...


@runtime_checkable
class HasClassNames(Protocol):
    """A data module whose class labels have names (string-valued targets in a file).

    ``class_names[task][i]``: the name of class ``i`` of a binary or multiclass task; tasks with integer labels
    are left out. The prediction writer adds a ``<task>_label`` column with the predicted class's name.
    """

    @property
    def class_names(self) -> Mapping[str, Sequence[str]]: ...


@runtime_checkable
class BatchPartsSampler(Protocol):
    """A sampler that yields whole batches made of parts ``((source, rows), ...)`` (the per-task data module's).

    ``batches[i]`` is batch ``i``'s parts: ``source`` names the dataset (the task) and ``rows`` the positions in it
    (a part may carry a third item, the number of padding rows). Lightning records no indices for such a sampler,
    so the prediction writer reads the rows of each predicted batch here.
    """

    @property
    def batches(self) -> Sequence[Sequence[tuple[Any, ...]]]: ...


# ----------------------------------------------------------------------------------------------------- balancers
@runtime_checkable
class HasGradientTelemetry(Protocol):
    """A balancer that keeps the pairwise cosines of the per-task gradients (every gradient method does).

    ``last_cosine``: the latest ``T x T`` matrix, rows and columns in ``task_names`` order; ``None`` until it is
    first computed (on logging steps, with ``telemetry: true``). Replace the tensor rather than writing into it:
    the heatmap callback draws a new image only when it sees a new object.
    """

    @property
    def last_cosine(self) -> Tensor | None: ...

    @property
    def task_names(self) -> Sequence[str]: ...


@runtime_checkable
class HasGradientMode(Protocol):
    """A gradient balancer that says which Jacobian it takes.

    ``mode``: ``"representation"`` (gradients w.r.t. the shared representation: cheap, works with frozen encoder
    parameters) or ``"parameter"`` (w.r.t. the encoder's trainable parameters: exact, and every one of them must
    take part, so callbacks that freeze encoder parameters refuse it).
    """

    @property
    def mode(self) -> str: ...
