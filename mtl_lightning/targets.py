"""Target shapes, missing-label masks and target validation.

One rule for missing labels: NaN in float targets, ``-100`` (torch's ignore_index) in integer targets. Loss and
metrics see only labelled entries. The functions here do no host synchronisation unless ``check_values`` is set,
so they are cheap on accelerators.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec


class TargetError(ConfigError):
    """A target tensor does not match its task's spec."""


def expected_shape(spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
    """Canonical target shape: ``(N,)`` for one output, ``(N, K)`` for multilabel and multi-output regression."""
    if spec.kind in ("binary", "multiclass") or (spec.kind == "regression" and spec.num_outputs == 1):
        return (batch_size,)
    return (batch_size, int(spec.num_outputs or 1))


def canonical_target(spec: TaskSpec, target: Tensor) -> Tensor:
    """Reshape a target to its canonical shape, accepting ``(N, 1)`` for single-output tasks."""
    want = expected_shape(spec, target.shape[0] if target.ndim else 0)
    if target.ndim == 2 and target.shape[1] == 1 and len(want) == 1:
        target = target.reshape(-1)
    if tuple(target.shape) != want:
        raise TargetError(
            f"task {spec.name!r} ({spec.kind}, num_outputs={spec.num_outputs}): target has shape "
            f"{tuple(target.shape)}, expected {want} (batch size first)"
        )
    if spec.integer_targets and target.is_floating_point():
        raise TargetError(
            f"task {spec.name!r} (multiclass): targets must be integer class indices (int64, missing = "
            f"{IGNORE_INDEX}), got {target.dtype}; convert with .long()"
        )
    if not spec.integer_targets and target.dtype == torch.bool:
        target = target.float()
    return target


def label_mask(spec: TaskSpec, target: Tensor) -> Tensor:
    """Boolean mask of labelled entries, same shape as the canonical target."""
    if target.is_floating_point():
        return ~torch.isnan(target)
    return target != IGNORE_INDEX


def check_values(spec: TaskSpec, target: Tensor, where: str) -> None:
    """Check label values (class range, 0/1 for binary/multilabel); this syncs with the host."""
    mask = label_mask(spec, target)
    values = target[mask]
    if values.numel() == 0:
        return
    if spec.kind == "multiclass":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= int(spec.num_outputs or 0):
            raise TargetError(
                f"task {spec.name!r} in {where}: class labels must be in [0, {spec.num_outputs}) or "
                f"{IGNORE_INDEX} for missing, found values in [{low}, {high}]; fix the labels or num_outputs"
            )
    elif spec.kind in ("binary", "multilabel"):
        bad = values[(values != 0) & (values != 1)]
        if bad.numel():
            raise TargetError(
                f"task {spec.name!r} in {where}: {spec.kind} labels must be 0 or 1 (NaN or {IGNORE_INDEX} for "
                f"missing), found {bad[:5].tolist()}"
            )
    elif not torch.isfinite(values).all():
        raise TargetError(f"task {spec.name!r} in {where}: regression targets contain inf; use NaN for missing")


def check_targets(
    specs: Mapping[str, TaskSpec], targets: Mapping[str, Tensor], batch_size: int, where: str, values: bool
) -> None:
    """Validate a dict of targets: known task names, shapes, dtypes and (optionally) label values."""
    unknown = sorted(set(targets) - set(specs))
    if unknown:
        raise TargetError(
            f"{where} has targets for tasks the model does not declare: {unknown}; declared tasks are "
            f"{sorted(specs)}. Declare them in the data section's tasks or drop them from the data"
        )
    for name, target in targets.items():
        if not isinstance(target, Tensor):
            raise TargetError(f"task {name!r} in {where}: target must be a tensor, got {type(target).__name__}")
        if target.shape[:1] != (batch_size,):
            raise TargetError(
                f"task {name!r} in {where}: target has {target.shape[0] if target.ndim else 0} rows but the "
                f"inputs have {batch_size}"
            )
        target = canonical_target(specs[name], target)
        if values:
            check_values(specs[name], target, where)
