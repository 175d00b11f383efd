"""What ``mtl affinity`` prints and writes: the affinity matrix as a table, the proposals, and one JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_lightning.affinity.grouping import Proposal

RESULT_FILE = "affinity.json"


def decimals(values: Sequence[float], significant: int = 3) -> int:
    """Decimals that show the largest finite ``|value|`` with ``significant`` digits (at least 2): affinities from a
    small lookahead step are often ~1e-3, cosines ~1."""
    largest = max((abs(v) for v in values if math.isfinite(v) and v != 0), default=1.0)
    return max(2, significant - 1 - math.floor(math.log10(largest)))


def matrix_table(matrix: Sequence[Sequence[float]], names: Sequence[str], digits: int | None = None) -> str:
    """A square matrix as aligned text, rows and columns labelled by task (NaN printed as ``-``)."""
    if digits is None:
        digits = decimals([v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j])
    cells = [[_number(v, digits) for v in row] for row in matrix]
    width = max([len(n) for n in names] + [len(c) for row in cells for c in row])
    head = " " * (width + 2) + "  ".join(f"{n:>{width}}" for n in names)
    body = [f"{n:<{width}}  " + "  ".join(f"{c:>{width}}" for c in row) for n, row in zip(names, cells, strict=True)]
    return "\n".join([head, *body])


def proposals_table(proposals: Sequence[Proposal], names: Sequence[str], digits: int | None = None) -> str:
    """One line per proposal: rank, expected total affinity and the groups."""
    if digits is None:
        digits = decimals([p.score for p in proposals])
    scores = [_number(p.score, digits) for p in proposals]
    width = max([len("total")] + [len(s) for s in scores])
    lines = [f"rank  {'total':>{width}}  groups"]
    for rank, (proposal, score) in enumerate(zip(proposals, scores, strict=True), start=1):
        groups = "  ".join("{" + ", ".join(group) + "}" for group in proposal.named(names))
        lines.append(f"{rank:>4}  {score:>{width}}  {groups}")
    return "\n".join(lines)


def _number(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return "-"
    text = f"{value:+.{digits}f}"
    return text if text.strip("+-0.") else f"{0:.{digits}f}"  # no "-0.000": a sign on a printed zero means nothing


def _plain(matrix: Sequence[Sequence[float]] | None) -> list[list[float | None]] | None:
    """JSON has no NaN: unmeasured entries become null."""
    if matrix is None:
        return None
    return [[float(v) if math.isfinite(v) else None for v in row] for row in matrix]


def write_result(
    out: Path,
    names: Sequence[str],
    affinity: Sequence[Sequence[float]],
    proposals: Sequence[Proposal],
    num_groups: int,
    cosine_proxy: Sequence[Sequence[float]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out/affinity.json``: the task order, the matrices (row i -> column j), the proposals; its path."""
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "tasks": list(names),
        "affinity": _plain(affinity),
        "cosine_proxy": _plain(cosine_proxy),
        "num_groups": num_groups,
        "proposals": [
            {
                "groups": p.named(names),
                "total_affinity": p.score,
                "per_task": dict(zip(names, p.per_task, strict=True)),
            }
            for p in proposals
        ],
        **(extra or {}),
    }
    path = out / RESULT_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path
