"""Balancers combine per-task losses into the one scalar Lightning optimises."""

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer, weighted_mean
from mtl_lightning.balancers.static import EqualWeighting, StaticWeighting

__all__ = ["BalanceInput", "BalanceOutput", "Balancer", "EqualWeighting", "StaticWeighting", "weighted_mean"]
