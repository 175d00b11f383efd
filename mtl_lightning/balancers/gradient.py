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

The update: with ``g_t = dL_t/dz`` and ``g`` the aggregated gradient on ``z`` (``sum_t w_t g_t`` for a weighting),
every head must get the gradient of its own loss and the encoder ``(dz/dθ)^T g = sum_t w_t dL_t/dθ`` (the chain
rule). When the module gives the heads' parameters (``BalanceInput.task_parameters``), their gradients come from
the same backward as the ``g_t`` and are handed over (:mod:`~mtl_lightning.balancers.handover`), with ``g`` for
``z``, so Lightning's backward does not walk the heads again; in parameter mode with the batched Gramian the encoder's
parameters get ``sum_t w_t J_p[t]`` the same way. Otherwise (FSDP, float16 autocast, a balancer called directly)
``sum_t L_t + <z, (g - sum_t g_t).detach()>`` gives the same gradients through one more walk of the heads.
Encoders that return one representation per task (MMoE, PLE, ...) have no single shared ``z``: use parameter mode
there ("shared" = the encoder's parameters), and the same identity holds per representation.

Under DDP the T x T Gramian is all-reduced (representation mode: exactly the global batch's Gramian, since rows of
``z`` on different ranks are different variables), so every rank computes the same weights — a few bytes of
communication instead of gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer
from mtl_lightning.balancers.handover import hand_over, leaves_outside
from mtl_lightning.balancers.telemetry import gramian_telemetry
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

if TYPE_CHECKING:  # TorchJD is imported where it is used, so a missing install gives a ConfigError
    from torchjd.aggregation import Aggregator, Weighting
    from torchjd.autogram import Engine

Mode = Literal["representation", "parameter"]
GramianMethod = Literal["batched", "autogram"]


def _torchjd_aggregation() -> ModuleType:
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
        rep_grads = torch.autograd.grad(losses.sum(), reps, retain_graph=True, allow_unused=True)
        return torch.stack([torch.zeros_like(r) if g is None else g for r, g in zip(reps, rep_grads, strict=True)])
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    grads: Tensor | None  # None where no loss reaches z (allow_unused)
    try:
        (grads,) = torch.autograd.grad(losses, z, eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses]
        grads = torch.stack([torch.zeros_like(z) if g is None else g for g in rows])
    return torch.zeros((len(losses), *z.shape), dtype=z.dtype, device=z.device) if grads is None else grads


def per_representation_gradients(losses: Tensor, reps: Sequence[Tensor]) -> list[Tensor]:
    """``dL_t/dz_t`` for each task ``t``, where ``z_t`` is task t's own representation (shapes may differ).

    When the tensors are distinct, loss t depends on ``z_t`` only, so one backward of ``sum_t L_t`` through the
    heads gives every row; tasks that read the same tensor take one backward each.
    """
    grads: Sequence[Tensor | None]  # None for a representation its loss does not reach (allow_unused)
    if len({id(r) for r in reps}) == len(reps):
        grads = torch.autograd.grad(losses.sum(), list(reps), retain_graph=True, allow_unused=True)
    else:
        grads = [
            torch.autograd.grad(loss, r, retain_graph=True, allow_unused=True)[0]
            for loss, r in zip(losses, reps, strict=True)
        ]
    return [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads, strict=True)]


def gradients_with_task_parameters(
    losses: Tensor, reps: Sequence[Tensor], params: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``dL_t/dz_t`` per task and ``d(sum_t L_t)/dp`` per task parameter ``p``, from one backward through the heads.

    ``reps`` must be distinct tensors, one per loss, each read by its own loss only (the module's per-head
    aliases, or per-task representations), so the gradient of the sum w.r.t. ``reps[t]`` is task t's alone. The
    heads' graph is freed by this backward: the caller hands the parameter gradients over instead of walking it
    again.
    """
    grads = torch.autograd.grad(losses.sum(), [*reps, *params], allow_unused=True)
    rep_grads = [torch.zeros_like(r) if g is None else g for r, g in zip(reps, grads[: len(reps)], strict=True)]
    return rep_grads, list(grads[len(reps) :])


def parameter_jacobians(
    sources: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor]
) -> list[Tensor | None]:
    """``J_p`` (T, *p.shape) for every parameter tensor ``p``, from one T-batched backward (None: no task reaches p).

    ``sources`` are the tensors through which the task losses reach ``params`` (the shared representation, or each
    task's own), and ``grads[i]`` is ``(T, *sources[i].shape)``: row t is task t's gradient w.r.t. ``sources[i]``
    (zero where task t does not read it). By the chain rule row t, backpropagated from ``sources`` to ``params``, is
    task t's gradient w.r.t. ``params``. The backward holds T copies of the encoder's intermediate gradients and
    returns the whole T x P Jacobian. Where a graph has no batching rule it takes one backward per task instead.
    """
    num_tasks = grads[0].shape[0]
    params = list(params)
    try:
        return list(
            torch.autograd.grad(
                list(sources), params, list(grads), retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(list(sources), params, [g[t] for g in grads], retain_graph=True, allow_unused=True)
            for t in range(num_tasks)
        ]
        return [
            None
            if all(row[i] is None for row in rows)
            else torch.stack([torch.zeros_like(p) if row[i] is None else row[i] for row in rows])
            for i, p in enumerate(params)
        ]


def gramian_of(jacobians: Sequence[Tensor | None], num_tasks: int, device: torch.device) -> Tensor:
    """``G = sum_p J_p J_p^T`` (T x T, float32) of per-parameter Jacobians ``(T, *p.shape)``."""
    gramian = torch.zeros(num_tasks, num_tasks, dtype=torch.float32, device=device)
    for jacobian in jacobians:
        if jacobian is not None:
            matrix = jacobian.reshape(num_tasks, -1).float()
            gramian.addmm_(matrix, matrix.T)
    return gramian


def parameter_gramian(sources: Sequence[Tensor], grads: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The T x T Gramian (float32) of the per-task gradients w.r.t. ``params``, from one T-batched backward.

    See :func:`parameter_jacobians`; the T x P Jacobian is freed once its Gramian is taken.
    """
    return gramian_of(parameter_jacobians(sources, grads, params), grads[0].shape[0], grads[0].device)


def _batched_by_source(reps: Sequence[Tensor], rep_grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The distinct tensors among ``reps`` and, for each, ``(T, *shape)`` with row t = task t's gradient on it."""
    sources: list[Tensor] = []
    index: dict[int, int] = {}
    for r in reps:
        if id(r) not in index:
            index[id(r)] = len(sources)
            sources.append(r)
    batched = [r.new_zeros((len(reps), *r.shape)) for r in sources]
    for t, (r, g) in enumerate(zip(reps, rep_grads, strict=True)):
        batched[index[id(r)]][t] = g
    return sources, batched


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
        self._engine: Engine | None = None  # built by bind() for parameter mode with gramian="autogram"
        self._hand_over: bool | None = None  # whether the given task parameters are all the heads': checked once
        self._encoder_hand_over: bool | None = None  # whether the encoder's parameters are all that feed z: once
        self._encoder_params: list[Tensor] = []

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
        super().bind(tasks, encoder)
        self._hand_over = self._encoder_hand_over = None  # new heads or encoder: check again
        aggregator = self.make_aggregator(len(tasks))
        weighting = getattr(aggregator, "gramian_weighting", None)
        # Stored as a submodule so stateful weightings (GradVac, Nash-MTL) are checkpointed with the model.
        self.weighting: Weighting[Any] | None = weighting
        self.aggregator: Aggregator | None = None if weighting is not None else aggregator
        if self.mode == "parameter":
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
            # A plain list, not a submodule: the encoder belongs to the LightningModule and is saved there once.
            self._encoder_params = list(encoder.parameters())
            if self.gramian == "autogram":
                # The engine hooks the encoder's leaf modules, and its hooks expect compute_gramian after every
                # forward that records a graph; so it exists only when it is used.
                self._engine = self._make_engine(encoder)

    @staticmethod
    def _make_engine(encoder: torch.nn.Module) -> Engine:
        from torchjd.autogram import Engine

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
        reps = [inputs.representations[n] for n in names]
        if not all(r.requires_grad for r in reps):
            raise ConfigError(
                f"{type(self).__name__} needs the gradients of the task losses w.r.t. the encoder's output, but the "
                "encoder is frozen (its output does not require grad). Unfreeze the encoder or use a loss-weighting "
                "balancer (static, uncertainty, famo, ...)"
            )
        z = self._shared(inputs)
        if z is None and self.mode == "representation":
            raise ConfigError(
                f"{type(self).__name__}: the encoder returns one representation per task, so there is no shared "
                "representation to balance in; set the balancer's mode: parameter"
            )
        parameter = self.mode == "parameter"
        # The heads' parameter gradients, taken in the same backward as the per-task gradients and handed over
        # (empty: Lightning's backward walks the heads again for them).
        task_params = self._handed_over_parameters(inputs, reps)
        param_grads: Sequence[Tensor | None] = ()
        flat: Tensor | None = None
        # Parameter mode: `sources`/`source_grads` feed the batched backward; `projections` (T,) are
        # o_t = <z_t, g_t> with g_t constant, whose gradient w.r.t. the encoder's parameters is task t's (chain
        # rule), for the autogram engine: its backward then starts at the representation, not at the losses.
        sources: list[Tensor] = []
        source_grads: list[Tensor] = []
        projections: Tensor | None = None
        if task_params:
            rep_grads, param_grads = gradients_with_task_parameters(losses, reps, task_params)
        if z is not None:
            if task_params:
                grads = torch.stack(rep_grads)  # (T, *z.shape)
            else:
                # with one alias per head (the module's), one backward through the heads gives all rows
                distinct = len({id(r) for r in reps}) == len(reps)
                grads = per_task_gradients(losses, reps if distinct else z)
            flat = grads.reshape(len(names), -1).float()
            if parameter and self.gramian == "batched":
                sources, source_grads = [z], [grads]
            elif parameter:
                # a matrix-vector product: its T-batched backward is (T x T) @ J, with no T x T x |z| intermediate
                projections = grads.reshape(len(names), -1) @ z.reshape(-1)
        else:
            if not task_params:
                rep_grads = per_representation_gradients(losses, reps)
            if parameter and self.gramian == "batched":
                sources, source_grads = _batched_by_source(reps, rep_grads)
            elif parameter:
                projections = torch.stack(
                    [torch.dot(r.flatten(), g.flatten()) for r, g in zip(reps, rep_grads, strict=True)]
                )
        log = self.telemetry and inputs.log
        amp = torch.is_autocast_enabled(losses.device.type)
        # In float32 even under AMP: autocast would run the Gramian's matmul in bf16/fp16.
        with torch.autocast(losses.device.type, enabled=False):
            # Jacobian aggregators (GradDrop, Nash-MTL) use the Gramian for telemetry only.
            gramian = None
            # Parameter mode with the heads handed over: keep the Jacobians to hand the encoder its update as well,
            # so Lightning's backward walks neither the heads nor the encoder.
            encoder_params = self._handed_over_encoder(task_params, sources)
            jacobians: list[Tensor | None] = []
            if encoder_params:
                jacobians = parameter_jacobians(sources, source_grads, encoder_params)
                gramian = gramian_of(jacobians, len(names), losses.device)
            elif self.weighting is not None or log:
                gramian = self._gramian(flat, sources, source_grads, projections, amp)
            if gramian is not None and self._all_reduces():
                dist.all_reduce(gramian)
                gramian = gramian / dist.get_world_size() ** 2
            weights, aggregated = self._combine(gramian, present, flat, effective=inputs.log)
        # The value logged as train/loss: the weighted *mean* of the task losses, so it is comparable across methods
        # whose weights sum to different totals (PCGrad's sum to ~T, MGDA's to 1); only the gradient uses `weights`.
        w = weights.to(losses.dtype).detach()
        value = ((w * losses).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)).detach()
        if task_params:
            # The representation(s) get the aggregated gradient and the heads their own losses' gradients, with no
            # second walk through the heads.
            if encoder_params:  # the encoder's parameters get sum_t w_t J_p[t] directly
                targets = encoder_params
                target_grads = [
                    None if jac is None else torch.tensordot(weights.to(jac.dtype), jac, dims=1) for jac in jacobians
                ]
            elif z is not None:
                assert flat is not None  # set above whenever z is
                update = weights.to(flat.dtype) @ flat if aggregated is None else aggregated
                targets, target_grads = [z], [update]
            else:  # distinct representations (checked by _handed_over_parameters): task t's gets w_t g_t
                targets = list(reps)
                target_grads = [weights[i].to(g.dtype) * g for i, g in enumerate(rep_grads)]
            loss = value + hand_over([*targets, *task_params], [*target_grads, *param_grads])
        else:  # the heads are walked again by Lightning's backward, through `total`
            if z is not None:
                assert flat is not None  # set above whenever z is
                # g - sum_t g_t; for a weighting g = sum_t w_t g_t, so one pass over the rows: (w - 1) @ J.
                correction = (weights.to(flat.dtype) - 1) @ flat if aggregated is None else aggregated - flat.sum(0)
                # Value 0, gradient `correction` on z: the encoder receives the aggregated gradient.
                inner = (z * correction.reshape(z.shape).to(z.dtype).detach()).sum()
            else:
                terms = [
                    (r * ((weights[i] - 1) * g).detach().to(g.dtype)).sum()
                    for i, (r, g) in enumerate(zip(reps, rep_grads, strict=True))
                ]
                inner = cast(Tensor, sum(terms))  # never sum()'s start value 0: there is at least one task
            total = losses.sum()
            loss = value + (total - total.detach()) + (inner - inner.detach())
        logs: dict[str, Tensor] = {}
        if log:
            assert gramian is not None  # computed above whenever the step logs
            logs = self._telemetry(gramian)
        return BalanceOutput(loss=loss, weights=weights.detach(), logs=logs)

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

    def _handed_over_encoder(self, task_params: Sequence[Tensor], sources: Sequence[Tensor]) -> list[Tensor]:
        """The encoder parameters to hand their update over (parameter mode, batched Gramian), or [].

        Only when the heads are handed over (else Lightning's backward walks z anyway) and the representations
        depend on no trainable tensor outside the encoder (checked once; such a tensor would get no gradient).
        """
        # (parameter mode always has a Gramian weighting: bind() refuses Jacobian aggregators there)
        if not (task_params and sources and self.mode == "parameter" and self.gramian == "batched"):
            return []
        if self._encoder_hand_over is False:
            return []
        params = [p for p in self._encoder_params if p.requires_grad]
        if self._encoder_hand_over is None:
            self._encoder_hand_over = bool(params) and not any(leaves_outside(s, [], params) for s in sources)
        return params if self._encoder_hand_over else []

    def _gramian(
        self,
        flat: Tensor | None,
        sources: list[Tensor],
        grads: list[Tensor],
        projections: Tensor | None,
        amp: bool = False,
    ) -> Tensor:
        if self.mode == "representation":
            assert flat is not None
            return flat @ flat.T
        params = [p for p in self._encoder_params if p.requires_grad]  # frozen since bind: not shared any more
        if self.gramian == "batched":
            return parameter_gramian(sources, grads, params)
        assert projections is not None
        if not amp:
            if self._engine is None:
                raise RuntimeError(f"{type(self).__name__}: no autogram engine; bind() builds it from the encoder")
            return self._engine.compute_gramian(projections).float()
        # TorchJD's autogram engine fails on graphs recorded under autocast (bf16/fp16 activations with fp32
        # parameters: "expected scalar type BFloat16 but found Float"), so materialise J_θ: one backward through the
        # encoder per task.
        rows = []
        for projection in projections:
            row = torch.autograd.grad(projection, params, retain_graph=True, allow_unused=True)
            flat_row = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, row, strict=True)]
            rows.append(torch.cat(flat_row).float())
        jacobian = torch.stack(rows)
        return jacobian @ jacobian.T

    def _combine(
        self, gramian: Tensor | None, present: Tensor, flat: Tensor | None, effective: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Weights (T,) (zero for absent tasks) and, for Jacobian aggregators, the aggregated gradient (else None).

        Jacobian aggregators have no weights of their own; ``effective`` asks for the least-squares weights of their
        result (for the logs). Without it (steps whose logs are not written) the weights are 1 for present tasks.
        """
        idx = present.nonzero().flatten()
        dtype = torch.float32 if gramian is None else gramian.dtype
        if self.weighting is not None:
            assert gramian is not None
            if len(idx) == len(present):  # every task present, the usual case: no sub-Gramian and no scatter
                weights = self._weigh(gramian, idx).to(device=gramian.device, dtype=dtype, copy=True)
            else:
                weights = torch.zeros(len(present), dtype=dtype, device=gramian.device)
                if len(idx) > 0:
                    weights[idx] = self._weigh(gramian[idx][:, idx], idx).to(dtype)
            if self._all_reduces():
                # Randomised weightings (PCGrad's task order) must not depend on each rank's RNG stream: every rank
                # applies rank 0's weights, as one process on the global batch would (T floats of communication).
                dist.broadcast(weights, src=0)
            return weights, None
        weights = torch.zeros(len(present), dtype=dtype, device=present.device)
        assert flat is not None
        if len(idx) == 0:
            return weights, torch.zeros_like(flat[0])
        aggregated = self._aggregate(flat[idx], idx)
        if effective:
            # Effective weights of the aggregated gradient in the span of the task gradients (least squares).
            solution = torch.linalg.lstsq(flat[idx].T.double(), aggregated.double()[:, None]).solution.flatten()
            weights[idx] = solution.to(weights.dtype)
        else:
            weights[idx] = 1.0
        return weights, aggregated

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
