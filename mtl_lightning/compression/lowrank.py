"""Low-rank factorisation of Linear layers by truncated SVD.

``W = U S Vᵀ`` (out x in) is cut to its ``r`` largest singular values and ``Linear(in, out)`` becomes
``Sequential(Linear(in, r, bias=False), Linear(r, out))`` with weights ``sqrt(S_r) V_rᵀ`` and ``U_r sqrt(S_r)`` (the
square root splits the scale evenly between the two factors). It pays only when ``r (in + out) < in * out``; layers
where it would not are kept and reported. The rank is given (``rank``) or chosen per layer as the smallest one whose
singular values hold ``energy`` of the squared Frobenius norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.compression.selection import replace_module, select_layers
from mtl_lightning.errors import ConfigError

DEFAULT_SVD_PATTERNS = ("encoder.*",)


@dataclass(frozen=True)
class FactorRow:
    """What happened to one layer: its shape, the rank chosen, the energy kept and the parameters before/after."""

    layer: str
    in_features: int
    out_features: int
    rank: int
    energy: float
    params_before: int
    params_after: int
    factorised: bool


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)`` (values sorted in decreasing order)."""
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1] (the fraction of the squared Frobenius norm kept), got {energy}")
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total <= 0:  # an all-zero weight: rank 1 already holds everything
        return 1
    # A relative tolerance keeps a threshold that lands exactly on a cumulative sum from rounding up by one.
    reached = squares.cumsum(0) >= energy * total * (1 - 1e-12)
    return int(torch.nonzero(reached)[0].item()) + 1


def _factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(first weight r x in, second weight out x r), computed in float64."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(weight.dtype), (u[:, :rank] * root).to(weight.dtype)


def factorised_linear(in_features: int, out_features: int, rank: int, bias: bool, **factory: Any) -> nn.Sequential:
    """The empty structure that replaces ``Linear(in, out)``: ``Sequential(Linear(in, r, bias=False), Linear(r, out))``."""
    return nn.Sequential(
        nn.Linear(in_features, rank, bias=False, **factory), nn.Linear(rank, out_features, bias=bias, **factory)
    )


def factorize_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """``linear`` as a product of two Linear layers of inner width ``rank`` (exact when ``rank = min(in, out)``)."""
    first_w, second_w = _factors(linear.weight, rank)
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    seq = factorised_linear(linear.in_features, linear.out_features, rank, linear.bias is not None, **factory)
    # Sequential's items are typed Module: factorised_linear builds two Linear layers.
    first, second = cast(nn.Linear, seq[0]), cast(nn.Linear, seq[1])
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if linear.bias is not None:
            second.bias.copy_(linear.bias)
    return seq


def _check_rank(name: str, linear: nn.Linear, rank: int) -> None:
    limit = min(linear.in_features, linear.out_features)
    if rank < 1 or rank > limit:
        raise ConfigError(
            f"--rank {rank} does not fit layer {name!r} (Linear {linear.in_features} -> {linear.out_features}, "
            f"weight {linear.out_features}x{linear.in_features}): the rank must be between 1 and min(in, out) = "
            f"{limit}; choose a smaller rank or leave this layer out with --layers"
        )


def apply_svd(
    model: nn.Module,
    patterns: Sequence[str] = DEFAULT_SVD_PATTERNS,
    rank: int | None = None,
    energy: float | None = None,
) -> list[FactorRow]:
    """Factorise the Linear layers of ``model`` matching ``patterns`` in place; one row per matching layer.

    Exactly one of ``rank`` and ``energy`` is given. A layer is replaced only when the factors hold fewer parameters
    than its weight; otherwise it is kept (``factorised=False`` in its row).
    """
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank R and --energy E")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"--energy must be in (0, 1] (the fraction of the squared Frobenius norm kept), got {energy}")
    layers = select_layers(model, patterns, (nn.Linear,), "svd --layers")
    if rank is not None:
        for name, linear in layers.items():
            _check_rank(name, linear, rank)  # check all before changing any
    rows = []
    for name, linear in layers.items():
        s = torch.linalg.svdvals(linear.weight.detach().double())
        if rank is not None:
            r = rank
        else:
            assert energy is not None  # exactly one of rank and energy is given (checked above)
            r = rank_for_energy(s, float(energy))
        kept = float((s[:r] ** 2).sum() / (s**2).sum().clamp_min(1e-300))
        n_in, n_out = linear.in_features, linear.out_features
        bias = n_out if linear.bias is not None else 0
        before, after = n_in * n_out + bias, r * (n_in + n_out) + bias
        saves = after < before
        if saves:
            replace_module(model, name, factorize_linear(linear, r))
        rows.append(FactorRow(name, n_in, n_out, r, kept, before, after if saves else before, saves))
    return rows


def svd_record(rows: Sequence[FactorRow]) -> dict[str, Any]:
    """The record a checkpoint keeps to rebuild the factorised structure before loading its weights."""
    return {
        "method": "svd",
        "layers": {
            r.layer: {"rank": r.rank, "in_features": r.in_features, "out_features": r.out_features}
            for r in rows
            if r.factorised
        },
    }


def restore_svd(model: nn.Module, record: dict[str, Any]) -> None:
    """Replace each recorded Linear by an empty factorised structure (weights come from the state dict next)."""
    for name, spec in record["layers"].items():
        current = model.get_submodule(name)
        rank, n_in, n_out = int(spec["rank"]), int(spec["in_features"]), int(spec["out_features"])
        if isinstance(current, nn.Sequential) and len(current) == 2 and current[0].out_features == rank:
            continue  # already factorised (the structure was restored before)
        if not isinstance(current, nn.Linear) or (current.in_features, current.out_features) != (n_in, n_out):
            raise ConfigError(
                f"the checkpoint factorised layer {name!r} as Linear {n_in} -> {n_out}, but this model has "
                f"{current!r} there; load it with the model config it was made from"
            )
        factory = {"device": current.weight.device, "dtype": current.weight.dtype}
        replace_module(model, name, factorised_linear(n_in, n_out, rank, current.bias is not None, **factory))
