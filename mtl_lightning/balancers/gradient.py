"""Gradient balancing methods, kept inside Lightning's automatic optimisation.

A gradient method turns the per-task gradients of the shared part of the model into one update. TorchJD supplies
the math: most methods are *weightings of the Gramian* ``G = J J^T`` (T x T) of the per-task gradients, the rest
are aggregators of the Jacobian ``J`` itself. This module computes ``J`` (or only ``G``) and hands back one scalar
whose ordinary backward produces the aggregated update, so gradient clipping, accumulation, AMP scaling and DDP keep
working with no custom loop:

- **representation mode** (default, cheap): ``J`` holds the gradients w.r.t. the shared representation ``z``,
  taken through the small heads only; the encoder is backpropagated once, as usual.
- **parameter mode** (exact): ``G`` is the Gramian of the gradients w.r.t. the encoder's parameters, computed by
  TorchJD's autogram engine without materialising ``J``.

Either way the update is applied through ``z``: with ``g_t = dL_t/dz`` and ``g`` the aggregated gradient on ``z``,
``sum_t L_t + <z, (g - sum_t g_t).detach()>`` gives every head the gradient of its own loss and the encoder
``(dz/dθ)^T g``. For a Gramian weighting ``g = sum_t w_t g_t``, which makes the encoder's gradient exactly
``sum_t w_t dL_t/dθ`` (the chain rule), whichever mode computed ``w``. Encoders that return one representation
per task (MMoE, PLE, ...) have no single shared ``z``: use parameter mode there ("shared" = the encoder's
parameters), and the same identity holds per representation.

Under DDP the T x T Gramian is all-reduced (representation mode: exactly the global batch's Gramian, since rows of
``z`` on different ranks are different variables), so every rank computes the same weights — a few bytes of
communication instead of gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer
from mtl_lightning.balancers.telemetry import gramian_telemetry
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

Mode = Literal["representation", "parameter"]


def _torchjd_aggregation():
    try:
        import torchjd.aggregation as aggregation
    except ImportError as err:  # pragma: no cover - torchjd is a dependency
        raise ConfigError('gradient balancers need TorchJD: pip install "torchjd>=0.18,<0.19"') from err
    return aggregation


def per_task_gradients(losses: Tensor, z: Tensor | Sequence[Tensor]) -> Tensor:
    """``(T, *shape)`` gradients of each loss w.r.t. its representation, keeping the graph for the final backward.

    ``z`` is one tensor every loss depends on, or one distinct tensor per loss that only that loss depends on (the
    per-head aliases the module passes under hard sharing). With one tensor per loss a single backward of
    ``sum_t L_t`` through the heads yields every task's gradient: O(T B D) work. With one shared tensor a batched
    call (vmap over the identity) sends all T rows through every head, O(T^2 B D); it falls back to one call per task
    where the graph does not support vmap. Only the heads are traversed.
    """
    if not isinstance(z, Tensor):
        reps = list(z)
        if len(reps) != len(losses) or len({id(r) for r in reps}) != len(reps):
            raise ValueError("per_task_gradients: give one shared tensor, or one distinct tensor per loss")
        grads = torch.autograd.grad(losses.sum(), reps, retain_graph=True, allow_unused=True)
        return torch.stack([torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads, strict=True)])
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    try:
        (grads,) = torch.autograd.grad(losses, z, eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses]
        grads = torch.stack([torch.zeros_like(z) if g is None else g for g in rows])
    return torch.zeros((len(losses), *z.shape), dtype=z.dtype, device=z.device) if grads is None else grads


class GradientBalancer(Balancer):
    """Base class: subclasses say which TorchJD aggregator to use in :meth:`make_aggregator`.

    Args:
        mode: ``representation`` (gradients w.r.t. the shared representation) or ``parameter`` (Gramian w.r.t. the
            encoder's parameters; needed for encoders with one representation per task).
        ddp_exact: All-reduce the T x T Gramian across DDP ranks so every rank uses the global batch's weights.
        telemetry: Log per-task gradient norms, pairwise cosines and the fraction of conflicting pairs.
    """

    def __init__(self, mode: Mode = "representation", ddp_exact: bool = True, telemetry: bool = True):
        super().__init__()
        if mode not in ("representation", "parameter"):
            raise ConfigError(f"{type(self).__name__}: mode must be 'representation' or 'parameter', got {mode!r}")
        self.mode = mode
        self.ddp_exact = ddp_exact
        self.telemetry = telemetry
        self.last_cosine: Tensor | None = None  # for the gradient-conflict heatmap callback

    def make_aggregator(self, num_tasks: int):
        """The TorchJD aggregator of this method (a GramianWeightedAggregator where possible)."""
        raise NotImplementedError

    def bind(self, tasks: list[TaskSpec], encoder: torch.nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        aggregator = self.make_aggregator(len(tasks))
        weighting = getattr(aggregator, "gramian_weighting", None)
        # Stored as a submodule so stateful weightings (GradVac, Nash-MTL) are checkpointed with the model.
        self.weighting = weighting
        self.aggregator = None if weighting is not None else aggregator
        if self.mode == "parameter":
            if self.aggregator is not None:
                raise ConfigError(
                    f"{type(self).__name__} aggregates the Jacobian itself, not its Gramian, so it has no parameter "
                    "mode; use mode: representation"
                )
            self._engine = self._make_engine(encoder)

    def _make_engine(self, encoder: torch.nn.Module | None):
        if encoder is None or not any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError(
                f"{type(self).__name__}(mode='parameter') needs an encoder with trainable parameters; the encoder "
                "is frozen or has none. Unfreeze it or use mode: representation"
            )
        from torchjd.autogram import Engine

        self._shared_params = [p for p in encoder.parameters() if p.requires_grad]  # for the AMP fallback

        # The engine hooks the encoder's leaf modules; it must exist before the forward passes it measures.
        leaves = [m for m in encoder.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
        return Engine(*leaves, batch_dim=None)

    # ------------------------------------------------------------------------------------------- forward
    def _shared(self, inputs: BalanceInput) -> Tensor | None:
        """The shared representation under hard sharing (given by the module, or the one tensor of every task)."""
        if inputs.shared is not None:
            return inputs.shared
        tensors = list(inputs.representations.values())
        return tensors[0] if all(t is tensors[0] for t in tensors) else None

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        losses, present = inputs.losses, inputs.present
        names = self.task_names
        z = self._shared(inputs)
        if not all(r.requires_grad for r in inputs.representations.values()):
            raise ConfigError(
                f"{type(self).__name__} needs the gradients of the task losses w.r.t. the encoder's output, but the "
                "encoder is frozen (its output does not require grad). Unfreeze the encoder or use a loss-weighting "
                "balancer (static, uncertainty, famo, ...)"
            )
        if z is not None:
            reps = [inputs.representations[n] for n in names]
            distinct = len({id(r) for r in reps}) == len(reps)  # one alias per head: one backward gives all rows
            grads = per_task_gradients(losses, reps if distinct else z)  # (T, *z.shape)
            flat = grads.reshape(len(names), -1).float()
        else:
            if self.mode == "representation":
                raise ConfigError(
                    f"{type(self).__name__}: the encoder returns one representation per task, so there is no shared "
                    "representation to balance in; set the balancer's mode: parameter"
                )
            grads_per_task = [
                per_task_gradients(losses[i : i + 1], inputs.representations[n])[0] for i, n in enumerate(names)
            ]
        amp = torch.is_autocast_enabled(losses.device.type)
        # In float32 even under AMP: autocast would run the Gramian's matmul in bf16/fp16.
        with torch.autocast(losses.device.type, enabled=False):
            gramian = self._gramian(losses, flat if z is not None else None, amp)
            if self.ddp_exact and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(gramian)
                gramian = gramian / dist.get_world_size() ** 2
            weights, aggregated = self._combine(gramian, present, flat if z is not None else None)
        if z is not None:
            correction = (aggregated - flat.sum(0)).reshape(z.shape).to(z.dtype)
            # Value 0, gradient `correction` on z: the encoder receives the aggregated gradient.
            inner = (z * correction.detach()).sum()
        else:
            inner = sum(
                (inputs.representations[n] * ((weights[i] - 1) * g).detach().to(g.dtype)).sum()
                for i, (n, g) in enumerate(zip(names, grads_per_task, strict=True))
            )
        total = losses.sum()
        # The value logged as train/loss: the weighted *mean* of the task losses, so it is comparable across methods
        # whose weights sum to different totals (PCGrad's sum to ~T, MGDA's to 1); only the gradient uses `weights`.
        w = weights.to(losses.dtype).detach()
        value = ((w * losses).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)).detach()
        loss = value + (total - total.detach()) + (inner - inner.detach())
        logs = self._telemetry(gramian) if self.telemetry and inputs.log else {}
        return BalanceOutput(loss=loss, weights=weights.detach(), logs=logs)

    def _gramian(self, losses: Tensor, flat: Tensor | None, amp: bool = False) -> Tensor:
        if self.mode == "parameter" and amp:
            # TorchJD's autogram engine fails on graphs recorded under autocast (bf16/fp16 activations with fp32
            # parameters: "expected scalar type BFloat16 but found Float"), so materialise J_θ: one backward
            # through the encoder per task.
            rows = []
            for loss in losses:
                grads = torch.autograd.grad(loss, self._shared_params, retain_graph=True, allow_unused=True)
                flat_grads = [
                    torch.zeros_like(p) if g is None else g for p, g in zip(self._shared_params, grads, strict=True)
                ]
                rows.append(torch.cat([g.reshape(-1).float() for g in flat_grads]))
            jacobian = torch.stack(rows)
            return jacobian @ jacobian.T
        if self.mode == "parameter":
            return self._engine.compute_gramian(losses).float()
        assert flat is not None
        return flat @ flat.T

    def _combine(self, gramian: Tensor, present: Tensor, flat: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Weights (T,) (zero for absent tasks) and, for Jacobian aggregators, the aggregated gradient."""
        idx = present.nonzero().flatten()
        weights = torch.zeros(len(present), dtype=gramian.dtype, device=gramian.device)
        if len(idx) == 0:
            return weights, None if flat is None else torch.zeros_like(flat[0])
        if self.weighting is not None:
            weights[idx] = self._weigh(gramian[idx][:, idx], idx).to(gramian.dtype)
            if self.ddp_exact and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # Randomised weightings (PCGrad's task order) must not depend on each rank's RNG stream: every rank
                # applies rank 0's weights, as one process on the global batch would (T floats of communication).
                dist.broadcast(weights, src=0)
            return weights, None if flat is None else weights.to(flat.dtype) @ flat
        assert flat is not None
        aggregated = self._aggregate(flat[idx], idx)
        # Effective weights of the aggregated gradient in the span of the task gradients (least squares), for logs.
        solution = torch.linalg.lstsq(flat[idx].T.double(), aggregated.double()[:, None]).solution.flatten()
        weights[idx] = solution.to(weights.dtype)
        return weights, aggregated

    def _weigh(self, gramian: Tensor, idx: Tensor) -> Tensor:
        """Weights of the present tasks ``idx`` from their Gramian (hook for weightings with per-task state)."""
        return self.weighting(gramian)

    def _aggregate(self, matrix: Tensor, idx: Tensor) -> Tensor:
        """Aggregated gradient of the present tasks ``idx`` (hook for aggregators sized to the task count)."""
        return self.aggregator(matrix)

    def _telemetry(self, gramian: Tensor) -> dict[str, Tensor]:
        logs, cosine = gramian_telemetry(gramian.detach(), self.task_names)
        self.last_cosine = cosine
        return logs
