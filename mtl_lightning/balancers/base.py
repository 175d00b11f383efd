"""The balancer slot: turns per-task losses (and, for gradient methods, the representations) into one scalar.

The single scalar is the contract with Lightning: automatic optimisation, gradient clipping, accumulation, AMP
scaling, DDP and FSDP keep working because the balancer never calls backward or steps an optimiser itself.
A new method is one subclass in one file plus one YAML under ``configs/balancer/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec


@dataclass
class BalanceInput:
    """What a balancer sees for one training step.

    Attributes:
        losses: Per-task mean losses, shape ``(T,)`` in task order; absent tasks hold a zero still connected to
            their head.
        present: ``(T,)`` bool, whether the task had at least one labelled row in this batch.
        representations: Encoder output per task (the same tensor for every task under hard sharing).
        step: The trainer's global step.
        log: Whether this step's logs will be written; telemetry can skip its work when False.
        shared: Under hard sharing, the encoder's output; ``representations`` then holds one alias (view) of it
            per task, so per-task gradients w.r.t. the representation come from one backward through the heads.
        task_parameters: The parameters between the representations and the losses (the heads', the loss
            modules'; frozen ones are skipped). A gradient method takes their gradients in the same backward as the
            per-task gradients and hands them over, so Lightning's backward does not walk the heads a second time.
            Empty (the default, and under FSDP, whose forward runs on gathered copies of the parameters): the final
            backward walks them.
        present_on_host: ``present`` as the module read it to the host, in the one synchronisation of its finiteness
            check (None when it does not check). A balancer that must know on the host which tasks are present
            (to take their sub-Gramian) reads it here instead of synchronising with the accelerator again.
    """

    losses: Tensor
    present: Tensor
    representations: dict[str, Tensor] = field(default_factory=dict)
    step: int = 0
    log: bool = True
    shared: Tensor | None = None
    task_parameters: Sequence[Tensor] = ()
    present_on_host: Sequence[bool] | None = None


@dataclass
class BalanceOutput:
    """The scalar to backpropagate, the effective per-task weights ``(T,)`` and optional telemetry tensors."""

    loss: Tensor
    weights: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


class Balancer(nn.Module, ABC):
    """Base class of all balancers; ``bind`` is called once by the module with its task specs."""

    #: Whether the method works when the model's parameters are sharded (FSDP/FSDP2); a method that needs
    #: gradients w.r.t. the full parameters sets it False and says what to use instead in ``sharding_hint``.
    supports_sharding: bool = True
    sharding_hint: str = ""
    #: Whether the method reads ``BalanceInput.task_parameters``; the module gathers them only for those that do.
    uses_task_parameters: bool = False

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        """Learn the task order, and anything else the method needs from the specs or the encoder.

        Called once by the module. ``encoder`` is the shared encoder (for methods that need its parameters); it is
        not stored as a submodule here, so it is not saved twice in checkpoints.
        """
        self.task_names = [t.name for t in tasks]

    def check(self, context: BalancerContext) -> None:
        """Refuse, with a ConfigError that says what to use instead, a run this method cannot do.

        Called by the module when the model is configured for a run (after any sharding is known). The default
        refuses sharded models for methods that set ``supports_sharding = False``.
        """
        if context.sharded and not self.supports_sharding:
            raise ConfigError(f"{type(self).__name__} cannot run on a sharded model: {self.sharding_hint}")

    def fixed_weights(self, tasks: Sequence[TaskSpec]) -> Tensor:
        """The weights of the evaluation loss (``val/loss``, ``test/loss``): the fixed weights this method trains
        with, so that a checkpoint monitor scores the weighting the model was trained on.

        The default, for methods whose weights change while training, is the specs' ``weight`` (1 = equal).
        """
        return torch.tensor([float(t.weight) for t in tasks])

    def on_train_batch_end(self, losses: Tensor) -> None:
        """Called after the optimizer step with the step's per-task losses (for methods that learn from them)."""

    def on_train_epoch_end(self) -> None:
        """Called at the end of every training epoch (for methods with per-epoch state)."""

    @abstractmethod
    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        """Combine the per-task losses of one step into one scalar."""


@dataclass(frozen=True)
class BalancerContext:
    """What a balancer may need to know about the run to accept or refuse it (see :meth:`Balancer.check`)."""

    sharded: bool = False
    """The model's parameters are sharded (FSDP/FSDP2): the forward reads gathered copies."""


def weighted_mean(losses: Tensor, weights: Tensor, present: Tensor) -> BalanceOutput:
    """``Σ w_t L_t / Σ w_t`` over present tasks; weights renormalise over present tasks, never divide by zero."""
    w = weights.to(losses.dtype) * present.to(losses.dtype)
    norm = w / w.sum().clamp_min(torch.finfo(losses.dtype).tiny)
    return BalanceOutput(loss=(norm * losses).sum(), weights=norm.detach())


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_mean(values: Tensor) -> Tensor:
    """The mean over DDP ranks (the input itself in a single process), for balancers with state from losses.

    A rank's per-task loss is its sum divided by the *global* labelled count over the world size, so the ranks' mean
    of it is the global batch's mean loss, the same on every rank: a balancer that learns from it takes the same
    decisions on every rank.
    """
    if not distributed():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()
