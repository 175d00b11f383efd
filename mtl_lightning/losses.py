"""Per-task losses with missing-label masking.

Every loss is built with ``reduction="none"`` and reduced here over labelled entries only. Missing entries are
filled with a harmless value and zeroed by the mask rather than removed by boolean indexing: no host sync, and a
task with no labelled row still produces a (zero) loss connected to its head, so DDP never sees an unused
parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning._imports import import_from_path
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

LOSSES: dict[str, type[nn.Module]] = {
    "bce": nn.BCEWithLogitsLoss,
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "huber": nn.HuberLoss,
    "smooth_l1": nn.SmoothL1Loss,
    "poisson": nn.PoissonNLLLoss,  # on a log-rate (log_input=True): the count kind's loss
}


def build_loss(spec: TaskSpec) -> nn.Module:
    """Instantiate the task's loss with ``reduction='none'``; list arguments become tensors (``pos_weight``)."""
    name = spec.loss_name
    cls = LOSSES.get(name) or import_from_path(name, f"task {spec.name!r}: loss")
    kwargs: dict[str, Any] = {
        k: torch.tensor(v, dtype=torch.float32) if isinstance(v, (list, tuple)) else v
        for k, v in spec.loss_args.items()
    }
    try:
        return cls(reduction="none", **kwargs)
    except TypeError as err:
        raise ConfigError(
            f"task {spec.name!r}: loss {name!r} could not be built with reduction='none' and {spec.loss_args} "
            f"({err}); losses must accept reduction='none' so missing labels can be masked"
        ) from err


def masked_loss(loss_fn: nn.Module, spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Return (sum of the loss over labelled entries, number of labelled entries) for one task.

    ``output`` is the head's output in canonical shape, ``target`` the canonical target. The mean loss is
    ``sum / max(count, 1)``; keeping both lets epoch-level means weight every labelled row equally.
    """
    mask = spec.task_kind.label_mask(spec, target)
    # Python zeros, not zero tensors: where() keeps the tensor's dtype for a scalar, and a step saves the
    # allocations (three per task, a few microseconds each on a CPU: the step's cost grows with the tasks).
    filled = torch.where(mask, target, 0)
    if not spec.task_kind.integer_targets and filled.dtype != output.dtype:
        filled = filled.to(output.dtype)
    # Unlabelled outputs are zeroed too: an inf/NaN there (e.g. an fp16 overflow) would otherwise give a NaN
    # gradient (the loss's local derivative times the masked zero). where() keeps the head in the graph.
    if output.shape[: mask.ndim] == mask.shape:
        out_mask = mask.reshape(mask.shape + (1,) * (output.ndim - mask.ndim)) if output.ndim > mask.ndim else mask
        output = torch.where(out_mask, output, 0)
    per_entry = loss_fn(output, filled)
    if per_entry.shape != mask.shape:
        raise ConfigError(
            f"task {spec.name!r}: loss {spec.loss_name!r} returned shape {tuple(per_entry.shape)} for targets of "
            f"shape {tuple(mask.shape)}; with reduction='none' it must return one value per target entry"
        )
    # where() rather than a product: 0 * inf would be NaN for a filled-in entry.
    total = torch.where(mask, per_entry, 0).sum()
    return total, mask.sum()


def task_losses(
    losses: Mapping[str, nn.Module] | nn.ModuleDict,
    specs: Mapping[str, TaskSpec],
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    canonical: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-task (sum over labelled entries, labelled count), each ``(T,)`` in task order.

    A task absent from ``targets`` gives a zero that still touches its head, so DDP sees every parameter used.
    ``canonical``: the targets are already in their kinds' canonical shapes (:func:`canonical_targets`).
    """
    sums, counts = [], []
    for name, spec in specs.items():
        out = outputs[name]
        if name in targets:
            target = targets[name] if canonical else spec.task_kind.canonical_target(spec, targets[name])
            s, c = masked_loss(losses[name], spec, out, target)
        else:
            s, c = out.sum() * 0.0, torch.zeros((), dtype=torch.long, device=out.device)
        sums.append(s)
        counts.append(c)
    return torch.stack(sums).float(), torch.stack(counts)


def canonical_targets(specs: Mapping[str, TaskSpec], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each present task's target in its kind's canonical shape and dtype: done once per step, for the losses
    and the metrics alike."""
    return {name: specs[name].task_kind.canonical_target(specs[name], t) for name, t in targets.items()}


def raise_nonfinite(names: list[str], means: Tensor, step: int) -> None:
    """Stop training with an error that names the tasks whose loss is NaN or inf."""
    finite = torch.isfinite(means)
    bad = [name for name, ok in zip(names, finite.tolist(), strict=True) if not ok]
    raise FloatingPointError(
        f"the loss of task(s) {bad} became {means[~finite].tolist()} at step {step}; training stopped before the "
        "weights were updated. Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val), or "
        "check those tasks' targets for inf/huge values"
    )
