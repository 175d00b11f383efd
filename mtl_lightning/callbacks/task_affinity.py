"""Inter-task affinity measured during training, as TAG does (Fifty et al., NeurIPS 2021, "Efficiently Identifying
Task Groupings for Multi-Task Learning").

Every ``every_n_steps`` optimizer steps, on that step's training batch and before the step updates the weights, the
callback takes for each task ``i`` the gradient ``g_i`` of its loss w.r.t. the shared parameters (the encoder's
trainable ones), makes a lookahead SGD step ``θ' = θ - lr g_i`` on them alone, and recomputes every task's loss on the
same batch::

    Z[i -> j] = 1 - L_j(θ') / L_j(θ)      (> 0: a step on task i lowers task j's loss; < 0: it raises it)

The running mean of ``Z`` over the measured steps is TAG's affinity; :mod:`mtl_lightning.affinity` turns it into task
groupings. Nothing of the training changes: the lookahead parameters are separate tensors (``torch.func``), the
random state is replayed before each forward and restored afterwards (dropout draws the masks the training step is
about to draw), and the module's buffers (BatchNorm statistics) are put back; a run with the callback ends with the
very weights of a run without it.

A cheap proxy is kept beside it when the balancer is a gradient balancer (it meets
:class:`~mtl_lightning.contracts.HasGradientTelemetry`): the running mean of the pairwise cosines of the per-task
gradients that the balancer computes anyway on its logging steps. It is a proxy only: a cosine says whether two
gradients point the same way (w.r.t. whatever the balancer differentiates, the representation by default), not how
much a step on one lowers the other's loss, and it is symmetric where affinity is not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor
from torch.func import functional_call

from mtl_lightning.balancers.telemetry import MAX_PAIRS_LOGGED
from mtl_lightning.batches import unpack_batch
from mtl_lightning.callbacks.conflict_heatmap import cosine_heatmap, signed_heatmap, task_order, write_heatmap
from mtl_lightning.contracts import HasGradientTelemetry
from mtl_lightning.errors import ConfigError
from mtl_lightning.sharding import is_sharded

PREFIX = "train/affinity"  # scalars train/affinity/{i}/{j}: the mean effect of a step on task i onto task j
PROXY_PREFIX = "train/affinity_cosine"  # scalars train/affinity_cosine/{a}/{b}: the mean gradient cosine (a < b)
HEATMAP_TAG = "train/affinity_heatmap"
PROXY_HEATMAP_TAG = "train/affinity_cosine_heatmap"
# Directed pairs i != j are logged as scalars up to 8 tasks (56 pairs, as many scalars as the cosines' 28 pairs both
# ways); the diagonal (a task onto itself) with them. Beyond that, only the heatmap and the saved state have them.
MAX_DIRECTED_PAIRS_LOGGED = 2 * MAX_PAIRS_LOGGED
SHARED_PREFIX = "encoder."  # the shared parameters: the encoder's (the heads are each task's own)


@runtime_checkable
class AffinityModel(Protocol):
    """What the measurement reads off a LightningModule (:class:`~mtl_lightning.MultiTaskModule` has it all).

    ``model(inputs)`` gives every task's raw outputs; :meth:`task_losses` their per-task (sum, count) in
    ``task_names`` order; the parameters named ``encoder.*`` are the shared ones.
    """

    tasks: Mapping[str, Any]

    @property
    def task_names(self) -> list[str]: ...

    @property
    def active_tasks(self) -> list[str]: ...

    def task_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], canonical: bool = False
    ) -> tuple[Tensor, Tensor]: ...


def shared_parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """The trainable shared parameters by their names in ``model`` (``encoder.*``), as ``functional_call`` takes them."""
    return {n: p for n, p in model.named_parameters() if n.startswith(SHARED_PREFIX) and p.requires_grad}


def optimizer_learning_rates(
    optimizers: Sequence[torch.optim.Optimizer], params: Mapping[str, Tensor]
) -> dict[str, float]:
    """The current learning rate of each of ``params`` (its parameter group's); parameters no optimizer holds are
    left out (they are not trained, so a lookahead step must not move them either)."""
    lr_of = {id(p): float(group["lr"]) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return {name: lr_of[id(p)] for name, p in params.items() if id(p) in lr_of}


@contextmanager
def replayed_randomness(model: torch.nn.Module, device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield ``replay()``, which puts the random state back to where it was on entry; restore it and the module's
    buffers on exit.

    Replaying before every forward gives each one the same dropout masks, so that ``L(θ')`` and ``L(θ)`` differ by the
    step alone; restoring leaves the training step the random draws it would have had without the measurement.
    """
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def replay() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    try:
        yield replay
    finally:
        replay()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _mean_losses(
    model: AffinityModel, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    sums, counts = model.task_losses(outputs, targets)
    return sums / counts.clamp_min(1), counts > 0


def lookahead_affinity(
    model: torch.nn.Module,
    inputs: Any,
    targets: Mapping[str, Tensor],
    lr: float | Mapping[str, float],
    tasks: Sequence[str] | None = None,
) -> Tensor:
    """TAG's ``Z[i -> j] = 1 - L_j(θ - lr g_i) / L_j(θ)`` on one batch, ``(T, T)`` in ``model.task_names`` order.

    ``lr``: one learning rate for every shared parameter, or one per parameter name (parameters missing from the
    mapping stay put). ``tasks``: the tasks measured (default: the model's active tasks). An entry is NaN when it
    cannot be measured: task ``i`` or ``j`` is not measured or has no label in the batch, or ``L_j(θ)`` is not > 0.
    Costs ``1 + S`` forward passes of the model and ``S`` backward passes through it, ``S`` the number of tasks
    with labels; the weights, buffers and random state are as they were on entry.
    """
    if not isinstance(model, AffinityModel):
        raise TypeError(f"{type(model).__name__} has no task_names/active_tasks/task_losses (use a MultiTaskModule)")
    names = model.task_names
    chosen = set(model.active_tasks if tasks is None else tasks)
    params = shared_parameters(model)
    rates = {n: float(lr) for n in params} if isinstance(lr, (int, float)) else {n: lr[n] for n in params if n in lr}
    moved = [n for n in params if rates.get(n, 0.0) != 0.0]
    if not moved:
        return torch.full((len(names), len(names)), math.nan)
    with replayed_randomness(model, params[moved[0]].device) as replay:
        replay()
        with torch.enable_grad():
            before, present = _mean_losses(model, model(inputs), targets)
        affinity = torch.full((len(names), len(names)), math.nan, device=before.device, dtype=before.dtype)
        measured = present & torch.tensor([n in chosen for n in names], device=present.device)
        # One host sync for which tasks to differentiate; the targets j need L_j(θ) > 0 for the ratio.
        sources = [i for i, ok in enumerate(measured.tolist()) if ok]
        targets_ok = measured & torch.isfinite(before) & (before > 0)
        denominator = torch.where(targets_ok, before.detach(), torch.ones_like(before))
        for k, i in enumerate(sources):
            grads = torch.autograd.grad(
                before[i], [params[n] for n in moved], retain_graph=k < len(sources) - 1, allow_unused=True
            )
            ahead = {n: params[n].detach() - rates[n] * g for n, g in zip(moved, grads, strict=True) if g is not None}
            replay()
            with torch.no_grad():
                after, _ = _mean_losses(model, functional_call(model, ahead, (inputs,)), targets)
            affinity[i] = torch.where(targets_ok, 1 - after / denominator, torch.full_like(after, math.nan))
    return affinity


class TaskAffinity(Callback):
    """Measure TAG's inter-task affinity every ``every_n_steps`` optimizer steps; keep and log its running mean.

    Cost per measured step, on top of the ordinary step: ``1 + T`` forward passes of the model and ``T`` backward
    passes through it (``T``: the tasks labelled in the batch), all on that step's batch; memory for one task's
    gradient and one lookahead copy of the encoder's parameters at a time. Under DDP one all-reduce of ``2 T^2``
    numbers. Steps in between cost nothing (the proxy reads a matrix the balancer already has).

    Logged (to the loggers directly, at most once every ``trainer.log_every_n_steps`` steps, from measured steps):
    the running mean as scalars ``train/affinity/{i}/{j}`` (up to 8 tasks) and as the heatmap image
    ``train/affinity_heatmap`` (red: a step on row i lowers column j's loss; colours scaled to the largest
    off-diagonal value); with a gradient balancer also the proxy, ``train/affinity_cosine/{a}/{b}`` and
    ``train/affinity_cosine_heatmap``. Both matrices are the callback's state, so they are checkpointed and a resumed
    run keeps averaging. Read them as :attr:`affinity` and :attr:`cosine_proxy`.

    Tasks missing from a batch (no label anywhere, or disabled by a schedule) leave their row and column unmeasured on
    that step; each entry is the mean over the steps that measured it (NaN if none did). Under DDP each rank measures
    on its own batch and the step's value is the mean over the ranks that measured it, so every rank keeps the same
    state. Sharded strategies (FSDP, DeepSpeed) are refused: the lookahead needs the full encoder parameters.

    Args:
        every_n_steps: Measure on the steps whose ``global_step`` is a multiple of this (step 0 included).
        lr: The lookahead step size; None (default): each shared parameter's current learning rate in the optimizer
            (as TAG; with Adam-type optimizers this is a small SGD step, and the affinities are small but comparable).
        cell: Size in pixels of one task pair's square in the heatmaps.
    """

    def __init__(self, every_n_steps: int = 10, lr: float | None = None, cell: int = 24):
        if every_n_steps < 1 or cell < 1:
            raise ConfigError(f"TaskAffinity: every_n_steps and cell must be >= 1, got {every_n_steps} and {cell}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"TaskAffinity: lr must be > 0 (or null for the optimizer's), got {lr}")
        self.every_n_steps = every_n_steps
        self.lr = lr
        self.cell = cell
        self.task_names: list[str] = []
        self.measurements = 0  # steps measured
        self._reset([])
        self._loaded = False  # state came from a checkpoint: its task list must match the model's
        self._last_measured: int | None = None
        self._last_written: int | None = None
        self._last_cosine: Tensor | None = None
        self._text_written = False
        self._warned_frozen = False

    def _reset(self, names: list[str]) -> None:
        t = len(names)
        self.task_names = list(names)
        self.measurements = 0
        self._sum = torch.zeros(t, t, dtype=torch.float64)
        self._count = torch.zeros(t, t, dtype=torch.float64)
        self._cos_sum = torch.zeros(t, t, dtype=torch.float64)
        self._cos_count = torch.zeros(t, t, dtype=torch.float64)

    # --------------------------------------------------------------------------------------------- results
    @property
    def affinity(self) -> Tensor:
        """``(T, T)`` running mean of ``Z[i -> j]`` (row i: the task stepped on), NaN where never measured."""
        return torch.where(self._count > 0, self._sum / self._count.clamp_min(1), math.nan)

    @property
    def cosine_proxy(self) -> Tensor | None:
        """``(T, T)`` running mean of the balancer's gradient cosines; None without a gradient balancer's telemetry."""
        if not bool((self._cos_count > 0).any()):
            return None
        return torch.where(self._cos_count > 0, self._cos_sum / self._cos_count.clamp_min(1), math.nan)

    # ------------------------------------------------------------------------------------------- lightning
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, AffinityModel):
            raise ConfigError(
                f"TaskAffinity needs a MultiTaskModule (task_names, active_tasks, task_losses); got "
                f"{type(pl_module).__name__}"
            )
        if is_sharded(trainer, pl_module.device_mesh) or isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ConfigError(
                "TaskAffinity needs the full encoder parameters for its lookahead step; it does not run under FSDP, "
                "FSDP2 or DeepSpeed. Measure affinity with DDP or one device (the affinity of a smaller run carries)"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        names = list(pl_module.task_names) if isinstance(pl_module, AffinityModel) else []
        if names == self.task_names:
            return
        if self._loaded:
            raise ConfigError(
                f"TaskAffinity: the checkpoint's affinity covers tasks {self.task_names} but the model has {names}; "
                "resume with the same tasks, or start a new run"
            )
        self._reset(names)  # the first fit, or a fit after tasks were added or removed

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # Once per optimizer step: with gradient accumulation the first micro-batch of the step is measured.
        if step % self.every_n_steps or step == self._last_measured:
            return
        self._last_measured = step
        assert isinstance(pl_module, AffinityModel)  # setup() refused anything else
        params = shared_parameters(pl_module)
        lr: float | dict[str, float] = (
            self.lr if self.lr is not None else optimizer_learning_rates(trainer.optimizers, params)
        )
        if not params and not self._warned_frozen:
            warnings.warn("TaskAffinity: the encoder has no trainable parameters; nothing to measure", stacklevel=2)
            self._warned_frozen = True
        inputs, targets = unpack_batch(batch, "train", pl_module.tasks, check_values=False)
        z = lookahead_affinity(pl_module, inputs, targets, lr)
        valid = torch.isfinite(z)
        both = torch.stack([torch.where(valid, z, torch.zeros_like(z)), valid.to(z.dtype)])
        # Every rank reaches this on the same steps (the step number decides), so the all-reduce cannot deadlock.
        total, ranks = trainer.strategy.reduce(both, reduce_op="sum").double().cpu()
        measured = ranks > 0
        self._sum += torch.where(measured, total / ranks.clamp_min(1), 0.0)
        self._count += measured.double()
        self.measurements += 1
        interval = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if self._last_written is None or step - self._last_written >= interval:
            self._write(trainer, step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The LightningModule's `balancer` attribute (MultiTaskModule's; other modules may have none).
        balancer = getattr(pl_module, "balancer", None)
        if not isinstance(balancer, HasGradientTelemetry):
            return
        cosine = balancer.last_cosine
        if cosine is None or cosine is self._last_cosine or list(balancer.task_names) != self.task_names:
            return
        self._last_cosine = cosine
        c = cosine.detach().double().cpu()
        # A task without a gradient on that step (no label) has a zero row and a zero diagonal: not measured.
        has_grad = c.diagonal() > 0
        valid = has_grad[:, None] & has_grad[None, :]
        self._cos_sum += torch.where(valid, c, 0.0)
        self._cos_count += valid.double()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_measured is not None and self._last_measured != self._last_written:
            self._write(trainer, self._last_measured)

    # ---------------------------------------------------------------------------------------------- output
    def _write(self, trainer: Trainer, step: int) -> None:
        self._last_written = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        names, mean, proxy = self.task_names, self.affinity, self.cosine_proxy
        scalars: dict[str, float] = {}
        if len(names) * (len(names) - 1) <= MAX_DIRECTED_PAIRS_LOGGED:
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    if math.isfinite(value := float(mean[i, j])):
                        scalars[f"{PREFIX}/{a}/{b}"] = value
                    if proxy is not None and i < j and math.isfinite(value := float(proxy[i, j])):
                        scalars[f"{PROXY_PREFIX}/{a}/{b}"] = value
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step)
        order = task_order(names)
        caption = f"{order}; colours scaled to the largest off-diagonal |affinity|" if order else None
        first = not self._text_written
        wrote = write_heatmap(trainer.loggers, HEATMAP_TAG, affinity_heatmap(mean, self.cell), step, caption, first)
        if proxy is not None:
            write_heatmap(trainer.loggers, PROXY_HEATMAP_TAG, cosine_heatmap(proxy, self.cell), step, order, first)
        self._text_written = self._text_written or wrote

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_names": list(self.task_names),
            "measurements": self.measurements,
            "sum": self._sum.clone(),
            "count": self._count.clone(),
            "cosine_sum": self._cos_sum.clone(),
            "cosine_count": self._cos_count.clone(),
            "last_measured": self._last_measured,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task_names = list(state_dict["task_names"])
        self.measurements = int(state_dict["measurements"])
        self._sum = state_dict["sum"].double().cpu()
        self._count = state_dict["count"].double().cpu()
        self._cos_sum = state_dict["cosine_sum"].double().cpu()
        self._cos_count = state_dict["cosine_count"].double().cpu()
        self._last_measured = state_dict.get("last_measured")
        self._loaded = True


def affinity_heatmap(affinity: Tensor, cell: int = 24) -> Tensor:
    """The heatmap image of an affinity matrix, colours scaled to its largest off-diagonal ``|Z|`` (the diagonal, a
    task onto itself, is usually far larger and is clamped)."""
    t = affinity.shape[0]
    off = affinity[~torch.eye(t, dtype=torch.bool, device=affinity.device)].abs()
    off = off[torch.isfinite(off)]
    limit = float(off.max()) if off.numel() and float(off.max()) > 0 else 1.0
    return signed_heatmap(affinity, limit, cell)
