"""Gradient balancers against hand computations: reference values, the z-trick, parameter mode, properties,
missing tasks, telemetry, errors, AMP, stateful methods and the gradient-conflict heatmap callback."""

from __future__ import annotations

import inspect
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchjd.aggregation as tjd
from conftest import without_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtl_lightning.balancers import (
    IMTLG,
    MGDA,
    AlignedMTL,
    BalanceInput,
    CAGrad,
    DualProj,
    EqualWeighting,
    GradDrop,
    GradientBalancer,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from mtl_lightning.balancers.gramians import AutogramGramian
from mtl_lightning.balancers.handover import hand_over
from mtl_lightning.callbacks import GradientConflictHeatmap
from mtl_lightning.callbacks.conflict_heatmap import TAG, cosine_heatmap
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

# cvxpy's note that Nash-MTL's problem is not DPP (re-solves are not faster): TorchJD's formulation, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")

ALL_METHODS = [MGDA, PCGrad, CAGrad, IMTLG, GradVac, AlignedMTL, UPGrad, DualProj, NashMTL, GradDrop]
# TorchJD weightings of the Gramian, to compute the expected weights by hand.
WEIGHTINGS = {
    UPGrad: lambda: tjd.UPGrad().gramian_weighting,
    MGDA: lambda: tjd.MGDA().gramian_weighting,
    PCGrad: lambda: tjd.PCGrad().gramian_weighting,
    IMTLG: lambda: tjd.IMTLG().gramian_weighting,
    DualProj: lambda: tjd.DualProj().gramian_weighting,
    CAGrad: lambda: tjd.CAGrad(c=0.5).gramian_weighting,
    AlignedMTL: lambda: tjd.AlignedMTL().gramian_weighting,
}


def make(cls, names: str = "abc", encoder: nn.Module | None = None, **kwargs):
    balancer = cls(**kwargs)
    balancer.bind([TaskSpec(name=n, kind="regression") for n in names], encoder)
    return balancer


def controlled(balancer, jacobian: torch.Tensor, present=None, log: bool = True, seed: int = 0):
    """Losses ``L_t = <z, J_t>`` on a leaf ``z`` of shape (1, D), so ``dL_t/dz = J_t`` exactly (0 for absent tasks).

    Returns the balancer's output and the gradient that its loss puts on z (the aggregated gradient).
    """
    present = torch.ones(len(jacobian), dtype=torch.bool) if present is None else torch.tensor(present)
    z = torch.randn(1, jacobian.shape[1], generator=torch.Generator().manual_seed(123)).requires_grad_()
    losses = (z @ jacobian.T)[0] * present.float()
    torch.manual_seed(seed)
    out = balancer(BalanceInput(losses, present, dict.fromkeys(balancer.task_names, z), log=log))
    out.loss.backward()
    return out, z.grad[0]


def conflicting(num_tasks: int, dim: int, seed: int) -> torch.Tensor:
    """A random Jacobian whose first two rows conflict (negative inner product)."""
    jac = torch.randn(num_tasks, dim, generator=torch.Generator().manual_seed(seed))
    if jac[0] @ jac[1] > 0:
        jac[1] -= 2 * (jac[0] @ jac[1]) / (jac[0] @ jac[0]) * jac[0]
    return jac


# ---------------------------------------------------------------------------------------- reference values
J_DOC = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def test_upgrad_reference_value_from_torchjd_docs():
    _, grad = controlled(make(UPGrad, "ab"), J_DOC)
    torch.testing.assert_close(grad, torch.tensor([0.2929, 1.9004, 1.9004]), atol=1e-4, rtol=0)


def _mgda_two_tasks(jac: torch.Tensor) -> torch.Tensor:
    """Min-norm point of the segment [g1, g2]: alpha g1 + (1 - alpha) g2, alpha = <g2 - g1, g2> / |g2 - g1|^2."""
    g1, g2 = jac
    alpha = ((g2 - g1) @ g2 / ((g2 - g1) @ (g2 - g1))).clamp(0, 1)
    return torch.stack([alpha, 1 - alpha])


def test_mgda_reference_value_by_hand():
    out, grad = controlled(make(MGDA, "ab"), J_DOC)
    # alpha = <(10,0,0), (6,1,1)> / 100 = 0.6: 0.6 (-4,1,1) + 0.4 (6,1,1) = (0, 1, 1)
    torch.testing.assert_close(out.weights, torch.tensor([0.6, 0.4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_mgda_two_tasks_closed_form(seed):
    jac = conflicting(2, 5, seed)
    out, grad = controlled(make(MGDA, "ab"), jac)
    weights = _mgda_two_tasks(jac)
    torch.testing.assert_close(out.weights, weights, atol=1e-4, rtol=0)
    torch.testing.assert_close(grad, weights @ jac, atol=1e-4, rtol=0)


def test_pcgrad_reference_value_by_hand():
    out, grad = controlled(make(PCGrad, "ab"), J_DOC)
    g1, g2 = J_DOC  # <g1, g2> = -22, |g1|^2 = 18, |g2|^2 = 38
    g1_pc = g1 + 22 / 38 * g2  # g1 projected onto the normal plane of g2
    g2_pc = g2 + 22 / 18 * g1
    torch.testing.assert_close(out.weights, torch.tensor([1 + 22 / 18, 1 + 22 / 38]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, g1_pc + g2_pc, atol=1e-5, rtol=0)
    assert g1_pc @ g2 == pytest.approx(0, abs=1e-5) and g2_pc @ g1 == pytest.approx(0, abs=1e-5)


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    jac = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    out, grad = controlled(make(PCGrad, "ab"), jac)
    torch.testing.assert_close(out.weights, torch.ones(2))
    torch.testing.assert_close(grad, jac.sum(0))


# ------------------------------------------------------------------------- the z-trick on a real little model
class Tiny(nn.Module):
    def __init__(self, names: str = "abc", norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh()] if norm else [nn.Linear(4, 3), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(3, 1) for _ in names])
        self.x = torch.randn(16, 4)
        self.y = torch.randn(16, len(names))

    def losses(self, z):
        reps = z if isinstance(z, dict) else dict.fromkeys(range(len(self.heads)), z)
        return torch.stack(
            [
                F.mse_loss(h(r).squeeze(-1), self.y[:, t])
                for t, (h, r) in enumerate(zip(self.heads, reps.values(), strict=True))
            ]
        )

    def forward(self):
        z = self.encoder(self.x)
        return z, self.losses(z)


def grads_of(loss: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)])


def param_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def by_hand(model: Tiny):
    """Per-task gradients w.r.t. z (flattened) and the encoder's parameters, and each head's expected gradient.

    A head's expected gradient is its own loss's times the heads' scale, 1 / T: what equal weighting gives it.
    """
    z, losses = model()
    enc = list(model.encoder.parameters())
    jz = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses])
    jtheta = torch.stack([grads_of(loss, enc) for loss in losses])
    heads = [grads_of(losses[t], list(h.parameters())) / len(losses) for t, h in enumerate(model.heads)]
    return z, jz, jtheta, heads


def through_balancer(model: Tiny, balancer, seed: int = 0, hand_over: bool = False, aliases: bool | None = None):
    """One step; ``hand_over``: as MultiTaskModule calls it (per-head aliases of z, the heads' parameters given)."""
    model.zero_grad()
    z = model.encoder(model.x)
    aliases = hand_over if aliases is None else aliases
    reps = {n: z.view_as(z) for n in "abc"} if aliases else dict.fromkeys("abc", z)
    losses = model.losses(reps)
    params = list(model.heads.parameters()) if hand_over else []
    torch.manual_seed(seed)
    present = torch.ones(len(losses), dtype=torch.bool)
    out = balancer(BalanceInput(losses, present, reps, shared=z if aliases else None, task_parameters=params))
    out.loss.backward()
    return out


HAND_OVER = pytest.mark.parametrize("hand_over", [False, True], ids=["heads-walked-twice", "heads-handed-over"])


@HAND_OVER
@pytest.mark.parametrize("cls", [UPGrad, MGDA, PCGrad, IMTLG, DualProj, CAGrad, AlignedMTL])
def test_representation_mode_equals_direct_computation(cls, hand_over):
    model = Tiny()
    _, jz, jtheta, head_grads = by_hand(model)
    torch.manual_seed(0)
    weights = WEIGHTINGS[cls]()(jz @ jz.T)
    out = through_balancer(model, make(cls), seed=0, hand_over=hand_over)
    torch.testing.assert_close(out.weights, weights, atol=1e-5, rtol=1e-4)
    # the encoder receives the aggregated update, sum_t w_t dL_t/dθ (chain rule through z) ...
    torch.testing.assert_close(param_grad(model.encoder.parameters()), weights @ jtheta, atol=1e-6, rtol=1e-4)
    # ... and every head the gradient of its own loss alone
    for head, expected in zip(model.heads, head_grads, strict=True):
        torch.testing.assert_close(param_grad(head.parameters()), expected, atol=1e-7, rtol=1e-5)
    # the returned value is the weighted loss
    _, losses = model()
    # the value is the weighted mean (comparable across methods); the gradient uses the raw weights
    assert float(out.loss.detach()) == pytest.approx(float(weights @ losses.detach() / weights.sum()), rel=1e-5)


@HAND_OVER
def test_graddrop_encoder_gets_graddrop_of_the_jacobian_on_z(hand_over):
    model = Tiny()
    z, jz, _, head_grads = by_hand(model)
    torch.manual_seed(5)
    aggregated = tjd.GradDrop()(jz)
    expected = grads_of((z * aggregated.reshape(z.shape)).sum(), list(model.encoder.parameters()))
    through_balancer(model, make(GradDrop), seed=5, hand_over=hand_over)
    torch.testing.assert_close(param_grad(model.encoder.parameters()), expected, atol=1e-6, rtol=1e-4)
    for head, expected_head in zip(model.heads, head_grads, strict=True):
        torch.testing.assert_close(param_grad(head.parameters()), expected_head, atol=1e-7, rtol=1e-5)


# -------------------------------------------------------------------------------------------- parameter mode
def spy_gramians(balancer) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    weigh = balancer._weigh

    def recording(gramian, idx):
        seen.append(gramian.clone())
        return weigh(gramian, idx)

    balancer._weigh = recording
    return seen


def separate_jacobian(losses: torch.Tensor, params) -> torch.Tensor:
    """(T, P): one ``torch.autograd.grad`` per task, the reference for every parameter-mode Gramian."""
    params = list(params)
    return torch.stack([grads_of(loss, params) for loss in losses])


def hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


GRAMIANS = ["batched", "autogram"]


@pytest.mark.parametrize("gramian", GRAMIANS)
@pytest.mark.parametrize(
    ("aliases", "hand_over"), [(False, False), (True, False), (True, True)], ids=["one-z", "aliases", "handed-over"]
)
@pytest.mark.parametrize("cls", [UPGrad, MGDA])
def test_parameter_mode_gramian_and_update_are_exact(cls, aliases, hand_over, gramian):
    model = Tiny()
    _, _, jtheta, head_grads = by_hand(model)
    # autogram hooks the encoder at bind: every forward after it must reach the balancer. batched hooks nothing.
    balancer = make(cls, encoder=model.encoder, mode="parameter", gramian=gramian)
    assert hooked(model.encoder) == (gramian == "autogram") and isinstance(balancer.backend, AutogramGramian) == (
        gramian == "autogram"
    )
    gramians = spy_gramians(balancer)
    model.zero_grad()
    z = model.encoder(model.x)
    # aliases: what MultiTaskModule.representations() passes under hard sharing (one view of z per head)
    reps = {n: z.view_as(z) for n in "abc"} if aliases else dict.fromkeys("abc", z)
    losses = model.losses(reps)
    reference = separate_jacobian(losses, model.encoder.parameters())
    torch.testing.assert_close(reference, jtheta)
    params = list(model.heads.parameters()) if hand_over else []
    present = torch.ones(3, dtype=torch.bool)
    out = balancer(BalanceInput(losses, present, reps, shared=z if aliases else None, task_parameters=params))
    out.loss.backward()
    gramian_ = jtheta @ jtheta.T
    torch.testing.assert_close(gramians[0], gramian_, atol=1e-7, rtol=1e-5)
    weights = WEIGHTINGS[cls]()(gramian_)
    torch.testing.assert_close(out.weights, weights, atol=1e-5, rtol=1e-4)
    # the encoder's gradient after the step is TorchJD's aggregator applied to the per-task parameter gradients
    aggregator = tjd.UPGrad() if cls is UPGrad else tjd.MGDA()
    torch.testing.assert_close(param_grad(model.encoder.parameters()), aggregator(jtheta), atol=1e-6, rtol=1e-4)
    for head, expected in zip(model.heads, head_grads, strict=True):
        torch.testing.assert_close(param_grad(head.parameters()), expected, atol=1e-7, rtol=1e-5)
    norms = torch.stack([out.logs[f"grad_norm/{n}"] for n in "abc"])
    torch.testing.assert_close(norms, jtheta.norm(dim=1), atol=1e-6, rtol=1e-4)


def test_batched_gramian_of_a_wider_encoder_matches_separate_backwards():
    # More parameters and tasks than Tiny, several parameter tensors: sum_p J_p J_p^T = J J^T to float32 rounding.
    torch.manual_seed(3)
    encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(6)])
    x, y = torch.randn(64, 8), torch.randn(64, 6, 2)
    balancer = make(UPGrad, "abcdef", encoder=encoder, mode="parameter")
    gramians = spy_gramians(balancer)
    z = encoder(x)
    reps = {n: z.view_as(z) for n in "abcdef"}
    losses = torch.stack(
        [F.mse_loss(h(reps[n]), y[:, t]) for t, (n, h) in enumerate(zip("abcdef", heads, strict=True))]
    )
    jtheta = separate_jacobian(losses, encoder.parameters()).double()
    out = balancer(BalanceInput(losses, torch.ones(6, dtype=torch.bool), reps, shared=z))
    out.loss.backward()
    expected = (jtheta @ jtheta.T).float()
    torch.testing.assert_close(gramians[0], expected, atol=0, rtol=1e-5)
    torch.testing.assert_close(param_grad(encoder.parameters()), tjd.UPGrad()(jtheta.float()), atol=1e-6, rtol=1e-4)


def test_batched_gramian_falls_back_to_one_backward_per_task(monkeypatch):
    # Graphs with an op that has no batching rule: the same Gramian from T ordinary backward passes.
    model = Tiny()
    _, _, jtheta, _ = by_hand(model)
    balancer = make(UPGrad, encoder=model.encoder, mode="parameter")
    gramians = spy_gramians(balancer)
    grad, refused = torch.autograd.grad, []

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(args[1])
            raise RuntimeError("vmap: no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    through_balancer(model, balancer)
    assert any(isinstance(inputs, list) and inputs[0] is model.encoder[0].weight for inputs in refused)
    torch.testing.assert_close(gramians[0], jtheta @ jtheta.T, atol=1e-7, rtol=1e-5)


def test_parameter_mode_ignores_parameters_frozen_after_bind():
    model = Tiny()
    balancer = make(UPGrad, encoder=model.encoder, mode="parameter")
    model.encoder[0].bias.requires_grad_(False)
    gramians = spy_gramians(balancer)
    z, losses = model()
    jtheta = separate_jacobian(losses, [model.encoder[0].weight])
    balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))
    torch.testing.assert_close(gramians[0], jtheta @ jtheta.T, atol=1e-7, rtol=1e-5)


class PerTaskEncoder(nn.Module):
    """A shared layer and one tower per task: returns ``{task: z_t}`` (no single shared representation)."""

    def __init__(self, names: str = "abc"):
        super().__init__()
        torch.manual_seed(1)
        self.shared = nn.Linear(4, 3)
        self.towers = nn.ModuleDict({n: nn.Linear(3, 3) for n in names})

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        return {n: torch.tanh(t(h)) for n, t in self.towers.items()}


class TinyMMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, one softmax gate per task, ``{task: sum_e gate_te expert_e}``.

    Task ``c`` reads task ``b``'s mixture (two tasks on one tensor) and task ``a``'s is wider (shapes differ).
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.experts = nn.ModuleList([nn.Linear(4, 3) for _ in range(2)])
        self.gates = nn.ModuleDict({n: nn.Linear(4, 2) for n in "ab"})
        self.widen = nn.Linear(3, 5)

    def forward(self, x):
        experts = torch.stack([torch.tanh(e(x)) for e in self.experts], dim=1)  # (N, E, 3)
        mix = {n: (torch.softmax(g(x), -1)[..., None] * experts).sum(1) for n, g in self.gates.items()}
        return {"a": self.widen(mix["a"]), "b": mix["b"], "c": mix["b"]}


def per_task_losses(reps, heads, y):
    return torch.stack([F.mse_loss(heads[n](r).sum(-1), y[:, t]) for t, (n, r) in enumerate(reps.items())])


@HAND_OVER
@pytest.mark.parametrize("gramian", GRAMIANS)
@pytest.mark.parametrize("encoder_cls", [PerTaskEncoder, TinyMMoE])
def test_per_task_representations_work_in_parameter_mode(encoder_cls, gramian, hand_over):
    encoder = encoder_cls()
    heads = nn.ModuleDict({"a": nn.Linear(5 if encoder_cls is TinyMMoE else 3, 1), "b": nn.Linear(3, 1)})
    heads["c"] = nn.Linear(3, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    balancer = make(UPGrad, encoder=encoder, mode="parameter", gramian=gramian)
    gramians = spy_gramians(balancer)
    enc = list(encoder.parameters())
    reps = encoder(x)
    losses = per_task_losses(reps, heads, y)
    jtheta = separate_jacobian(losses, enc)
    head_grads = [grads_of(losses[t], list(heads[n].parameters())) / 3 for t, n in enumerate("abc")]  # 1 / T
    # TinyMMoE's tasks b and c read one tensor: the heads are then walked again, whatever is given
    params = list(heads.parameters()) if hand_over else []
    out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), reps, task_parameters=params))
    assert balancer._hand_over is (True if hand_over and encoder_cls is PerTaskEncoder else None)
    out.loss.backward()
    torch.testing.assert_close(gramians[0], jtheta @ jtheta.T, atol=1e-7, rtol=1e-5)
    weights = WEIGHTINGS[UPGrad]()(jtheta @ jtheta.T)
    torch.testing.assert_close(out.weights, weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(param_grad(enc), tjd.UPGrad()(jtheta), atol=1e-6, rtol=1e-4)
    for n, expected in zip("abc", head_grads, strict=True):
        torch.testing.assert_close(param_grad(heads[n].parameters()), expected, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------ the heads' gradients handed over
def walks(model: Tiny, balancer, hand_over: bool) -> tuple[int, int]:
    """How many backward passes go through head 0, and through the encoder's output, in one step."""
    counts = [0, 0]

    def watch(index: int):
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            out.register_hook(lambda grad: counts.__setitem__(index, counts[index] + 1))

        return hook

    hooks = [model.heads[0].register_forward_hook(watch(0)), model.encoder.register_forward_hook(watch(1))]
    try:
        through_balancer(model, balancer, hand_over=hand_over, aliases=True)
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], counts[1]


@pytest.mark.parametrize(
    ("mode", "gramian", "before", "after"),
    [
        # representation mode: the heads once for the per-task gradients, once in Lightning's backward; the encoder
        # once. Handed over, the heads are walked once.
        ("representation", "batched", (2, 1), (1, 1)),
        # parameter mode also walks the encoder for the Gramian; handed over, its update needs no second walk
        ("parameter", "batched", (2, 2), (1, 1)),
        # TorchJD's autogram engine gives the Gramian only: the encoder's update still comes from a backward
        ("parameter", "autogram", (2, 2), (1, 2)),
    ],
)
def test_handed_over_gradients_save_backward_walks(mode, gramian, before, after):
    model = Tiny()
    make_one = lambda: make(IMTLG, encoder=model.encoder, mode=mode, gramian=gramian)  # noqa: E731
    assert walks(model, make_one(), hand_over=False) == before
    assert walks(model, make_one(), hand_over=True) == after


def test_a_tensor_outside_the_encoder_keeps_the_encoder_in_the_final_backward():
    """Parameter mode: a trainable tensor between the encoder and z gets its weighted gradient through z."""
    model = Tiny()
    scale = nn.Parameter(torch.tensor([0.5, 2.0, -1.0]))
    balancer = make(UPGrad, encoder=model.encoder, mode="parameter")
    z = model.encoder(model.x) * scale
    reps = {n: z.view_as(z) for n in "abc"}
    losses = model.losses(reps)
    jtheta = separate_jacobian(losses, model.encoder.parameters())
    jscale = separate_jacobian(losses, [scale])
    params = list(model.heads.parameters())
    out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), reps, shared=z, task_parameters=params))
    out.loss.backward()
    assert balancer._hand_over is True and balancer._encoder_hand_over is False
    weights = WEIGHTINGS[UPGrad]()(jtheta @ jtheta.T)
    torch.testing.assert_close(param_grad(model.encoder.parameters()), weights @ jtheta, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(scale.grad, weights @ jscale, atol=1e-6, rtol=1e-4)


@HAND_OVER
@pytest.mark.parametrize("mode", ["representation", "parameter"])
def test_the_gramian_is_all_reduced_under_ddp_in_every_path(monkeypatch, mode, hand_over):
    """Two ranks simulated: the T x T Gramian (never the gradients) is all-reduced and divided by world²."""
    import mtl_lightning.balancers.gradient as gradient

    reduced: list[torch.Tensor] = []

    def all_reduce(tensor: torch.Tensor) -> None:
        reduced.append(tensor.clone())
        tensor.mul_(2)  # the other rank holds the same Gramian

    fake = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        get_world_size=lambda: 2,
        all_reduce=all_reduce,
        broadcast=lambda tensor, src: None,
    )
    monkeypatch.setattr(gradient, "dist", fake)
    model = Tiny()
    _, jz, jtheta, _ = by_hand(model)
    seen = spy_gramians(balancer := make(IMTLG, encoder=model.encoder, mode=mode))
    through_balancer(model, balancer, hand_over=hand_over, aliases=True)
    jacobian = jz if mode == "representation" else jtheta
    assert len(reduced) == 1
    torch.testing.assert_close(reduced[0], jacobian @ jacobian.T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen[0], jacobian @ jacobian.T / 2, atol=1e-6, rtol=1e-5)


def test_a_parameter_missing_from_the_hand_over_falls_back_with_a_warning():
    model = Tiny()
    _, jz, jtheta, head_grads = by_hand(model)
    balancer = make(UPGrad)
    model.zero_grad()
    z = model.encoder(model.x)
    reps = {n: z.view_as(z) for n in "abc"}
    losses = model.losses(reps)
    given = [*model.heads[0].parameters(), *model.heads[1].parameters()]  # head 2 forgotten
    with pytest.warns(UserWarning, match=r"not among the heads' parameters \(shapes \(1, 3\), \(1,\)\)"):
        out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), reps, shared=z, task_parameters=given))
    out.loss.backward()
    assert balancer._hand_over is False
    expected = WEIGHTINGS[UPGrad]()(jz @ jz.T) @ jtheta
    torch.testing.assert_close(param_grad(model.encoder.parameters()), expected, atol=1e-6, rtol=1e-4)
    for head, expected in zip(model.heads, head_grads, strict=True):
        torch.testing.assert_close(param_grad(head.parameters()), expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "handed"), [(torch.bfloat16, True), (torch.float16, False)])
def test_float16_autocast_keeps_the_heads_in_the_scaled_backward(dtype, handed):
    model = Tiny()
    z = model.encoder(model.x)
    reps = {n: z.view_as(z) for n in "abc"}
    inputs = BalanceInput(
        model.losses(reps),
        torch.ones(3, dtype=torch.bool),
        reps,
        shared=z,
        task_parameters=list(model.heads.parameters()),
    )
    with torch.autocast("cpu", dtype=dtype):
        assert bool(make(UPGrad)._handed_over_parameters(inputs, list(reps.values()))) is handed


def test_hand_over_scales_with_the_incoming_gradient():
    z = torch.randn(3, requires_grad=True)
    half = torch.randn(2, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, requires_grad=True)
    loss = hand_over([z, half, w], [torch.ones(3), torch.full((2,), 0.5), None])
    assert float(loss.detach()) == 0.0
    (loss * 4.0).backward()  # e.g. an AMP loss scale, or 1 / accumulate_grad_batches
    torch.testing.assert_close(z.grad, torch.full((3,), 4.0))
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad, torch.full((2,), 2.0, dtype=torch.bfloat16))
    assert w.grad is None


@pytest.mark.parametrize(
    ("cls", "mode"), [(IMTLG, "representation"), (IMTLG, "parameter"), (GradDrop, "representation")]
)
def test_module_step_gives_the_same_gradients_with_the_heads_handed_over(cls, mode):
    """MultiTaskModule hands its heads' parameters over; every gradient equals the two-walk computation's."""
    from mtl_lightning.encoders.mlp import MLPEncoder
    from mtl_lightning.module import MultiTaskModule

    specs = [
        TaskSpec("a", "binary"),
        TaskSpec("b", "regression"),
        TaskSpec("c", "multiclass", num_outputs=3, head_hidden=[4]),
    ]
    gen = torch.Generator().manual_seed(0)
    batch = {
        "inputs": torch.randn(12, 5, generator=gen),
        "targets": {
            "a": torch.randint(0, 2, (12,), generator=gen).float(),
            "b": torch.randn(12, generator=gen),
            "c": torch.randint(0, 3, (12,), generator=gen),
        },
    }
    grads = []
    for hand in (True, False):
        torch.manual_seed(0)
        model = MultiTaskModule(
            MLPEncoder((5,), hidden=[8, 6]), specs, balancer=cls(mode=mode) if mode == "parameter" else cls()
        )
        without_trainer(model)
        frozen = next(p for n, p in model.named_parameters() if n.startswith("heads.b") and n.endswith("bias"))
        frozen.requires_grad_(False)  # a partly frozen head: its frozen tensor is neither handed over nor updated
        if not hand:
            model._task_parameters = lambda: []  # type: ignore[method-assign]
        torch.manual_seed(1)  # GradDrop's random mask
        model.training_step(batch, 0).backward()
        assert model.balancer._hand_over is (True if hand else None)
        assert model.balancer._encoder_hand_over is (True if hand and mode == "parameter" else None)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("heads.b") for n in grads[0])
    assert not any(n.startswith("heads.b") and n.endswith("bias") for n in grads[0])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5, msg=name)


def test_per_task_representations_need_parameter_mode():
    model = Tiny()
    model.encoder = PerTaskEncoder()
    reps = model.encoder(model.x)
    with pytest.raises(ConfigError, match=r"one representation per task.*mode: parameter"):
        make(UPGrad)(BalanceInput(model.losses(reps), torch.ones(3, dtype=torch.bool), reps))


@pytest.mark.parametrize("gramian", GRAMIANS)
def test_parameter_mode_with_an_absent_task(gramian):
    model = Tiny()
    balancer = make(UPGrad, encoder=model.encoder, mode="parameter", gramian=gramian)
    z, losses = model()
    losses = losses * torch.tensor([1.0, 0.0, 1.0])
    out = balancer(BalanceInput(losses, torch.tensor([True, False, True]), dict.fromkeys("abc", z)))
    out.loss.backward()
    assert out.weights[1] == 0 and torch.isfinite(out.weights).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -------------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("seed", range(5))
def test_update_conflicts_with_no_task(cls, seed):
    jac = conflicting(4, 6, seed)
    _, grad = controlled(make(cls, "abcd"), jac)
    # TorchJD regularises the QP (reg_eps = 1e-4 on the normalised Gramian), so "non-conflicting" holds up to a
    # relative 1e-3 or so, not to 1e-6; the mean gradient, by contrast, conflicts outright on these cases.
    cosines = (jac @ grad) / (jac.norm(dim=1) * grad.norm())
    assert cosines.min() >= -5e-3, cosines


def test_the_mean_gradient_does_conflict_on_those_cases():
    jacs = [conflicting(4, 6, seed) for seed in range(5)]
    worst = min(float(((j @ j.mean(0)) / (j.norm(dim=1) * j.mean(0).norm())).min()) for j in jacs)
    assert worst < -0.05


@pytest.mark.parametrize(
    ("cls", "tasks"), [(UPGrad, 3), (MGDA, 3), (IMTLG, 3), (DualProj, 3), (PCGrad, 2)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("seed", range(3))
def test_permuting_tasks_permutes_weights(cls, tasks, seed):
    names = "abc"[:tasks]
    jac = conflicting(tasks, 5, seed)
    perm = torch.randperm(tasks, generator=torch.Generator().manual_seed(seed + 1))
    if tasks == 2:
        perm = torch.tensor([1, 0])
    out, grad = controlled(make(cls, names), jac)
    out_p, grad_p = controlled(make(cls, names), jac[perm])
    torch.testing.assert_close(out_p.weights, out.weights[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_p, grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", [UPGrad, MGDA, IMTLG, DualProj, PCGrad, CAGrad, AlignedMTL])
@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_weights_are_invariant_to_scaling_all_gradients(cls, scale):
    # True of these methods (TorchJD normalises the Gramian before solving): the weights do not change and the
    # update scales with the gradients.
    jac = conflicting(3, 5, 0)
    out, grad = controlled(make(cls), jac)
    out_s, grad_s = controlled(make(cls), scale * jac)
    torch.testing.assert_close(out_s.weights, out.weights, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_s, scale * grad, atol=1e-4 * scale, rtol=1e-4)


def test_mgda_weights_lie_on_the_simplex_and_upgrad_weights_are_at_least_the_mean():
    jac = conflicting(4, 6, 3)
    out, _ = controlled(make(MGDA, "abcd"), jac)
    assert (out.weights >= -1e-6).all() and float(out.weights.sum()) == pytest.approx(1, abs=1e-4)
    out, _ = controlled(make(UPGrad, "abcd"), jac)
    assert (out.weights >= 1 / 4 - 1e-4).all()  # each projected row keeps at least its own 1/T share


# ----------------------------------------------------------------------------------------------- missing tasks
@pytest.mark.parametrize("cls", ALL_METHODS, ids=lambda c: c.__name__)
def test_absent_task_gets_zero_weight_and_equals_the_present_tasks_alone(cls):
    jac = conflicting(3, 5, 2)
    out, grad = controlled(make(cls), jac, present=[True, False, True], seed=7)
    assert out.weights[1] == 0
    assert torch.isfinite(out.weights).all() and torch.isfinite(grad).all() and torch.isfinite(out.loss)
    out2, grad2 = controlled(make(cls, "ac"), jac[[0, 2]], seed=7)
    torch.testing.assert_close(out.weights[[0, 2]], out2.weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, grad2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", ALL_METHODS, ids=lambda c: c.__name__)
def test_all_tasks_absent_gives_a_finite_zero_loss(cls):
    out, grad = controlled(make(cls), conflicting(3, 5, 0), present=[False, False, False])
    assert float(out.loss.detach()) == 0 and torch.equal(out.weights, torch.zeros(3))
    assert torch.equal(grad, torch.zeros(5))
    assert all(torch.isfinite(v).all() for v in out.logs.values())


# --------------------------------------------------------------------------------------------------- telemetry
def test_telemetry_matches_hand_computation():
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 1.0, 0.0]])
    balancer = make(UPGrad)
    out, _ = controlled(balancer, jac)
    logs = {k: float(v) for k, v in out.logs.items()}
    assert logs["grad_norm/a"] == pytest.approx(1) and logs["grad_norm/b"] == pytest.approx(2)
    assert logs["grad_norm/c"] == pytest.approx(math.sqrt(2))
    assert logs["cosine/a/b"] == pytest.approx(0, abs=1e-7)
    assert logs["cosine/a/c"] == pytest.approx(-1 / math.sqrt(2))
    assert logs["cosine/b/c"] == pytest.approx(1 / math.sqrt(2))
    assert logs["conflict_fraction"] == pytest.approx(1 / 3)  # only (a, c); a cosine of 0 is no conflict
    unit = jac / jac.norm(dim=1, keepdim=True)
    torch.testing.assert_close(balancer.last_cosine, unit @ unit.T)


def test_telemetry_ignores_absent_tasks_in_the_conflict_fraction():
    jac = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    out, _ = controlled(make(UPGrad), jac, present=[True, False, True])
    assert float(out.logs["grad_norm/b"]) == 0 and float(out.logs["cosine/a/b"]) == 0
    assert float(out.logs["conflict_fraction"]) == 0  # the one pair left, (a, c), agrees


def test_no_telemetry_when_the_step_is_not_logged():
    balancer = make(MGDA)
    out, _ = controlled(balancer, J_DOC[[0, 1, 1]], log=False)
    assert out.logs == {} and balancer.last_cosine is None
    quiet = make(MGDA, telemetry=False)
    out, _ = controlled(quiet, J_DOC[[0, 1, 1]])
    assert out.logs == {} and quiet.last_cosine is None


def test_graddrop_skips_its_effective_weights_on_steps_not_logged():
    # The least-squares "effective weights" only feed the logs; the update is the same either way.
    jac = conflicting(3, 5, 0)
    logged, grad = controlled(make(GradDrop), jac, seed=4)
    quiet, grad_quiet = controlled(make(GradDrop), jac, log=False, seed=4)
    torch.testing.assert_close(grad_quiet, grad)
    assert not torch.equal(logged.weights, torch.ones(3)) and torch.equal(quiet.weights, torch.ones(3))
    quiet, _ = controlled(make(GradDrop), jac, present=[True, False, True], log=False, seed=4)
    assert torch.equal(quiet.weights, torch.tensor([1.0, 0.0, 1.0])) and quiet.logs == {}


# ------------------------------------------------------------------------------------------------------ errors
def test_frozen_encoder_is_a_clear_error():
    model = Tiny()
    model.encoder.requires_grad_(False)
    z, losses = model()
    with pytest.raises(ConfigError, match="frozen"):
        make(UPGrad)(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))


@pytest.mark.parametrize("encoder", [None, nn.Identity(), nn.Linear(2, 2).requires_grad_(False)])
def test_parameter_mode_needs_a_trainable_encoder(encoder):
    with pytest.raises(ConfigError, match=r"mode='parameter'.*trainable parameters"):
        make(UPGrad, encoder=encoder, mode="parameter")


def test_jacobian_aggregators_have_no_parameter_mode():
    assert "mode" not in inspect.signature(GradDrop).parameters
    with pytest.raises(TypeError):
        GradDrop(mode="parameter")
    # NashMTL's TorchJD side aggregates the Jacobian (its default impl: fast weighs the Gramian, tests/test_fast_nash.py)
    with pytest.raises(ConfigError, match="no parameter mode"):
        NashMTL(mode="parameter", impl="torchjd")

    class ParameterGradDrop(GradientBalancer):
        def make_aggregator(self, num_tasks):
            return tjd.GradDrop()

    with pytest.raises(ConfigError, match="no parameter mode"):
        make(ParameterGradDrop, encoder=nn.Linear(2, 2), mode="parameter")


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ConfigError, match="mode must be 'representation' or 'parameter'"):
        UPGrad(mode="params")
    with pytest.raises(ConfigError, match="gramian must be 'batched' or 'autogram'"):
        UPGrad(mode="parameter", gramian="jacobian")


# ------------------------------------------------------------------------------------- mixed precision (AMP)
def test_gramian_is_float32_under_autocast():
    model = Tiny()
    balancer = make(UPGrad)
    gramians = spy_gramians(balancer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, losses = model()
        jz = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].flatten().float() for loss in losses])
        balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))
    assert z.dtype == torch.bfloat16 and gramians[0].dtype == torch.float32
    torch.testing.assert_close(gramians[0], jz @ jz.T)  # exactly the float32 product, no bf16 rounding


@pytest.mark.parametrize("gramian", GRAMIANS)
def test_parameter_mode_under_autocast_with_layer_norm(gramian):
    # batched: one T-batched backward through the bf16 graph. autogram: TorchJD's engine fails on graphs recorded
    # under autocast, so the balancer materialises J_θ with one backward per task instead.
    model = Tiny(norm=True)
    balancer = make(UPGrad, encoder=model.encoder, mode="parameter", gramian=gramian)
    gramians = spy_gramians(balancer)
    enc = list(model.encoder.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, losses = model()
        jtheta = torch.stack([grads_of(loss, enc).float() for loss in losses])
        out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))
    out.loss.backward()
    torch.testing.assert_close(gramians[0], jtheta @ jtheta.T)
    weights = WEIGHTINGS[UPGrad]()(jtheta @ jtheta.T)
    torch.testing.assert_close(out.weights, weights)
    # The update reaches the encoder through the bf16 representation, as the sum of the task gradients plus a
    # correction, so it carries bf16 rounding (relative 2^-8 of the summed gradient), not float32 exactness.
    expected = weights @ jtheta
    assert (param_grad(enc) - expected).norm() <= 0.02 * expected.norm()


@pytest.mark.parametrize("cls", [NashMTL, GradDrop, CAGrad])
def test_solver_methods_run_under_autocast(cls):
    model = Tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, losses = model()
        out = make(cls)(BalanceInput(losses, torch.ones(3, dtype=torch.bool), dict.fromkeys("abc", z)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.encoder.parameters())


# -------------------------------------------------------------------------------------------- stateful methods
def test_gradvac_keeps_its_ema_across_steps_like_torchjd():
    jacs = [conflicting(3, 5, s) for s in range(3)]
    balancer, reference = make(GradVac), tjd.GradVac(beta=0.5)
    for step, jac in enumerate(jacs):
        out, _ = controlled(balancer, jac, seed=step)
        torch.manual_seed(step)
        expected = reference.gramian_weighting(jac @ jac.T)
        torch.testing.assert_close(out.weights, expected, atol=1e-5, rtol=1e-4)


def test_gradvac_state_is_checkpointed_and_restored():
    balancer = make(GradVac)
    controlled(balancer, conflicting(3, 5, 0))
    state = balancer.state_dict()
    assert state["cosine_targets"].abs().sum() > 0
    restored = make(GradVac)
    restored.load_state_dict(state)  # strict: the state exists before the first step
    out, _ = controlled(balancer, conflicting(3, 5, 1), seed=3)
    out_r, _ = controlled(restored, conflicting(3, 5, 1), seed=3)
    torch.testing.assert_close(out_r.weights, out.weights)


def test_gradvac_keeps_other_pairs_state_while_a_task_is_absent():
    balancer = make(GradVac)
    controlled(balancer, conflicting(3, 5, 0))
    before = balancer.cosine_targets.clone()
    controlled(balancer, conflicting(3, 5, 1), present=[True, False, True])
    after = balancer.cosine_targets
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(after[:, 1], before[:, 1])
    assert not torch.equal(after[0, 2], before[0, 2])


def test_nash_mtl_alternating_present_sets():
    balancer = make(NashMTL)
    for present in ([True, True, True], [True, False, True], [True, True, True], [False, True, True]):
        out, grad = controlled(balancer, conflicting(3, 5, 0), present=present)
        assert torch.isfinite(grad).all() and (out.weights[~torch.tensor(present)] == 0).all()


# ------------------------------------------------------------------------------------------------- the heatmap
def test_cosine_heatmap_colours():
    image = cosine_heatmap(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), cell=4)
    assert image.shape == (8, 8, 3) and image.dtype == torch.uint8
    assert image[0, 0].tolist() == [255, 0, 0]  # +1: red
    assert image[0, 4].tolist() == [0, 0, 255]  # -1: blue
    assert image[4, 0].tolist() == [255, 255, 255]  # 0: white
    assert image[4, 4].tolist() == [255, 128, 128]  # +0.5: light red
    assert torch.equal(image[:4, :4], image[0, 0].expand(4, 4, 3))  # each cell is a flat square


def test_heatmap_callback_writes_images_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="heat")
    balancer = make(UPGrad)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, loggers=[logger])
    module = SimpleNamespace(balancer=balancer)
    callback = GradientConflictHeatmap(every_n_steps=10)

    def step(at: int, new_matrix: bool) -> None:
        if new_matrix:
            controlled(balancer, conflicting(3, 5, at))
        trainer.global_step = at
        callback.on_train_batch_end(trainer, module, None, None, at)

    step(0, False)  # no telemetry yet: nothing to draw
    step(1, True)  # written
    step(5, True)  # too soon
    step(11, False)  # the latest matrix (from step 5) is written
    step(15, False)  # same matrix, too soon anyway
    step(30, False)  # nothing new since the last image
    step(31, True)  # written
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == [TAG]
    images = events.Images(TAG)
    assert [im.step for im in images] == [1, 11, 31]
    assert (images[0].width, images[0].height) == (72, 72)  # 3 tasks x 24 pixels


def test_heatmap_callback_is_silent_off_rank_zero_and_with_loss_weighting(tmp_path):
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="heat")
    balancer = make(UPGrad)
    controlled(balancer, conflicting(3, 5, 0))
    callback = GradientConflictHeatmap(every_n_steps=1)
    other_rank = SimpleNamespace(is_global_zero=False, global_step=1, loggers=[logger])
    callback.on_train_batch_end(other_rank, SimpleNamespace(balancer=balancer), None, None, 0)
    rank_zero = SimpleNamespace(is_global_zero=True, global_step=2, loggers=[logger])
    callback.on_train_batch_end(rank_zero, SimpleNamespace(balancer=make(EqualWeighting)), None, None, 0)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == []
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientConflictHeatmap(every_n_steps=0)


def test_balancing_benchmark_times_the_hand_over_against_the_second_walk(monkeypatch):
    """benchmarks/balancing.py on a tiny model: every side runs, and each gradient method has its two-walk twin."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "balancing.py"
    spec = importlib.util.spec_from_file_location("balancing_benchmark", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    argv = ["--tasks", "3", "--methods", "IMTLG", "--repeats", "2", "--min-time", "0", "--min-steps", "1"]
    argv += ["--features", "6", "--hidden", "8", "--batch-size", "8", "--threads", str(torch.get_num_threads())]
    table = bench.main([*argv, "--walk-heads-twice"])
    expected = {"EqualWeighting", "IMTLG", "IMTLG (parameter)", "IMTLG (heads walked twice)"}
    assert expected | {"IMTLG (parameter) (heads walked twice)"} <= set(table)
    assert all(math.isfinite(row[3]["ratio"]) and row[3]["ms"] > 0 for row in table.values())
