"""Gradient-conflict telemetry read off the T x T Gramian of per-task gradients (no extra backward passes)."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_PAIRS_LOGGED = 28  # pairwise cosines are logged as scalars up to 8 tasks; beyond that only in the heatmap


def cosine_matrix(gramian: Tensor) -> Tensor:
    """Pairwise cosine similarities ``G_st / (|g_s| |g_t|)``; rows of zero gradients give 0."""
    norms = gramian.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gramian / denom.clamp_min(torch.finfo(gramian.dtype).tiny), torch.zeros_like(gramian))


def gramian_telemetry(gramian: Tensor, names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Per-task gradient norms, pairwise cosines and the fraction of conflicting pairs (cosine < 0).

    Returns the logs (names relative to ``train/balance/``) and the cosine matrix (for the heatmap).
    """
    norms = gramian.diagonal().clamp_min(0).sqrt()
    cosine = cosine_matrix(gramian)
    logs = {f"grad_norm/{name}": norms[i] for i, name in enumerate(names)}
    rows, cols = torch.triu_indices(len(names), len(names), offset=1)
    active = (norms[rows] > 0) & (norms[cols] > 0)
    pair_cos = cosine[rows, cols]
    conflicts = ((pair_cos < 0) & active).sum()
    logs["conflict_fraction"] = conflicts / active.sum().clamp_min(1)
    if len(rows) <= MAX_PAIRS_LOGGED:
        for r, c, value in zip(rows.tolist(), cols.tolist(), pair_cos, strict=True):
            logs[f"cosine/{names[r]}/{names[c]}"] = value
    return logs, cosine
