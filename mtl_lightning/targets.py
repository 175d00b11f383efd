"""Target shapes, missing-label masks and target validation, each answered by the task's kind.

One rule for missing labels: NaN in float targets, ``-100`` (torch's ignore_index) in integer targets (a kind may
define its own, e.g. an invalid-pixel mask). Loss and metrics see only labelled entries. The functions here do no
host synchronisation unless ``check_values`` is called, so they are cheap on accelerators.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtl_lightning.kinds.base import TargetError
from mtl_lightning.tasks import TaskSpec

__all__ = ["TargetError", "canonical_target", "check_targets", "check_values", "expected_shape", "label_mask"]


def expected_shape(spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
    """Canonical target shape, e.g. ``(N,)`` for one output, ``(N, K)`` for multilabel and multi-output regression."""
    return spec.task_kind.target_shape(spec, batch_size)


def canonical_target(spec: TaskSpec, target: Tensor) -> Tensor:
    """Reshape a target to its canonical shape, accepting ``(N, 1)`` for single-output tasks; check its dtype."""
    return spec.task_kind.canonical_target(spec, target)


def label_mask(spec: TaskSpec, target: Tensor) -> Tensor:
    """Boolean mask of labelled entries, same shape as the canonical target."""
    return spec.task_kind.label_mask(spec, target)


def check_values(spec: TaskSpec, target: Tensor, where: str) -> None:
    """Check label values (class range, 0/1 for binary/multilabel, ...); this syncs with the host."""
    values = target[label_mask(spec, target)]
    if values.numel():
        spec.task_kind.check_values(spec, values, where)


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
