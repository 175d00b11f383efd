"""The batch contract: ``{"inputs": Tensor | {name: Tensor}, "targets": {task: Tensor}}``, checked on arrival."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mtl_lightning.targets import check_targets
from mtl_lightning.tasks import TaskSpec


def unpack_batch(
    batch: Any, stage: str, specs: Mapping[str, TaskSpec], check_values: bool
) -> tuple[Any, dict[str, Tensor]]:
    """(inputs, targets) of a batch, with one clear error when it breaks the contract.

    Shapes and task names are checked on every batch that names an unknown task; ``check_values`` adds the full
    label-value check (one host sync), which the module asks for on the first batch of each stage.
    """
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        raise TypeError(
            f"{stage} batch must be a dict {{'inputs': ..., 'targets': {{task: tensor}}}}, got "
            f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}"
        )
    targets = dict(batch.get("targets") or {})
    if check_values:
        inputs = batch["inputs"]
        first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
        check_targets(specs, targets, first.shape[0], f"the first {stage} batch", values=True)
    elif set(targets) - set(specs):
        check_targets(specs, targets, 0, f"a {stage} batch", values=False)
    return batch["inputs"], targets
