"""Adaptive loss weighting: UW, IMTL-L, RLW, GLS, DWA and FAMO (TorchJD's scalarizers) and GradNorm.

Every method is one :class:`~mtl_lightning.balancers.base.Balancer`. The math of the methods TorchJD has lives in
``torchjd.scalarization``; the classes here adapt it to the balancer slot (FAMO writes TorchJD's formulas out, for
speed: see its docstring):

- **Present tasks only.** A scalarizer is applied to the losses of the tasks that have labels in the batch, with
  its per-task state (UW's log-variances, FAMO's logits, ...) restricted to those tasks, so a method sees the
  present tasks exactly as if they were the only ones (softmax weights renormalise over them, nothing takes the
  log of an absent task's 0). Absent tasks get weight 0; their (zero) losses stay in the returned scalar so their
  heads remain in the graph (DDP sees every parameter used).
- **Weights.** The reported weight of a task is the derivative of the scalarization w.r.t. its loss: the factor
  its gradient is multiplied by. The scalarizer runs on a detached copy of the losses, and the returned loss is
  ``scalarization + sum_t w_t (L_t - L_t.detach())``: the value is the scalarization's, the model receives exactly
  ``sum_t w_t dL_t/dθ`` and learned scalarizer parameters (UW, IMTL-L) their own gradient.
- **DDP.** A rank's ``L_t`` is its share of the global mean (the module divides by global labelled counts), so the
  ranks' mean of them is the global batch's mean loss. The weights and every learned state are computed from that
  all-reduced mean, so all ranks agree and DDP's gradient averaging gives exactly ``sum_t w_t dL_t/dθ`` of the
  global batch, for the non-linear methods (GLS, FAMO) too.
- **State.** Learned parameters (UW, IMTL-L, GradNorm) are parameters of the balancer, hence of the LightningModule:
  the model's optimizer trains them and checkpoints hold them. Other state (FAMO's logits and their Adam moments,
  DWA's epoch history, GradNorm's initial losses) is kept in buffers: saved in checkpoints, restored on resume.

Each method keeps the scale of its definition: UW, IMTL-L, DWA and GradNorm weigh a *sum* of losses (their weights
start at 1 per task, or 1/2 for UW), RLW's weights sum to 1, GLS and FAMO are mean-like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer, distributed, world_mean
from mtl_lightning.balancers.gradient_sources import per_task_gradients
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

# The epsilon FAMO adds inside its logarithm; also the floor of GLS's losses and of GradNorm's ratios.
_EPS = 1e-8
# GradNorm keeps every task weight at least this large before renormalising them to sum to T.
_MIN_GRADNORM_WEIGHT = 1e-4


def _scalarization() -> ModuleType:
    # Imported on first use: importing torchjd takes about a second, which every `mtl --help` would pay.
    import torchjd.scalarization as scalarization

    return scalarization


def _absent_part(losses: Tensor, present: Tensor) -> Tensor:
    """0 in value and gradient, but it keeps the absent tasks' heads in the graph (their losses are exact zeros)."""
    return (losses * ~present).sum()


def _parameter_anchor(module: nn.Module) -> Tensor | int:
    """0, connected to every trainable parameter of ``module``: a step in which all tasks are absent still gives
    them a (zero) gradient, as DDP without ``find_unused_parameters`` requires."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), 0)


def _per_task_values(
    name: str, values: float | Mapping[str, float] | None, tasks: list[str], default: float
) -> list[float]:
    """``values`` as one float per task: a single number for all, or ``{task: value}`` (others get ``default``)."""
    if values is None:
        return [default] * len(tasks)
    if isinstance(values, Mapping):
        unknown = sorted(set(values) - set(tasks))
        if unknown:
            raise ConfigError(f"{name}: values given for unknown tasks {unknown}; tasks are {tasks}")
        return [float(values.get(t, default)) for t in tasks]
    return [float(values)] * len(tasks)


class _ScalarizerBalancer(Balancer):
    """A TorchJD scalarizer (``self.scalarizer``) applied to the present tasks' losses (see the module docstring).

    ``per_task`` names the scalarizer's per-task parameters/buffers: when some tasks are absent they are swapped
    for their present rows with :func:`torch.func.functional_call`, so TorchJD's own ``forward`` runs on the
    present tasks only, and gradients reach the full parameters through the indexing.
    """

    per_task: tuple[str, ...] = ()
    log_prefix: str = ""  # per-task state is logged as ``{log_prefix}/{name}/<task>``
    scalarizer: nn.Module

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        loss, weights = self._scalarize(inputs)
        logs: dict[str, Tensor] = {}
        if inputs.log:
            for name in self.per_task:
                logs.update(self._task_logs(f"{self.log_prefix}/{name}", getattr(self.scalarizer, name)))
        return BalanceOutput(loss=loss, weights=weights, logs=logs)

    def _prepare(self, values: Tensor, idx: Tensor) -> Tensor:
        """Hook on the present tasks' (detached, rank-averaged) losses before the scalarizer sees them."""
        return values

    def _agree(self, out: Tensor, weights: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Hook making the ranks agree on the weights (only random methods need it)."""
        return out, weights

    def _scalarize(self, inputs: BalanceInput) -> tuple[Tensor, Tensor]:
        """The scalar to backpropagate and the weights ``(T,)`` (0 for absent tasks)."""
        losses, present = inputs.losses, inputs.present
        weights = torch.zeros_like(losses, requires_grad=False)
        absent = _absent_part(losses, present)
        idx = present.nonzero().flatten()
        if idx.numel() == 0:
            return absent + _parameter_anchor(self), weights
        everyone = idx.numel() == len(losses)
        values = world_mean(losses.detach())
        values = self._prepare(values if everyone else values[idx], idx)
        with torch.enable_grad():
            leaf = values.detach().requires_grad_()
            if everyone:
                out = self.scalarizer(leaf)
            else:
                state = {name: getattr(self.scalarizer, name)[idx] for name in self.per_task}
                out = functional_call(self.scalarizer, state, (leaf,))
            (grad,) = torch.autograd.grad(out, leaf, retain_graph=True)
        out, grad = self._agree(out, grad, values)
        mine = losses if everyone else losses[idx]
        # Value: the scalarization's. Gradient: w_t dL_t/dθ for the model; the scalarizer's own parameters (UW,
        # IMTL-L) get theirs from `out`.
        loss = out + (grad.to(mine.dtype) * (mine - mine.detach())).sum() + absent
        weights[idx] = grad.to(weights.dtype)
        return loss, weights

    def _task_logs(self, prefix: str, values: Tensor) -> dict[str, Tensor]:
        flat = values.detach().clone()  # a copy: the optimizer changes the state in place before it is written
        return {f"{prefix}/{name}": flat[i] for i, name in enumerate(self.task_names)}


# ---------------------------------------------------------------------------------------------- scalarizers
class UncertaintyWeighting(_ScalarizerBalancer):
    """Uncertainty weighting (UW): ``sum_t 1/2 exp(-s_t) L_t + 1/2 s_t`` with learned log-variances ``s_t``.

    Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics", CVPR 2018. Built on :class:`torchjd.scalarization.UW` (log-variances start at 0). The log-variances
    are parameters of the LightningModule, trained by its optimizer and saved in its checkpoints; an absent task's
    log-variance gets a zero gradient from that step. Logs ``uw/log_var/<task>``.
    """

    per_task = ("log_var",)
    log_prefix = "uw"

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        self.scalarizer = _scalarization().UW(len(tasks))


class IMTLL(_ScalarizerBalancer):
    """IMTL-L, the loss-balancing half of Impartial MTL: ``sum_t exp(s_t) L_t - s_t`` with learned scales ``s_t``.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021. Built on :class:`torchjd.scalarization.IMTLL`
    (scales start at 0, i.e. the plain sum). The scales are parameters of the LightningModule, trained by its
    optimizer. Logs ``imtl_l/log_scale/<task>``.
    """

    per_task = ("log_scale",)
    log_prefix = "imtl_l"

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        self.scalarizer = _scalarization().IMTLL(len(tasks))


class RandomLossWeighting(_ScalarizerBalancer):
    """Random loss weighting (RLW): each step, weights ``softmax(N(0, I))`` over the present tasks.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.
    Built on :class:`torchjd.scalarization.Random`; the weights it sampled are read back as the gradient of its
    (linear) output. Under DDP rank 0's sample is used on every rank, so each step has one weighting, as in a
    single process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scalarizer = _scalarization().Random()

    def _agree(self, out: Tensor, weights: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if not distributed():
            return out, weights
        weights = weights.contiguous()
        dist.broadcast(weights, src=0)
        return (weights * values).sum(), weights


class GeometricMean(_ScalarizerBalancer):
    """Geometric loss strategy (GLS): the geometric mean ``(prod_t L_t)^(1/T)`` of the present tasks' losses.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning", CVPR Workshops 2019. Built on :class:`torchjd.scalarization.GeometricMean`. A task's weight is
    ``GM / (T L_t)``: tasks with small losses weigh more. Losses must be non-negative; they are floored at 1e-8
    (FAMO's epsilon), so a task whose loss is exactly 0 gets a large but finite weight instead of a NaN.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scalarizer = _scalarization().GeometricMean()

    def _prepare(self, values: Tensor, idx: Tensor) -> Tensor:
        negative = values < 0
        if bool(negative.any()):
            bad = [self.task_names[int(i)] for i in idx[negative].tolist()]
            raise ConfigError(
                f"GeometricMean (GLS) needs non-negative losses, but task(s) {bad} have negative ones; use another "
                "balancer or a non-negative loss for them"
            )
        return values.clamp_min(_EPS)


# ---------------------------------------------------------------------------------------------------- FAMO
class FAMO(Balancer):
    """Fast Adaptive Multitask Optimization: weights that make all task losses decrease at the same rate.

    Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. The loss is
    ``c sum_t z_t log(L_t - b_t + eps)`` with ``z = softmax(logits)`` over the present tasks and
    ``c = 1 / sum_t (z_t / (L_t - b_t + eps))`` held constant: task ``t``'s gradient is weighted by
    ``c z_t / (L_t - b_t + eps)`` (the weights sum to 1).

    The logits are learned from how the losses change across a step. TorchJD's ``FAMO.update`` (like the paper's
    code) takes the losses recomputed on the same batch after the optimizer step, an extra forward pass per step.
    Here the next step's losses stand in for them: in :meth:`on_train_batch_end` the logits take one Adam step along
    ``-J^T delta`` (``J`` the Jacobian of ``softmax``), with ``delta_t = log(L_t^prev - b_t + eps) -
    log(L_t^now - b_t + eps)``: the previous step's losses against this step's, measured before this step's update
    and on another batch. This costs no extra forward pass; the change it measures includes batch-to-batch noise,
    which Adam's averaging and the small logit learning rate smooth out, and the logits lag one step behind. Only
    tasks present in both steps take part (softmax over them); the other tasks' logits and Adam moments stay as
    they are (Adam's step count is shared, as in ``torch.optim.Adam``).

    The formulas are those of :class:`torchjd.scalarization.FAMO` and its ``update``, whose internal optimizer is
    ``torch.optim.Adam``; the tests check the loss, the weights and the logit updates against them. They are written
    out here rather than called: TorchJD's version goes through autograd, ``torch.optim.Adam`` and (for absent tasks)
    an indexed subset, about 0.3 ms of CPU time per step next to a small model, where FAMO is meant to cost about
    as much as equal weighting (target: 1.05x its step time). The Adam step is ``torch.optim.Adam``'s single-tensor
    update (L2 weight decay, betas 0.9 and 0.999, eps 1e-8) on buffers.

    The logits, the previous step's losses and the logits' Adam state are buffers: saved in checkpoints, moved with
    the model, and outside the model's optimizer (only this update moves the logits). Logs ``famo/logit/<task>``.

    Args:
        lr: Learning rate of the logits' Adam (the paper's 0.025).
        weight_decay: Weight decay of the logits' Adam, the paper's regularisation of the logits (TorchJD's default
            1e-3; the official code uses 1e-5).
        min_losses: Lower bounds ``b_t`` of the losses: one number for all tasks or ``{task: bound}`` (default 0).
            Losses below their bound are treated as equal to it.
    """

    betas = (0.9, 0.999)
    eps = 1e-8
    # Buffers registered in bind(), declared for type checkers (nn.Module.__getattr__ is typed Tensor | Module).
    min_losses: Tensor
    logits: Tensor
    prev_log_losses: Tensor
    prev_present: Tensor
    logit_exp_avg: Tensor
    logit_exp_avg_sq: Tensor
    logit_steps: Tensor

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: float | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if lr < 0 or weight_decay < 0:
            raise ConfigError(f"FAMO: lr and weight_decay must be >= 0, got lr={lr}, weight_decay={weight_decay}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.min_losses_arg = min_losses
        # This step's present mask and log(L - b + eps), from forward to on_train_batch_end.
        self._step: tuple[Tensor, Tensor] | None = None

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        n = len(tasks)
        bounds = _per_task_values("FAMO min_losses", self.min_losses_arg, self.task_names, 0.0)
        self._bounded = any(b != 0 for b in bounds)
        self.register_buffer("min_losses", torch.tensor(bounds), persistent=False)  # configuration, not state
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("prev_log_losses", torch.zeros(n))  # the previous step's log(L - b + eps)
        self.register_buffer("prev_present", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("logit_exp_avg", torch.zeros(n))
        self.register_buffer("logit_exp_avg_sq", torch.zeros(n))
        self.register_buffer("logit_steps", torch.zeros((), dtype=torch.long))

    def _shifted(self, losses: Tensor) -> Tensor:
        """``L - b + eps``, with losses below their bound ``b`` held at it (no log of a negative number)."""
        return (losses - self.min_losses if self._bounded else losses).clamp_min(0) + _EPS

    def _softmax(self, mask: Tensor) -> Tensor:
        """``softmax(logits)`` over the tasks in ``mask`` (0 elsewhere; all 0 when the mask is empty)."""
        lowest = torch.finfo(self.logits.dtype).min
        return torch.softmax(torch.where(mask, self.logits, lowest), dim=0) * mask

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        losses, present = inputs.losses, inputs.present.detach()
        values = world_mean(losses.detach())
        shifted = self._shifted(values)
        log_shifted = shifted.log()
        self._step = present, log_shifted
        z = self._softmax(present).to(shifted.dtype)
        scaled = z / shifted
        norm = scaled.sum().clamp_min(torch.finfo(scaled.dtype).tiny)  # 1 / c
        weights = scaled / norm
        # Value: FAMO's loss; gradient: sum_t w_t dL_t/dθ. Absent tasks (weight 0) keep their heads in the graph.
        loss = torch.dot(z, log_shifted) / norm + torch.dot(weights, losses - values)
        logs = {}
        if inputs.log:
            logs = {f"famo/logit/{n}": v for n, v in zip(self.task_names, self.logits.clone(), strict=True)}
        return BalanceOutput(loss=loss, weights=weights.detach(), logs=logs)

    def on_train_batch_end(self, losses: Tensor) -> None:
        if self._step is not None:  # forward saw these losses already (averaged over ranks)
            present, now = self._step
            self._step = None
        else:  # called without a forward (e.g. directly): every task counts as present
            present = torch.ones_like(self.prev_present)
            now = self._shifted(world_mean(losses.detach())).log()
        now = now.to(self.prev_log_losses.dtype)
        both = present & self.prev_present
        count = int(both.sum())  # one host sync; the same on every rank
        if count == len(both):
            self._update_logits(self.prev_log_losses - now, None)
        elif count:
            self._update_logits(self.prev_log_losses - now, both.nonzero().flatten())
        self.prev_log_losses.copy_(now)
        self.prev_present.copy_(present)

    def _update_logits(self, delta: Tensor, idx: Tensor | None) -> None:
        """One Adam step of the logits in ``idx`` (all if None) along ``-J^T delta``, ``J`` the Jacobian of their
        softmax: ``J^T delta = z * (delta - <z, delta>)``, the vector-Jacobian product TorchJD takes by autograd."""
        logits, exp_avg, exp_avg_sq = self.logits, self.logit_exp_avg, self.logit_exp_avg_sq
        if idx is not None:
            logits, exp_avg, exp_avg_sq, delta = logits[idx], exp_avg[idx], exp_avg_sq[idx], delta[idx]
        z = torch.softmax(logits, dim=0)
        grad = z * (delta.to(z.dtype) - torch.dot(z, delta.to(z.dtype)))
        # torch.optim.Adam's single-tensor step (weight decay added to the gradient, as Adam, not AdamW, does).
        beta1, beta2 = self.betas
        step = int(self.logit_steps.add_(1))
        if self.weight_decay:
            grad = grad.add(logits, alpha=self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(self.eps)
        logits.addcdiv_(exp_avg, denom, value=-self.lr / (1 - beta1**step))
        if idx is not None:  # the indexed copies back into the buffers; the other tasks' entries stay as they were
            self.logits[idx] = logits
            self.logit_exp_avg[idx] = exp_avg
            self.logit_exp_avg_sq[idx] = exp_avg_sq


# ----------------------------------------------------------------------------------------------------- DWA
class DWA(Balancer):
    """Dynamic weight average: tasks whose epoch loss decreases slower weigh more.

    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. In epoch ``e`` the weights
    are ``K softmax(r / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)`` the ratio of the task's average losses over
    the two previous epochs (uniform weights, 1 each, in the first two epochs); with absent tasks they are
    renormalised to sum to the number of present tasks.

    The weights come from :class:`torchjd.scalarization.DWA`. Its own per-step accumulation is not used: it averages
    every batch of the epoch, which would count an absent task's 0 as a loss, and keeps its history in plain
    attributes. Instead the per-task averages over the steps where the task was present are kept in buffers (saved
    in checkpoints), and at each epoch's end TorchJD's DWA is given the last two averages and the weights are read
    from it. A task with no labelled step in an epoch repeats its previous average (ratio 1, as if its loss had not
    changed); until a task has two averages its ratio is 1.

    Args:
        temperature: Softmax temperature (the paper's 2); larger is closer to uniform.
    """

    # Buffers registered in bind(), declared for type checkers.
    weights: Tensor
    epoch_sum: Tensor
    epoch_count: Tensor
    history: Tensor
    history_len: Tensor
    known: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"DWA: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        n = len(tasks)
        self.dwa = _scalarization().DWA(self.temperature)
        self.register_buffer("weights", torch.ones(n))  # TorchJD's weights for this epoch (sum n)
        self.register_buffer("epoch_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(n, dtype=torch.long))
        self.register_buffer("history", torch.ones(2, n))  # average losses of the two previous epochs, older first
        self.register_buffer("history_len", torch.zeros((), dtype=torch.long))
        self.register_buffer("known", torch.zeros(n, dtype=torch.bool))  # tasks with a real average in history

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        losses, present = inputs.losses, inputs.present
        with torch.no_grad():
            values = world_mean(losses.detach())
            self.epoch_sum += torch.where(present, values, 0).to(self.epoch_sum.dtype)
            self.epoch_count += present.to(self.epoch_count.dtype)
        weights = self.weights.to(losses.dtype) * present
        weights = weights * present.sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
        return BalanceOutput(loss=(weights * losses).sum(), weights=weights.detach())

    def on_train_epoch_end(self) -> None:
        counts = self.epoch_count
        seen = counts > 0
        if not bool(seen.any()):
            return
        average = (self.epoch_sum / counts.clamp_min(1)).to(self.history.dtype)
        # Tasks without a labelled step repeat their last average (1 if they never had one).
        average = torch.where(seen, average, torch.where(self.known, self.history[1], torch.ones_like(average)))
        # A task's first average is also its "previous" one, so its ratio is 1 until it has two.
        first = seen & ~self.known
        older = torch.where(first, average, self.history[1])
        self.history.copy_(torch.stack([older, average]))
        self.history_len.clamp_(max=1).add_(1)
        self.known |= seen
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.weights.copy_(self._torchjd_weights())

    def _torchjd_weights(self) -> Tensor:
        """TorchJD DWA's weights for the next epoch: its history is the last ``history_len`` epoch averages."""
        dwa = self.dwa
        dwa.reset()
        for average in self.history[2 - int(self.history_len) :]:
            dwa(average)
            dwa.step()
        with torch.enable_grad():
            probe = torch.ones_like(self.weights, requires_grad=True)
            (weights,) = torch.autograd.grad(dwa(probe), probe)  # its output is sum_t w_t probe_t
        dwa.reset()
        if not bool(torch.isfinite(weights).all()):  # an epoch average of exactly 0 makes a ratio infinite
            return torch.ones_like(weights)
        return weights


# ------------------------------------------------------------------------------------------------ GradNorm
class GradNorm(Balancer):
    """GradNorm: learned weights that equalise the tasks' gradient norms, scaled by their relative training rates.

    Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks", ICML 2018. Written here: TorchJD does not have it.

    The model is trained on ``sum_t w_t L_t`` (``w`` detached: this term does not move the weights). The weights are
    a parameter trained by the model's optimizer on the GradNorm loss ``sum_t |w_t G_t - mean_s(w_s G_s) r_t^alpha|``
    alone, with the targets ``mean_s(w_s G_s) r_t^alpha`` held constant, where ``G_t`` is the norm of ``dL_t/dz``
    and ``r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0))`` the task's inverse training rate. The returned loss is the
    sum of both terms.

    ``G_t`` is taken w.r.t. the shared representation ``z`` (the encoder's output), through the heads only, as the
    gradient balancers' representation mode does (the paper uses the last shared layer's weights): no extra encoder
    backward. ``L_t(0)`` is the task's loss at the first step where it is present (saved in checkpoints). After
    every step the weights are kept positive and renormalised to sum to the number of tasks. With absent tasks both
    terms use the present tasks only, and the effective weights are renormalised to sum to their number. Logs
    ``gradnorm/loss`` and ``gradnorm/grad_norm/<task>``.

    Args:
        alpha: Strength of the pull towards equal training rates (1.5, as in LibMTL; 0 asks for equal gradient
            norms).
    """

    # Buffers registered in bind(), declared for type checkers.
    initial_losses: Tensor
    has_initial: Tensor

    def __init__(self, alpha: float = 1.5) -> None:
        super().__init__()
        if alpha < 0:
            raise ConfigError(f"GradNorm: alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        self.task_weights = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))
        self.register_buffer("has_initial", torch.zeros(len(tasks), dtype=torch.bool))

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        losses, present = inputs.losses, inputs.present
        values = world_mean(losses.detach()).to(self.initial_losses.dtype)
        with torch.no_grad():
            first = present & ~self.has_initial
            self.initial_losses.copy_(torch.where(first, values, self.initial_losses))
            self.has_initial |= present
        weights = torch.zeros_like(losses, requires_grad=False)
        absent = _absent_part(losses, present)
        idx = present.nonzero().flatten()
        if idx.numel() == 0:
            return BalanceOutput(loss=absent + _parameter_anchor(self), weights=weights)
        w = self.task_weights[idx]
        # Renormalised over the present tasks, by a constant factor: the value is as if only they existed, and the
        # gradient is the paper's plain one (the factor is 1 when every task is present, as w sums to T).
        w = w * (len(idx) / w.sum()).detach()
        effective = w.detach()
        mine = losses[idx]
        main = (effective.to(mine.dtype) * mine).sum()
        norms = self._gradient_norms(inputs, idx).to(w.dtype)
        weighted = w * norms
        ratio = (values[idx] / self.initial_losses[idx].clamp_min(_EPS)).clamp_min(0)
        rate = ratio / ratio.mean().clamp_min(_EPS)
        target = (weighted.mean() * rate**self.alpha).detach()
        gradnorm_loss = (weighted - target).abs().sum()
        weights[idx] = effective.to(weights.dtype)
        logs = {}
        if inputs.log:
            logs["gradnorm/loss"] = gradnorm_loss.detach()
            all_norms = torch.zeros_like(weights).index_put_((idx,), norms.detach().to(weights.dtype))
            logs.update({f"gradnorm/grad_norm/{n}": all_norms[i] for i, n in enumerate(self.task_names)})
        return BalanceOutput(loss=main + gradnorm_loss.to(main.dtype) + absent, weights=weights, logs=logs)

    def _gradient_norms(self, inputs: BalanceInput, idx: Tensor) -> Tensor:
        """``||dL_t/dz||`` of the present tasks ``(len(idx),)``, detached, over the global batch under DDP."""
        reps = inputs.representations
        names = [self.task_names[i] for i in idx.tolist()]
        if not reps or any(not reps[n].requires_grad for n in names):
            raise ConfigError(
                "GradNorm needs the gradients of the task losses w.r.t. the encoder's output, but the encoder is "
                "frozen (its output does not require grad) or no representation was given. Unfreeze the encoder or "
                "use another loss-weighting balancer (uncertainty, famo, ...)"
            )
        losses = inputs.losses[idx]
        shared = [reps[n] for n in names]
        if all(r is shared[0] for r in shared):
            grads = per_task_gradients(losses, shared[0]).flatten(1)
            squares = grads.float().pow(2).sum(1)
        else:  # one alias per head, or one representation per task (MMoE, ...): one backward gives every row
            squares = torch.stack([g.float().pow(2).sum() for g in per_task_gradients(losses, shared)])
        squares = squares.detach()
        if distributed():
            # Rows of z on different ranks are different variables: the global squared norm is the sum over ranks
            # of the squared norms of the global mean's gradient, a rank's share being its own divided by the world.
            dist.all_reduce(squares)
            squares = squares / dist.get_world_size() ** 2
        return squares.sqrt()

    def on_train_batch_end(self, losses: Tensor) -> None:
        with torch.no_grad():
            w = self.task_weights
            w.clamp_(min=_MIN_GRADNORM_WEIGHT)
            w.mul_(len(w) / w.sum())
