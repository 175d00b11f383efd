"""Gradient balancing methods, kept inside Lightning's automatic optimisation.

A gradient method turns the per-task gradients of the shared part of the model into one update. TorchJD supplies
the math: most methods are *weightings of the Gramian* ``G = J J^T`` (T x T) of the per-task gradients, the rest
are aggregators of the Jacobian ``J`` itself. This module computes ``J`` (or only ``G``) and hands back one scalar
whose ordinary backward produces the aggregated update, so gradient clipping, accumulation, AMP scaling and DDP keep
working with no custom loop:

- **representation mode** (default, cheap): ``J`` holds the gradients w.r.t. the shared representation ``z``,
  taken through the small heads only; the encoder is backpropagated once, as usual.
- **parameter mode** (exact): ``G`` is the Gramian of the gradients w.r.t. the encoder's parameters. By default
  (``gramian="batched"``) it comes from one T-batched backward of the per-task gradients on ``z`` to the encoder's
  parameters, ``G = sum_p J_p J_p^T`` (what TorchJD's ``mtl_backward`` computes); that holds the T x P Jacobian
  for a moment. ``gramian="autogram"`` has TorchJD's autogram engine differentiate ``o_t = <z, g_t>`` (``g_t``
  constant, so ``do_t/dθ = dL_t/dθ``) instead: it never materialises ``J``, for encoders too large for T copies of
  their gradient.

One step is a pipeline of three small parts, the last two chosen once, at :meth:`GradientBalancer.bind`:

1. the **gradient source** (:mod:`~mtl_lightning.balancers.gradient_sources`): each task's gradient on the
   representation it reads (the shared ``z``, or its own under MMoE/PLE-style encoders), and, in the same backward
   through the heads, the heads' parameter gradients when the module gives them (``BalanceInput.task_parameters``);
2. the **Gramian backend** (:mod:`~mtl_lightning.balancers.gramians`): representation, batched parameter Jacobian
   or TorchJD's autogram; then the Gramian is all-reduced under DDP and the weighting turns it into weights;
3. the **delivery** (:mod:`~mtl_lightning.balancers.delivery`): with ``g`` the aggregated gradient on ``z``, the
   encoder gets ``(dz/dθ)^T g = sum_t w_t dL_t/dθ`` and head t the gradient of its own loss times the heads' scale
   (``1 / present tasks``, what equal weighting gives it), handed over so Lightning's backward does not walk the
   heads again, or through a surrogate scalar that walks them (FSDP, float16 autocast, no task parameters given).
   Encoders that return one representation per task (MMoE, PLE, ...) have no single shared ``z``: use parameter
   mode there ("shared" = the encoder's parameters), and the same identity holds per representation.

Under DDP the T x T Gramian is all-reduced (representation mode: exactly the global batch's Gramian, since rows of
``z`` on different ranks are different variables), so every rank computes the same weights — a few bytes of
communication instead of gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer
from mtl_lightning.balancers.delivery import hand_over, head_scale, surrogate
from mtl_lightning.balancers.gradient_sources import TaskGradients, task_gradients
from mtl_lightning.balancers.gramians import (
    AutogramGramian,
    BatchedParameterGramian,
    GramianBackend,
    RepresentationGramian,
    batched_sources,
    gramian_of,
)
from mtl_lightning.balancers.handover import leaves_outside
from mtl_lightning.balancers.telemetry import gramian_telemetry
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

if TYPE_CHECKING:  # TorchJD is imported where it is used, so a missing install gives a ConfigError
    from torchjd.aggregation import Aggregator, Weighting

Mode = Literal["representation", "parameter"]
GramianMethod = Literal["batched", "autogram"]


def _torchjd_aggregation() -> ModuleType:
    try:
        import torchjd.aggregation as aggregation
    except ImportError as err:  # pragma: no cover - torchjd is a dependency
        raise ConfigError('gradient balancers need TorchJD: pip install "torchjd>=0.18,<0.19"') from err
    return aggregation


def present_indices(present: Tensor, known: Sequence[bool] | None = None) -> tuple[Tensor, int]:
    """The indices of the present tasks (on ``present``'s device) and their count.

    Without ``known`` (the presence already on the host) this reads ``present`` to the host: a synchronisation on
    an accelerator. With it there is none: all present gives ``arange``, otherwise ``nonzero_static`` of the known
    size.
    """
    if known is None:
        idx = present.nonzero().flatten()
        return idx, len(idx)
    count = sum(bool(k) for k in known)
    if count == len(present):
        return torch.arange(count, device=present.device), count
    return torch.nonzero_static(present, size=count).flatten(), count


class GradientBalancer(Balancer):
    """Base class: subclasses say which TorchJD aggregator to use in :meth:`make_aggregator`.

    Args:
        mode: ``representation`` (gradients w.r.t. the shared representation) or ``parameter`` (Gramian w.r.t. the
            encoder's parameters; needed for encoders with one representation per task).
        ddp_exact: All-reduce the T x T Gramian across DDP ranks so every rank uses the global batch's weights.
        telemetry: Log per-task gradient norms, pairwise cosines and the fraction of conflicting pairs.
        gramian: How parameter mode computes its Gramian (ignored in representation mode). ``batched`` (default):
            one T-batched backward from the representation to the encoder's parameters, then ``sum_p J_p J_p^T``;
            it holds the T x P Jacobian (T times the encoder's trainable parameter count) for a moment.
            ``autogram``: TorchJD's autogram engine, which never materialises the Jacobian, for encoders whose
            T x P does not fit in memory. Both hold T copies of the encoder's intermediate gradients during their
            backward. Under autocast the engine fails, so ``autogram`` then takes one backward per task and holds
            the T x P Jacobian after all.
    """

    def __init__(
        self,
        mode: Mode = "representation",
        ddp_exact: bool = True,
        telemetry: bool = True,
        gramian: GramianMethod = "batched",
    ):
        super().__init__()
        if mode not in ("representation", "parameter"):
            raise ConfigError(f"{type(self).__name__}: mode must be 'representation' or 'parameter', got {mode!r}")
        if gramian not in ("batched", "autogram"):
            raise ConfigError(f"{type(self).__name__}: gramian must be 'batched' or 'autogram', got {gramian!r}")
        self.mode = mode
        self.ddp_exact = ddp_exact
        self.telemetry = telemetry
        self.gramian = gramian
        self.last_cosine: Tensor | None = None  # for the gradient-conflict heatmap callback
        self.backend: GramianBackend = RepresentationGramian()  # chosen by bind()
        self._fallbacks: Tensor | None = None  # steps whose weights were not finite, since the last warning
        self._hand_over: bool | None = None  # whether the given task parameters are all the heads': checked once
        self._encoder_hand_over: bool | None = None  # whether the encoder's parameters are all that feed z: once

    @property
    def supports_sharding(self) -> bool:  # type: ignore[override]
        # Parameter mode differentiates w.r.t. the full encoder parameters, which FSDP/FSDP2 only hold as shards.
        return self.mode != "parameter"

    sharding_hint = "mode: parameter needs the full encoder parameters; use mode: representation with FSDP/FSDP2"
    uses_task_parameters = True  # the heads' gradients are handed over (see _handed_over_parameters)

    def make_aggregator(self, num_tasks: int) -> Aggregator:
        """The TorchJD aggregator of this method (a GramianWeightedAggregator where possible)."""
        raise NotImplementedError

    def bind(self, tasks: list[TaskSpec], encoder: torch.nn.Module | None = None) -> None:
        """Choose this run's parts once: the weighting (or aggregator) and the Gramian backend."""
        super().bind(tasks, encoder)
        self._hand_over = self._encoder_hand_over = None  # new heads or encoder: check again
        aggregator = self.make_aggregator(len(tasks))
        weighting = getattr(aggregator, "gramian_weighting", None)
        # Stored as a submodule so stateful weightings (GradVac, Nash-MTL) are checkpointed with the model.
        self.weighting: Weighting[Any] | None = weighting
        self.aggregator: Aggregator | None = None if weighting is not None else aggregator
        self.backend = self._make_backend(encoder)
        if len(tasks) == 1:
            warnings.warn(
                f"{type(self).__name__} with one task: there is nothing to balance, so it trains as equal "
                "weighting would (the task's own gradient everywhere); give more tasks or use balancer: equal",
                stacklevel=2,
            )

    def _make_backend(self, encoder: torch.nn.Module | None) -> GramianBackend:
        if self.mode == "representation":
            return RepresentationGramian()
        if self.aggregator is not None:
            raise ConfigError(
                f"{type(self).__name__} aggregates the Jacobian itself, not its Gramian, so it has no parameter "
                "mode; use mode: representation"
            )
        if encoder is None or not any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError(
                f"{type(self).__name__}(mode='parameter') needs an encoder with trainable parameters; the "
                "encoder is frozen or has none. Unfreeze it or use mode: representation"
            )
        if self.gramian == "autogram":
            return AutogramGramian(encoder)
        return BatchedParameterGramian(list(encoder.parameters()))

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        """validate -> gradient source -> Gramian -> all-reduce -> weights -> delivery -> telemetry."""
        losses, present = inputs.losses, inputs.present
        reps = [inputs.representations[n] for n in self.task_names]
        z = self._validate(inputs, reps)
        if len(self.task_names) == 1:
            return self._single_task(losses, present)
        # The heads' parameter gradients are taken in the same backward as the per-task gradients and handed over
        # (empty: Lightning's backward walks the heads again for them).
        task_params = self._handed_over_parameters(inputs, reps)
        grads = task_gradients(losses, reps, z, task_params)
        log = self.telemetry and inputs.log
        amp = torch.is_autocast_enabled(losses.device.type)  # read before autocast is turned off below
        # In float32 even under AMP: autocast would run the Gramian's matmul in bf16/fp16.
        with torch.autocast(losses.device.type, enabled=False):
            # Parameter mode with the heads handed over: keep the Jacobians to hand the encoder its update as well,
            # so Lightning's backward walks neither the heads nor the encoder.
            encoder_params = self._handed_over_encoder(grads)
            encoder: tuple[list[Tensor], list[Tensor | None]] | None = None
            gramian: Tensor | None = None  # Jacobian aggregators (GradDrop, Nash-MTL) use it for telemetry only
            if encoder_params:
                assert isinstance(self.backend, BatchedParameterGramian)
                jacobians = self.backend.jacobians(grads, encoder_params)
                encoder = (encoder_params, jacobians)
                gramian = gramian_of(jacobians, grads.num_tasks, losses.device)
            elif self.weighting is not None or log:
                gramian = self.backend(grads, amp)
            if gramian is not None and self._all_reduces():
                dist.all_reduce(gramian)
                gramian = gramian / dist.get_world_size() ** 2
            weights, aggregated = self._combine(gramian, present, grads.flat, inputs.log, inputs.present_on_host)
        # The value logged as train/loss: the weighted *mean* of the task losses, so it is comparable across methods
        # whose weights sum to different totals (PCGrad's sum to ~T, MGDA's to 1); only the gradient uses `weights`.
        w = weights.to(losses.dtype).detach()
        value = ((w * losses).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)).detach()
        scale = head_scale(present)
        if task_params:
            loss = hand_over(grads, weights, aggregated, value, scale, encoder)
        else:
            loss = surrogate(grads, losses, weights, aggregated, value, scale)
        logs: dict[str, Tensor] = {}
        if inputs.log:
            self._warn_fallbacks(inputs.step)
        if log:
            assert gramian is not None  # computed above whenever the step logs
            logs = self._telemetry(gramian)
        return BalanceOutput(loss=loss, weights=weights.detach(), logs=logs)

    def _validate(self, inputs: BalanceInput, reps: Sequence[Tensor]) -> Tensor | None:
        """The shared representation (None: one per task), after refusing inputs this method cannot balance."""
        if not all(r.requires_grad for r in reps):
            raise ConfigError(
                f"{type(self).__name__} needs the gradients of the task losses w.r.t. the encoder's output, but the "
                "encoder is frozen (its output does not require grad). Unfreeze the encoder or use a loss-weighting "
                "balancer (static, uncertainty, famo, ...)"
            )
        z = inputs.shared
        if z is None and all(r is reps[0] for r in reps):
            z = reps[0]
        if z is None and self.mode == "representation":
            raise ConfigError(
                f"{type(self).__name__}: the encoder returns one representation per task, so there is no shared "
                "representation to balance in; set the balancer's mode: parameter"
            )
        return z

    @staticmethod
    def _single_task(losses: Tensor, present: Tensor) -> BalanceOutput:
        """One task: every method's update is that task's gradient, so the loss itself (documented pass-through)."""
        weights = present.to(losses.dtype)
        return BalanceOutput(loss=(losses * weights).sum(), weights=weights.detach())

    def _all_reduces(self) -> bool:
        """Whether this step shares its Gramian (and weights) across DDP ranks."""
        return self.ddp_exact and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _handed_over_parameters(self, inputs: BalanceInput, reps: Sequence[Tensor]) -> list[Tensor]:
        """The task parameters whose gradients this step takes with the per-task gradients and hands over, or [].

        Empty, so Lightning's backward walks the heads for them as before, when none are given, when tasks share a
        representation tensor (their gradients then take one backward each), under float16 autocast (taken here
        unscaled, small gradients could underflow; Lightning's backward is scaled), and when the task losses reach a
        trainable tensor that is neither given nor upstream of the representations (it would get no gradient; a
        warning names it, once).
        """
        params = [p for p in inputs.task_parameters if p.requires_grad]
        if not params or self._hand_over is False or len({id(r) for r in reps}) != len(reps):
            return []
        device = inputs.losses.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
            return []
        if self._hand_over is None:
            missing = leaves_outside(inputs.losses, reps, params)
            self._hand_over = not missing
            if missing:
                shapes = ", ".join(str(tuple(m.shape)) for m in missing[:5])
                warnings.warn(
                    f"{type(self).__name__}: the task losses reach trainable tensors that are not among the heads' "
                    f"parameters (shapes {shapes}); the heads' gradients will come from a second backward through "
                    "them, which is correct but slower",
                    stacklevel=2,
                )
        return params if self._hand_over else []

    def _handed_over_encoder(self, grads: TaskGradients) -> list[Tensor]:
        """The encoder parameters to hand their update over (parameter mode, batched Gramian), or [].

        Only when the heads are handed over (else Lightning's backward walks z anyway) and the representations
        depend on no trainable tensor outside the encoder (checked once; such a tensor would get no gradient).
        """
        # (parameter mode always has a Gramian weighting: bind() refuses Jacobian aggregators there)
        if not (grads.task_params and isinstance(self.backend, BatchedParameterGramian)):
            return []
        if self._encoder_hand_over is False:
            return []
        params = self.backend.trainable()
        if self._encoder_hand_over is None:
            sources, _ = batched_sources(grads)
            self._encoder_hand_over = bool(params) and not any(leaves_outside(s, [], params) for s in sources)
        return params if self._encoder_hand_over else []

    def _combine(
        self,
        gramian: Tensor | None,
        present: Tensor,
        flat: Tensor | None,
        effective: bool = True,
        known: Sequence[bool] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Weights (T,) (zero for absent tasks) and, for Jacobian aggregators, the aggregated gradient (else None).

        Jacobian aggregators have no weights of their own; ``effective`` asks for the least-squares weights of their
        result (for the logs). Without it (steps whose logs are not written) the weights are 1 for present tasks.
        ``known``: ``present`` as read to the host by the module (``BalanceInput.present_on_host``), so that picking
        the present tasks needs no host synchronisation of its own.
        """
        idx, count = present_indices(present, known)
        dtype = torch.float32 if gramian is None else gramian.dtype
        if self.weighting is not None:
            assert gramian is not None
            if count == len(present):  # every task present, the usual case: no sub-Gramian and no scatter
                weights = self._weigh(gramian, idx).to(device=gramian.device, dtype=dtype, copy=True)
            else:
                weights = torch.zeros(len(present), dtype=dtype, device=gramian.device)
                if count > 0:
                    weights[idx] = self._weigh(gramian[idx][:, idx], idx).to(dtype)
            weights = self._finite_or_equal(weights, present)
            if self._all_reduces():
                # Randomised weightings (PCGrad's task order) must not depend on each rank's RNG stream: every rank
                # applies rank 0's weights, as one process on the global batch would (T floats of communication).
                dist.broadcast(weights, src=0)
            return weights, None
        weights = torch.zeros(len(present), dtype=dtype, device=present.device)
        assert flat is not None
        if count == 0:
            return weights, torch.zeros_like(flat[0])
        aggregated = self._aggregate(flat[idx], idx)
        if effective:
            # Effective weights of the aggregated gradient in the span of the task gradients (least squares).
            solution = torch.linalg.lstsq(flat[idx].T.double(), aggregated.double()[:, None]).solution.flatten()
            weights[idx] = solution.to(weights.dtype)
        else:
            weights[idx] = 1.0
        return weights, aggregated

    def _finite_or_equal(self, weights: Tensor, present: Tensor) -> Tensor:
        """``weights``, or equal weights over the present tasks where a solver left any weight NaN or infinite.

        Decided on the device, with no host synchronisation; the steps that fell back are counted and a warning
        names them at the next step whose logs are written (:meth:`_warn_fallbacks`).
        """
        bad = ~torch.isfinite(weights).all()
        if self._fallbacks is None or self._fallbacks.device != weights.device:
            self._fallbacks = torch.zeros((), dtype=torch.long, device=weights.device)
        self._fallbacks += bad
        equal = present.to(weights.dtype) * head_scale(present).to(weights.dtype)
        return torch.where(bad, equal, weights)

    def _warn_fallbacks(self, step: int) -> None:
        """Warn (on a logged step, which reads to the host anyway) if weights fell back since the last warning."""
        if self._fallbacks is None:
            return
        count = int(self._fallbacks)
        if count:
            self._fallbacks.zero_()
            warnings.warn(
                f"{type(self).__name__}: the weighting gave non-finite weights on {count} step(s) up to step {step}; "
                "those steps used equal weights over the present tasks instead",
                stacklevel=3,
            )

    def _weigh(self, gramian: Tensor, idx: Tensor) -> Tensor:
        """Weights of the present tasks ``idx`` from their Gramian (hook for weightings with per-task state)."""
        assert self.weighting is not None  # _combine weighs only when there is a weighting
        return self.weighting(gramian)

    def _aggregate(self, matrix: Tensor, idx: Tensor) -> Tensor:
        """Aggregated gradient of the present tasks ``idx`` (hook for aggregators sized to the task count)."""
        assert self.aggregator is not None  # bind() sets one whenever there is no weighting
        return self.aggregator(matrix)

    def _telemetry(self, gramian: Tensor) -> dict[str, Tensor]:
        logs, cosine = gramian_telemetry(gramian.detach(), self.task_names)
        self.last_cosine = cosine
        return logs
