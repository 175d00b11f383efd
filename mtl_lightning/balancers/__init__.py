"""Balancers combine per-task losses into the one scalar Lightning optimises.

Loss weighting (static, equal, ...) maps the losses to a scalar; gradient methods (MGDA, PCGrad, UPGrad, ...)
weigh the per-task gradients, in representation or parameter mode (see :mod:`mtl_lightning.balancers.gradient`).
"""

from mtl_lightning.balancers.base import (
    BalanceInput,
    BalanceOutput,
    Balancer,
    BalancerContext,
    distributed,
    weighted_mean,
    world_mean,
)
from mtl_lightning.balancers.gradient import GradientBalancer
from mtl_lightning.balancers.gradient_methods import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    DualProj,
    GradDrop,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from mtl_lightning.balancers.static import EqualWeighting, StaticWeighting
from mtl_lightning.balancers.weighting import (
    DWA,
    FAMO,
    IMTLL,
    GeometricMean,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

__all__ = [
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "AlignedMTL",
    "BalanceInput",
    "BalanceOutput",
    "Balancer",
    "BalancerContext",
    "CAGrad",
    "DualProj",
    "EqualWeighting",
    "GeometricMean",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "StaticWeighting",
    "UPGrad",
    "UncertaintyWeighting",
    "distributed",
    "weighted_mean",
    "world_mean",
]
