"""The gradient engine's three parts on their own (source, Gramian backend, delivery), the heads' scale and the
one-task pass-through. Every combination of them through a balancer is covered by test_gradient_balancers.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import without_trainer

from mtl_lightning.balancers import MGDA, BalanceInput, EqualWeighting, PCGrad, UPGrad
from mtl_lightning.balancers.delivery import hand_over, head_scale, surrogate
from mtl_lightning.balancers.gradient_sources import task_gradients
from mtl_lightning.balancers.gramians import AutogramGramian, BatchedParameterGramian, RepresentationGramian
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

NAMES = "abc"


def setup(seed: int = 0):
    """An encoder, three linear heads and their MSE losses on aliases of the shared ``z`` (as the module does)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in NAMES])
    x, y = torch.randn(16, 4), torch.randn(16, len(NAMES))
    z = encoder(x)
    reps = [z.view_as(z) for _ in NAMES]
    losses = torch.stack(
        [F.mse_loss(h(r).squeeze(-1), y[:, t]) for t, (h, r) in enumerate(zip(heads, reps, strict=True))]
    )
    return encoder, heads, z, reps, losses


def rows(losses: torch.Tensor, wrt: list[torch.Tensor]) -> torch.Tensor:
    """(T, P): one ordinary backward per task, the reference."""
    out = []
    for loss in losses:
        grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        out.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(wrt, grads, strict=True)])
        )
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ the source
@pytest.mark.parametrize("with_params", [False, True])
def test_source_gives_each_tasks_gradient_on_z_and_the_heads_gradients(with_params):
    _, heads, z, reps, losses = setup()
    expected = rows(losses, [z])
    params = list(heads.parameters()) if with_params else []
    expected_params = torch.autograd.grad(losses.sum(), params, retain_graph=True) if with_params else ()
    grads = task_gradients(losses, reps, z, params)
    assert grads.flat is not None and grads.flat.shape == (3, z.numel()) and grads.flat.dtype == torch.float32
    torch.testing.assert_close(grads.flat, expected)
    assert grads.stacked is not None and grads.stacked.shape == (3, *z.shape)
    assert len(grads.param_grads) == len(params)
    for got, want in zip(grads.param_grads, expected_params, strict=True):
        torch.testing.assert_close(got, want)


def test_source_with_one_representation_per_task():
    torch.manual_seed(0)
    reps = [torch.randn(6, 3, requires_grad=True), torch.randn(6, 2, requires_grad=True)]
    losses = torch.stack([(reps[0] ** 2).sum(), reps[1].sin().sum()])
    grads = task_gradients(losses, reps, None, [])
    assert grads.z is None and grads.flat is None
    torch.testing.assert_close(grads.rep_grads[0], 2 * reps[0])
    torch.testing.assert_close(grads.rep_grads[1], reps[1].cos())


# ------------------------------------------------------------------------------------------------ the Gramians
def test_representation_gramian_is_the_gramian_on_z_and_needs_a_shared_z():
    _, _, z, reps, losses = setup()
    jz = rows(losses, [z])
    grads = task_gradients(losses, reps, z, [])
    torch.testing.assert_close(RepresentationGramian()(grads), jz @ jz.T)
    with pytest.raises(ValueError, match="one shared representation"):
        RepresentationGramian()(task_gradients(losses, reps, None, []))


@pytest.mark.parametrize("backend", ["batched", "autogram"])
def test_parameter_gramians_equal_the_gramian_of_separate_backwards(backend):
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    gramian = AutogramGramian(encoder) if backend == "autogram" else BatchedParameterGramian(list(encoder.parameters()))
    torch.manual_seed(1)
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in NAMES])
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    z = encoder(x)
    reps = [z.view_as(z) for _ in NAMES]
    losses = torch.stack(
        [F.mse_loss(h(r).squeeze(-1), y[:, t]) for t, (h, r) in enumerate(zip(heads, reps, strict=True))]
    )
    jtheta = rows(losses, list(encoder.parameters()))
    grads = task_gradients(losses, reps, z, [])
    torch.testing.assert_close(gramian(grads), jtheta @ jtheta.T, atol=1e-6, rtol=1e-5)


def test_batched_jacobians_are_the_per_task_parameter_gradients():
    encoder, _, z, reps, losses = setup()
    params = list(encoder.parameters())
    jtheta = rows(losses, params)
    jacobians = BatchedParameterGramian(params).jacobians(task_gradients(losses, reps, z, []), params)
    got = torch.cat([j.reshape(3, -1) for j in jacobians if j is not None], dim=1)
    torch.testing.assert_close(got, jtheta, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the delivery
def test_hand_over_and_surrogate_give_the_same_gradients():
    """Both deliveries: the encoder gets sum_t w_t dL_t/dθ and head t s * dL_t/dp, with s the heads' scale."""
    weights = torch.tensor([0.2, 0.5, 1.3])
    scale = head_scale(torch.ones(3, dtype=torch.bool))
    results = []
    for deliver in ("hand_over", "surrogate"):
        encoder, heads, z, reps, losses = setup()
        params = list(heads.parameters())
        jtheta = rows(losses, list(encoder.parameters()))
        head_rows = [rows(losses[t : t + 1], list(h.parameters()))[0] for t, h in enumerate(heads)]
        grads = task_gradients(losses, reps, z, params if deliver == "hand_over" else [])
        value = losses.detach().mean()
        if deliver == "hand_over":
            loss = hand_over(grads, weights, None, value, scale)
        else:
            loss = surrogate(grads, losses, weights, None, value, scale)
        torch.testing.assert_close(loss.detach(), value)
        loss.backward()
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in encoder.parameters()]), weights @ jtheta)
        for head, expected in zip(heads, head_rows, strict=True):
            torch.testing.assert_close(torch.cat([p.grad.flatten() for p in head.parameters()]), expected / 3)
        results.append([p.grad.clone() for p in [*encoder.parameters(), *heads.parameters()]])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_head_scale_is_one_over_the_present_tasks():
    assert head_scale(torch.tensor([True, False, True])).item() == 0.5
    assert head_scale(torch.tensor([False, False])).item() == 1.0  # nothing present: no division by zero


# -------------------------------------------------------------------------- the heads' scale through the module
def module_grads(balancer, batch, specs) -> dict[str, torch.Tensor]:
    from mtl_lightning.encoders.mlp import MLPEncoder
    from mtl_lightning.module import MultiTaskModule

    torch.manual_seed(0)
    model = MultiTaskModule(MLPEncoder((5,), hidden=[8, 6]), specs, balancer=balancer)
    if len(specs) > 1:  # identical heads: identical task gradients, which no method sees as conflicting
        for name in list(model.heads)[1:]:
            model.heads[name].load_state_dict(model.heads[specs[0].name].state_dict())
    without_trainer(model)
    model.training_step(batch, 0).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch_of(names: str, same_targets: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(12, len(names), generator=gen)
    if same_targets:
        y = y[:, :1].expand(-1, len(names))
    return {
        "inputs": torch.randn(12, 5, generator=gen),
        "targets": {n: y[:, i].contiguous() for i, n in enumerate(names)},
    }


@pytest.mark.parametrize("cls", [UPGrad, MGDA, PCGrad])
def test_switching_from_equal_weighting_leaves_the_heads_gradients_equal(cls):
    """Conflicting tasks: the heads' gradients do not depend on the balancer (only the encoder's may)."""
    specs = [TaskSpec(n, "regression") for n in NAMES]
    batch = batch_of(NAMES, same_targets=False)
    equal, method = module_grads(EqualWeighting(), batch, specs), module_grads(cls(), batch, specs)
    assert equal.keys() == method.keys()
    for name in equal:
        if name.startswith("heads."):
            torch.testing.assert_close(method[name], equal[name], atol=1e-7, rtol=1e-5, msg=name)


def test_on_non_conflicting_tasks_upgrad_is_equal_weighting_everywhere():
    specs = [TaskSpec(n, "regression") for n in NAMES]
    batch = batch_of(NAMES, same_targets=True)
    equal, upgrad = module_grads(EqualWeighting(), batch, specs), module_grads(UPGrad(), batch, specs)
    for name in equal:
        torch.testing.assert_close(upgrad[name], equal[name], atol=1e-7, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ one task
def test_one_task_is_a_documented_pass_through():
    specs = [TaskSpec("a", "regression")]
    batch = batch_of("a", same_targets=False)
    with pytest.warns(UserWarning, match="nothing to balance"):
        balancer = UPGrad()
        balancer.bind(specs)
    equal = module_grads(EqualWeighting(), batch, specs)
    with pytest.warns(UserWarning, match="nothing to balance"):
        single = module_grads(UPGrad(), batch, specs)
    for name in equal:
        torch.testing.assert_close(single[name], equal[name], msg=name)
    z = torch.randn(4, 2, requires_grad=True)
    out = balancer(BalanceInput((z**2).sum().reshape(1), torch.tensor([True]), {"a": z}))
    assert out.weights.tolist() == [1.0]


# ------------------------------------------------------------------------------------ host synchronisations
HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist")


def host_reads(balancer, inputs: BalanceInput) -> tuple[list[str], torch.Tensor]:
    """The ops of one balancer call that read a tensor to the host (a synchronisation on an accelerator), and its
    weights."""
    from torch.profiler import profile

    with profile() as prof:
        out = balancer(inputs)
    return [e.name for e in prof.events() if e.name in HOST_READS], out.weights


@pytest.mark.parametrize("present", [[True, True, True], [True, False, True]])
def test_known_presence_spares_the_balancers_host_synchronisation(present):
    """With ``present_on_host`` (the module's one read) PCGrad reads nothing to the host; the weights are the same."""
    outs = []
    for known in (None, present):
        _, heads, z, reps, losses = setup()
        balancer = PCGrad(telemetry=False)
        balancer.bind([TaskSpec(n, "regression") for n in NAMES])
        mask = torch.tensor(present)
        inputs = BalanceInput(
            losses * mask,
            mask,
            dict(zip(NAMES, reps, strict=True)),
            shared=z,
            task_parameters=list(heads.parameters()),
            log=False,  # a step whose logs are not written (49 of 50 by default): logged ones read to the host
            present_on_host=known,
        )
        torch.manual_seed(0)
        reads, weights = host_reads(balancer, inputs)
        assert (reads == []) is (known is not None), reads
        outs.append(weights)
    torch.testing.assert_close(outs[0], outs[1])
    assert outs[0][~torch.tensor(present)].eq(0).all()


# ------------------------------------------------------------------------------------ a solver that fails
class NaNWeighting(nn.Module):
    def forward(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.full((gramian.shape[0],), float("nan"), dtype=gramian.dtype)


def test_non_finite_weights_fall_back_to_equal_weights_with_a_warning_on_the_next_logged_step():
    from mtl_lightning.balancers import GradientBalancer

    class Broken(GradientBalancer):
        def make_aggregator(self, num_tasks):
            return SimpleNamespace(gramian_weighting=NaNWeighting())

    balancer = Broken(telemetry=False)
    balancer.bind([TaskSpec(n, "regression") for n in NAMES])
    present = torch.tensor([True, False, True])
    for step, log in [(7, False), (8, True)]:
        _, heads, z, reps, losses = setup()
        inputs = BalanceInput(
            losses * present, present, dict(zip(NAMES, reps, strict=True)), step=step, log=log, shared=z
        )
        if log:
            with pytest.warns(UserWarning, match=r"Broken: .*non-finite weights on 2 step\(s\) up to step 8; .*equal"):
                out = balancer(inputs)
        else:
            out = balancer(inputs)
        assert out.weights.tolist() == [0.5, 0.0, 0.5]
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in heads.parameters())


def test_autogram_refuses_parameters_that_no_leaf_module_uses() -> None:
    # nn.MultiheadAttention holds in_proj_weight itself and calls out_proj's weight outside out_proj's forward:
    # the autogram engine's module hooks would see neither, and the Gramian would silently leave them out.
    encoder = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(ConfigError, match=r"autogram cannot see parameters .*1\.in_proj_weight.*gramian: batched"):
        AutogramGramian(encoder)
