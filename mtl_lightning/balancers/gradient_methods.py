"""The gradient methods, each a thin choice of TorchJD aggregator on top of :class:`GradientBalancer`.

Pick one in YAML with ``--model.balancer configs/balancer/<name>.yaml``; all take ``ddp_exact`` and ``telemetry``,
and the Gramian weightings ``mode`` and ``gramian`` as well (see :class:`GradientBalancer`). Methods whose TorchJD implementation needs a solver raise an error
naming the ``pip install`` that adds it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor

from mtl_lightning.balancers.gradient import GradientBalancer, GramianMethod, Mode, _torchjd_aggregation
from mtl_lightning.compat import gradvac_state, set_gradvac_state
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

if TYPE_CHECKING:  # TorchJD is imported where it is used (see gradient.py)
    from torchjd.aggregation import Aggregator

    from mtl_lightning.balancers.fast_gradvac import FastGradVacWeighting

SOLVERS_EXTRA = 'pip install "mtl_lightning[solvers]"'


def _build(name: str, factory: Callable[..., Aggregator], *args: Any, **kwargs: Any) -> Aggregator:
    try:
        return factory(*args, **kwargs)
    except ImportError as err:
        raise ConfigError(
            f"balancer {name} needs an optional solver ({err}); install it with: {SOLVERS_EXTRA}"
        ) from err


Impl = Literal["fast", "torchjd"]
IMPLS: tuple[str, ...] = ("fast", "torchjd")


class _FastOrTorchJD(GradientBalancer):
    """A Gramian method with two implementations of its weighting: ``impl: fast``, vectorised in this
    project (``balancers/fast_*.py``, tested against TorchJD's on the same Gramians), or ``impl: torchjd``, TorchJD's
    own, which stays the reference. They differ only in speed (docs/benchmarks.md) and in rounding."""

    def __init__(
        self,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
        impl: Impl = "fast",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian)
        if impl not in IMPLS:
            raise ConfigError(f"{type(self).__name__}: unknown impl {impl!r}; choose one of {list(IMPLS)}")
        self.impl = impl

    def fast_weighting(self) -> torch.nn.Module:
        """The in-project weighting (``impl: fast``)."""
        raise NotImplementedError

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        """TorchJD's aggregator of the method (``impl: torchjd``)."""
        raise NotImplementedError

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        if self.impl == "torchjd":
            return self.torchjd_aggregator(num_tasks)
        # GradientBalancer.bind takes an aggregator's Gramian weighting: here the in-project one, and no TorchJD
        # aggregator is built (UPGrad/DualProj's would need the quadprog solver installed).
        return cast("Aggregator", SimpleNamespace(gramian_weighting=self.fast_weighting()))


class MGDA(_FastOrTorchJD):
    """Multiple-gradient descent: the min-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

    def __init__(
        self,
        epsilon: float = 0.001,
        max_iters: int = 100,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
        impl: Impl = "fast",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian, impl)
        self.epsilon, self.max_iters = epsilon, max_iters

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().MGDA(epsilon=self.epsilon, max_iters=self.max_iters)

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_mgda import FastMGDAWeighting

        return FastMGDAWeighting(epsilon=self.epsilon, max_iters=self.max_iters)


class PCGrad(_FastOrTorchJD):
    """Projecting conflicting gradients onto each other's normal planes (Yu et al. 2020)."""

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().PCGrad()

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_pcgrad import FastPCGradWeighting

        return FastPCGradWeighting()


class CAGrad(_FastOrTorchJD):
    """Conflict-averse gradient descent: the best worst-case improvement near the mean gradient (Liu et al. 2021).

    ``impl: fast`` (the default) solves TorchJD's problem exactly with an active-set method and needs no cvxpy;
    ``impl: torchjd`` solves it with cvxpy (the solvers extra).
    """

    def __init__(
        self,
        c: float = 0.5,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
        impl: Impl = "fast",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian, impl)
        self.c = c

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _build("CAGrad", _torchjd_aggregation().CAGrad, c=self.c)

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_cagrad import FastCAGradWeighting

        return FastCAGradWeighting(c=self.c)


class IMTLG(GradientBalancer):
    """Impartial MTL, gradient part: equal projections of the update on every task gradient (Liu et al. 2021)."""

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().IMTLG()


class GradVac(_FastOrTorchJD):
    """Gradient vaccine: aligns task gradients towards an EMA of their cosine similarity (Wang et al. 2021).

    Both impls keep the EMA state in ``cosine_targets``, so a checkpoint written with one loads with the other.
    """

    cosine_targets: Tensor  # a buffer, registered in bind()

    def __init__(
        self,
        beta: float = 0.5,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
        impl: Impl = "fast",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian, impl)
        self.beta = beta

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().GradVac(beta=self.beta)

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_gradvac import FastGradVacWeighting

        return FastGradVacWeighting(beta=self.beta)

    def bind(self, tasks: list[TaskSpec], encoder: torch.nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        # The EMA cosine targets of every task pair, kept here at full size: checkpointed from the first step on
        # (TorchJD's own buffer starts as None, which made checkpoints unloadable), and kept for the other pairs
        # while a task is absent (TorchJD resets its state whenever the number of tasks changes).
        self.register_buffer("cosine_targets", torch.zeros(len(tasks), len(tasks)))

    def _weigh(self, gramian: Tensor, idx: Tensor) -> Tensor:
        if self.impl == "fast":
            # The in-project weighting takes the present tasks' block of targets and returns it updated.
            from mtl_lightning.balancers.fast_gradvac import gradvac_step

            fast = cast("FastGradVacWeighting", self.weighting)
            block = self.cosine_targets[idx][:, idx]
            weights, targets = gradvac_step(gramian, block, fast.beta, fast.eps)
            self.cosine_targets[idx[:, None], idx] = targets.to(self.cosine_targets)
            return weights
        # TorchJD's GradVacWeighting (torchjd_aggregator builds GradVac) keeps its EMA state privately: compat.py
        # loads the present tasks' block into it and reads it back after the call.
        weighting: Any = self.weighting
        set_gradvac_state(weighting, self.cosine_targets[idx][:, idx].to("cpu", gramian.dtype))
        try:
            weights = weighting(gramian)
            updated = gradvac_state(weighting)
            assert updated is not None  # set above, updated in place by the call
            self.cosine_targets[idx[:, None], idx] = updated.to(self.cosine_targets)
        finally:
            weighting.reset()  # back to None: the state lives in cosine_targets only
        return weights


class AlignedMTL(GradientBalancer):
    """Aligned-MTL: aligns the principal components of the gradient matrix (Senushkin et al. 2023)."""

    def __init__(
        self,
        scale_mode: Literal["min", "median", "rmse"] = "min",
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian)
        self.scale_mode = scale_mode

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().AlignedMTL(scale_mode=self.scale_mode)


class _TorchJDByDefault(_FastOrTorchJD):
    """A method whose in-project weighting is not the faster one on a CPU: ``impl: torchjd`` by default."""

    def __init__(
        self,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
        impl: Impl = "torchjd",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian, impl)


class UPGrad(_TorchJDByDefault):
    """Unconflicting projection of gradients: non-conflicting with every task (Quinton & Rey 2024).

    ``impl: torchjd`` is the default: the batched solver (``impl: fast``, which needs no quadprog) pays off on a CPU
    only from about 40 tasks (docs/benchmarks.md).
    """

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _build("UPGrad", _torchjd_aggregation().UPGrad)

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_projection import FastUPGradWeighting

        return FastUPGradWeighting()


class DualProj(_TorchJDByDefault):
    """Projection of the mean gradient onto the dual cone of the task gradients (Quinton & Rey 2024).

    ``impl: torchjd`` is the default, as for :class:`UPGrad`: one small QP is no faster batched on a CPU.
    """

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _build("DualProj", _torchjd_aggregation().DualProj)

    def fast_weighting(self) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_projection import FastDualProjWeighting

        return FastDualProjWeighting()


def _fast_impls() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """``{method: (TorchJD's weighting, the in-project one)}`` for the benchmark and the tests, built on call.

    Factories take no argument, or ``num_tasks`` for a weighting sized to its tasks (NashMTL's).
    """
    tjd = _torchjd_aggregation()
    return {
        "PCGrad": (lambda: tjd.PCGrad().gramian_weighting, lambda: PCGrad().fast_weighting()),
        "MGDA": (lambda: tjd.MGDA().gramian_weighting, lambda: MGDA().fast_weighting()),
        "UPGrad": (lambda: tjd.UPGrad().gramian_weighting, lambda: UPGrad(impl="fast").fast_weighting()),
        "DualProj": (lambda: tjd.DualProj().gramian_weighting, lambda: DualProj(impl="fast").fast_weighting()),
        "GradVac": (lambda: tjd.GradVac().gramian_weighting, lambda: GradVac().fast_weighting()),
        "CAGrad": (lambda: tjd.CAGrad(c=0.5).gramian_weighting, lambda: CAGrad().fast_weighting()),
        # Sized to the tasks; TorchJD's side is an aggregator of the Jacobian (benchmarks/weightings.py gives it J).
        "NashMTL": (
            lambda num_tasks: tjd.NashMTL(n_tasks=num_tasks),
            lambda num_tasks: NashMTL().fast_weighting(num_tasks),
        ),
    }


class NashMTL(_FastOrTorchJD):
    """Nash bargaining over the task gradients (Navon et al. 2022): weights ``alpha > 0`` with ``G alpha = 1/alpha``.

    ``impl: fast`` (the default) solves that system on the Gramian by Newton's method
    (:mod:`~mtl_lightning.balancers.fast_nash`): a Gramian weighting like the others, so DDP-exact and with a
    parameter mode, and no cvxpy. ``impl: torchjd`` runs TorchJD's ``NashMTL`` (a cvxpy problem per solve, the solvers
    extra), a Jacobian aggregator: representation mode only, and each DDP rank aggregates its own Jacobian.
    ``optim_niter`` bounds the Newton iterations (``fast``, which stops at convergence) or TorchJD's convex steps.
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        ddp_exact: bool = True,
        telemetry: bool = True,
        mode: Mode = "representation",
        gramian: GramianMethod = "batched",
        impl: Impl = "fast",
    ):
        super().__init__(mode, ddp_exact, telemetry, gramian, impl)
        if impl == "torchjd" and mode == "parameter":
            raise ConfigError(
                "NashMTL(impl='torchjd') aggregates the Jacobian itself, not its Gramian, so it has no parameter "
                "mode; use impl: fast (the default) or mode: representation"
            )
        self.max_norm, self.update_weights_every, self.optim_niter = max_norm, update_weights_every, optim_niter
        self._subset_aggregators: dict[tuple[int, ...], Aggregator] = {}

    def torchjd_aggregator(self, num_tasks: int) -> Aggregator:
        return _build(
            "NashMTL",
            _torchjd_aggregation().NashMTL,
            n_tasks=num_tasks,
            max_norm=self.max_norm,
            update_weights_every=self.update_weights_every,
            optim_niter=self.optim_niter,
        )

    def fast_weighting(self, num_tasks: int | None = None) -> torch.nn.Module:
        from mtl_lightning.balancers.fast_nash import FastNashMTLWeighting

        if num_tasks is None:
            raise TypeError("NashMTL's weighting holds per-task state: give it num_tasks")
        return FastNashMTLWeighting(
            num_tasks,
            max_norm=self.max_norm,
            update_weights_every=self.update_weights_every,
            max_iters=self.optim_niter,
        )

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        if self.impl == "torchjd":
            return self.torchjd_aggregator(num_tasks)
        # As _FastOrTorchJD's, with the weighting sized to the tasks (its state is checkpointed from bind on).
        return cast("Aggregator", SimpleNamespace(gramian_weighting=self.fast_weighting(num_tasks)))

    def _weigh(self, gramian: Tensor, idx: Tensor) -> Tensor:
        # The fast weighting keeps one state for all tasks and is told which are present (it reuses weights between
        # solves only for the same set of tasks).
        weighting: Any = self.weighting  # a FastNashMTLWeighting (impl: torchjd aggregates instead)
        return weighting(gramian, idx)

    def _aggregate(self, matrix: Tensor, idx: Tensor) -> Tensor:
        # impl: torchjd. TorchJD's NashMTL is sized to n_tasks: steps where some tasks are absent use one aggregator
        # per subset.
        if len(idx) == len(self.task_names):
            return super()._aggregate(matrix, idx)
        key = tuple(idx.tolist())
        if key not in self._subset_aggregators:
            self._subset_aggregators[key] = self.torchjd_aggregator(len(key))
        return self._subset_aggregators[key](matrix)


class GradDrop(GradientBalancer):
    """Gradient sign dropout (Chen et al. 2020): acts on the gradient on the representation itself."""

    def __init__(self, ddp_exact: bool = True, telemetry: bool = True):
        super().__init__("representation", ddp_exact, telemetry)

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        return _torchjd_aggregation().GradDrop()
