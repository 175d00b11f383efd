"""What a (compressed) model holds: parameters, int8 weights and the sparsity of each layer."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import cast

import torch.nn as nn
from torch import Tensor
from torch.ao.nn.quantized import dynamic as nnqd

# The layers whose weight sparsity is reported: those that pruning and quantisation act on.
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nnqd.Linear)


@dataclass(frozen=True)
class SparsityRow:
    """One layer's weight: its shape, how many entries are zero and how many output rows are entirely zero."""

    module: str
    layer: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    zero_rows: int
    rows: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with: the mask applied while pruning is active, dequantised int8 values."""
    if isinstance(module, nnqd.Linear):
        return module.weight().dequantize()
    # nn.Module types its attributes as Tensor | Module; a layer's weight (and prune's weight_orig) is a Parameter.
    mask = getattr(module, "weight_mask", None)
    if mask is not None:  # torch.nn.utils.prune re-parametrisation: weight = weight_orig * weight_mask
        return cast(Tensor, module.weight_orig).detach() * mask
    return cast(Tensor, module.weight).detach()


def sparsity_report(model: nn.Module, names: Collection[str] | None = None) -> list[SparsityRow]:
    """One row per Linear/Conv layer (float or dynamic int8), or per layer in ``names``, and a last row ``total``."""
    rows = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, WEIGHT_LAYERS) or (names is not None and name not in names):
            continue
        weight = effective_weight(module)
        zero = weight == 0
        zero_rows = int(zero.reshape(weight.shape[0], -1).all(dim=1).sum()) if weight.dim() > 1 else 0
        rows.append(
            SparsityRow(
                module=name,
                layer=type(module).__name__ + (" int8" if isinstance(module, nnqd.Linear) else ""),
                shape=tuple(weight.shape),
                params=weight.numel(),
                zeros=int(zero.sum()),
                zero_rows=zero_rows,
                rows=int(weight.shape[0]),
            )
        )
    total = SparsityRow(
        module="total",
        layer="",
        shape=(),
        params=sum(r.params for r in rows),
        zeros=sum(r.zeros for r in rows),
        zero_rows=sum(r.zero_rows for r in rows),
        rows=sum(r.rows for r in rows),
    )
    return [*rows, total]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(float parameters, int8 weight entries). Dynamic int8 layers keep their weights packed, not as parameters."""
    floats = sum(p.numel() for p in model.parameters())
    int8 = 0
    for module in model.modules():
        if isinstance(module, nnqd.Linear):
            weight, bias = module.weight(), module.bias()
            int8 += weight.numel()
            floats += bias.numel() if bias is not None else 0
    return floats, int8


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    numeric = [all(isinstance(r[i], (int, float)) for r in rows) if rows else False for i in range(len(headers))]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def sparsity_table(rows: Sequence[SparsityRow]) -> str:
    """:func:`sparsity_report` rows as a Markdown table."""
    body = [
        (
            r.module,
            r.layer,
            "x".join(map(str, r.shape)) or "-",
            r.params,
            r.zeros,
            f"{100 * r.sparsity:.1f}%",
            f"{r.zero_rows}/{r.rows}",
        )
        for r in rows
    ]
    return markdown_table(["module", "layer", "weight shape", "weights", "zeros", "sparsity", "zero rows"], body)
