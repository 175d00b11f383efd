"""Adaptive loss weighting (UW, DWA, RLW, GLS, IMTL-L, FAMO, GradNorm): reference values against TorchJD or the
papers' formulas, absent tasks, gradients, state round trips, permutations and a short Trainer run of each."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torchjd.scalarization as jd
from lightning import Trainer

from mtl_lightning import MultiTaskModule
from mtl_lightning.balancers import (
    DWA,
    FAMO,
    IMTLL,
    BalanceInput,
    GeometricMean,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)
from mtl_lightning.data import SyntheticDataModule
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

NAMES = ["a", "b", "c", "d"]
LOSSES = [0.5, 2.0, 1.0, 4.0]
ALL = [UncertaintyWeighting, DWA, RandomLossWeighting, GeometricMean, IMTLL, FAMO, GradNorm]
DETERMINISTIC = [c for c in ALL if c is not RandomLossWeighting]


def specs(names=NAMES):
    return [TaskSpec(n, "regression") for n in names]


def bound(cls, names=NAMES, **kwargs):
    balancer = cls(**kwargs)
    balancer.bind(specs(names))
    return balancer


class Tiny(nn.Module):
    """A shared linear encoder and one linear head per task; ``losses`` follows the module's masking contract."""

    def __init__(self, num_tasks: int = 4, width: int = 5, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = nn.Linear(3, width)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.x = torch.randn(8, 3, generator=gen)
        self.y = torch.randn(num_tasks, 8, generator=gen)

    def losses(self, present=None, order=None):
        order = list(range(len(self.heads))) if order is None else order
        z = self.encoder(self.x)
        out = []
        for j, t in enumerate(order):
            pred = self.heads[t](z).squeeze(-1)
            if present is None or present[j]:
                out.append((pred - self.y[t]).pow(2).mean())
            else:  # absent task: a zero still tied to its head, as MultiTaskModule gives
                out.append(pred.sum() * 0.0)
        return torch.stack(out), z


def inputs(losses, present=None, z=None, names=NAMES, log=True):
    losses = torch.as_tensor(losses, dtype=torch.float32)
    present = torch.ones(len(losses), dtype=torch.bool) if present is None else torch.as_tensor(present)
    reps = {} if z is None else dict.fromkeys(names, z)
    return BalanceInput(losses=losses, present=present, representations=reps, log=log)


def with_model(balancer, model, present=None, order=None, names=NAMES):
    losses, z = model.losses(present, order)
    return balancer(inputs(losses, present, z, names)), losses


def set_state(balancer, values):
    """Put known values into a balancer's learned per-task state (logits, log-variances, scales, weights)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    with torch.no_grad():
        if isinstance(balancer, UncertaintyWeighting):
            balancer.scalarizer.log_var.copy_(values)
        elif isinstance(balancer, IMTLL):
            balancer.scalarizer.log_scale.copy_(values)
        elif isinstance(balancer, FAMO):
            balancer.logits.copy_(values)
        elif isinstance(balancer, GradNorm):
            balancer.task_weights.copy_(values.exp() * len(values) / values.exp().sum())


def drive_dwa(balancer, epochs, present=None):
    """Run DWA through epochs of per-step losses; returns the weights seen in each epoch's first step."""
    seen = []
    for steps in epochs:
        for j, losses in enumerate(steps):
            out = balancer(inputs(losses, present))
            if j == 0:
                seen.append(out.weights)
        balancer.on_train_epoch_end()
    return seen


STATE = [0.3, -0.5, 0.2, 0.7]
DWA_EPOCHS = [[[4.0, 2.0, 1.0, 3.0]], [[3.0, 1.5, 0.9, 2.0]], [[2.0, 1.4, 0.5, 1.9]]]


def prepared(cls, names=NAMES, order=None):
    """A bound balancer of class ``cls`` in a non-trivial state, restricted/permuted to ``order`` of its tasks."""
    order = list(range(len(NAMES))) if order is None else order
    balancer = bound(cls, names)
    set_state(balancer, [STATE[i] for i in order])
    if cls is DWA:
        drive_dwa(balancer, [[[step[i] for i in order] for step in epoch] for epoch in DWA_EPOCHS])
    return balancer


# ------------------------------------------------------------------------------------------ reference values
def test_uw_matches_torchjd():
    balancer = prepared(UncertaintyWeighting)
    reference = jd.UW(4)
    with torch.no_grad():
        reference.log_var.copy_(torch.tensor(STATE))
    out = balancer(inputs(LOSSES))
    assert out.loss.item() == pytest.approx(reference(torch.tensor(LOSSES)).item(), rel=1e-6)
    torch.testing.assert_close(out.weights, 0.5 * torch.exp(-torch.tensor(STATE)))
    assert set(out.logs) == {f"uw/log_var/{n}" for n in NAMES}
    assert out.logs["uw/log_var/b"].item() == pytest.approx(-0.5)


def test_imtl_l_matches_torchjd():
    balancer = prepared(IMTLL)
    reference = jd.IMTLL(4)
    with torch.no_grad():
        reference.log_scale.copy_(torch.tensor(STATE))
    out = balancer(inputs(LOSSES))
    expected = sum(math.exp(s) * loss - s for s, loss in zip(STATE, LOSSES, strict=True))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(reference(torch.tensor(LOSSES)).item(), rel=1e-6)
    torch.testing.assert_close(out.weights, torch.exp(torch.tensor(STATE)))
    assert "imtl_l/log_scale/d" in out.logs


def test_gls_is_geometric_mean():
    out = bound(GeometricMean)(inputs(LOSSES))
    gm = math.prod(LOSSES) ** 0.25
    assert out.loss.item() == pytest.approx(gm, rel=1e-6)
    assert out.loss.item() == pytest.approx(jd.GeometricMean()(torch.tensor(LOSSES)).item(), rel=1e-6)
    torch.testing.assert_close(out.weights, gm / (4 * torch.tensor(LOSSES)))


def test_gls_zero_loss_is_finite_and_negative_loss_is_an_error():
    out = bound(GeometricMean)(inputs([0.0, 1.0, 2.0, 3.0]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights).all()
    with pytest.raises(ConfigError, match=r"non-negative losses.*\['b'\]"):
        bound(GeometricMean)(inputs([1.0, -1.0, 2.0, 3.0]))


def test_rlw_matches_torchjd_random():
    balancer = bound(RandomLossWeighting)
    torch.manual_seed(7)
    out = balancer(inputs(LOSSES))
    torch.manual_seed(7)
    reference = jd.Random()(torch.tensor(LOSSES))
    torch.manual_seed(7)
    expected = torch.softmax(torch.randn(4), dim=0)  # Algorithm 2 of the paper
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    torch.testing.assert_close(out.weights, expected)
    assert out.loss.item() == pytest.approx((expected * torch.tensor(LOSSES)).sum().item(), rel=1e-6)


def test_famo_forward_matches_torchjd():
    balancer = prepared(FAMO)
    reference = jd.FAMO(4)
    with torch.no_grad():
        reference._w.copy_(torch.tensor(STATE))
    out = balancer(inputs(LOSSES))
    assert out.loss.item() == pytest.approx(reference(torch.tensor(LOSSES)).item(), rel=1e-6)
    z = torch.softmax(torch.tensor(STATE), dim=0)
    by_hand = z / (torch.tensor(LOSSES) + 1e-8)
    torch.testing.assert_close(out.weights, by_hand / by_hand.sum())
    assert "famo/logit/a" in out.logs


def test_famo_update_matches_torchjd_update_with_next_step_losses():
    # TorchJD's update with "before" = one step's losses and "after" = the next step's, as FAMO does here.
    steps = [[1.0, 2.0, 0.5, 3.0], [0.8, 1.9, 0.45, 2.0], [0.7, 1.5, 0.44, 1.9], [0.5, 1.4, 0.43, 1.2]]
    balancer = bound(FAMO, lr=0.1, weight_decay=0.01, min_losses=0.1)
    reference = jd.FAMO(4, min_losses=torch.full((4,), 0.1), lr=0.1, weight_decay=0.01)
    for j, losses in enumerate(steps):
        balancer(inputs(losses))
        balancer.on_train_batch_end(torch.tensor(losses))
        if j > 0:
            reference(torch.tensor(steps[j - 1]))
            reference.update(torch.tensor(losses))
    torch.testing.assert_close(balancer.logits, reference._w.detach())
    assert balancer.logits.abs().sum() > 0


def test_famo_favours_the_slower_task():
    balancer = bound(FAMO, names=["fast", "slow"])
    for losses in ([1.0, 1.0], [0.5, 0.95]):
        out = balancer(inputs(losses, names=["fast", "slow"]))
        balancer.on_train_batch_end(torch.tensor(losses))
    assert balancer.logits[1] > 0 > balancer.logits[0]
    out = balancer(inputs([1.0, 1.0], names=["fast", "slow"]))
    assert out.weights[1] > out.weights[0]


def test_famo_updates_only_tasks_present_in_both_steps():
    balancer = bound(FAMO)
    for losses, present in (([1.0, 2.0, 0.0, 3.0], [1, 1, 0, 1]), ([0.5, 2.0, 1.0, 0.0], [1, 1, 1, 0])):
        balancer(inputs(losses, torch.tensor(present, dtype=torch.bool)))
        balancer.on_train_batch_end(torch.tensor(losses))
    logits = balancer.logits.clone()
    assert logits[2] == 0 and logits[3] == 0  # c absent before, d absent now
    assert logits[0] != 0 and logits[1] != 0
    # Their Adam moments stay empty too (Adam would have moved them with a zero gradient through weight decay).
    assert balancer.logit_exp_avg[2] == 0 and balancer.logit_exp_avg_sq[3] == 0
    assert balancer.logit_exp_avg[0] != 0 and balancer.logit_exp_avg_sq[1] != 0


def test_dwa_uniform_for_two_epochs_then_ratio_formula():
    balancer = bound(DWA, temperature=2.0)
    epochs = [*DWA_EPOCHS, [[1.0, 1.0, 1.0, 1.0]]]
    seen = drive_dwa(balancer, epochs)
    torch.testing.assert_close(seen[0], torch.ones(4))
    torch.testing.assert_close(seen[1], torch.ones(4))
    for e in (2, 3):
        rates = torch.tensor(epochs[e - 1][0]) / torch.tensor(epochs[e - 2][0])
        torch.testing.assert_close(seen[e], 4 * torch.softmax(rates / 2.0, dim=0))


def test_dwa_matches_torchjd_fed_every_step():
    epochs = [[[4.0, 2.0, 1.0, 3.0], [3.0, 2.5, 1.2, 2.0]], [[3.0, 1.5, 0.9, 2.0], [2.0, 1.0, 0.8, 2.5]]] * 2
    balancer = bound(DWA, temperature=1.5)
    reference = jd.DWA(temperature=1.5)
    for steps in epochs:
        for losses in steps:
            out = balancer(inputs(losses))
            assert out.loss.item() == pytest.approx(reference(torch.tensor(losses)).item(), rel=1e-6)
        balancer.on_train_epoch_end()
        reference.step()


def test_dwa_epoch_average_skips_absent_steps():
    # Task b is absent in one of two steps: its average is its present loss, not the mean with the absent 0.
    balancer = bound(DWA)
    steps = [([1.0, 2.0, 1.0, 1.0], [1, 1, 1, 1]), ([1.0, 0.0, 1.0, 1.0], [1, 0, 1, 1])]
    for losses, present in steps:
        balancer(inputs(losses, torch.tensor(present, dtype=torch.bool)))
    balancer.on_train_epoch_end()
    torch.testing.assert_close(balancer.history[1], torch.tensor([1.0, 2.0, 1.0, 1.0]))


def test_gradnorm_by_hand():
    model = Tiny()
    balancer = bound(GradNorm, alpha=1.5)
    w = torch.tensor([1.6, 0.4, 1.2, 0.8])
    with torch.no_grad():
        balancer.task_weights.copy_(w)
        balancer.initial_losses.copy_(torch.tensor([2.0, 1.0, 4.0, 0.5]))
        balancer.has_initial.fill_(True)
    out, losses = with_model(balancer, model)
    # Reference, from the paper's formulas, one task gradient at a time.
    z_losses, z = model.losses()
    norms = torch.stack([torch.autograd.grad(z_losses[t], z, retain_graph=True)[0].norm() for t in range(4)])
    ratio = losses.detach() / torch.tensor([2.0, 1.0, 4.0, 0.5])
    r = ratio / ratio.mean()
    target = (w * norms).mean() * r**1.5
    gradnorm = (w * norms - target).abs().sum()
    main = (w * losses.detach()).sum()
    assert out.loss.item() == pytest.approx((main + gradnorm).item(), rel=1e-5)
    assert out.logs["gradnorm/loss"].item() == pytest.approx(gradnorm.item(), rel=1e-5)
    assert out.logs["gradnorm/grad_norm/c"].item() == pytest.approx(norms[2].item(), rel=1e-5)
    torch.testing.assert_close(out.weights, w)
    # The weights' gradient comes from the GradNorm term only, with the targets held constant.
    out.loss.backward()
    torch.testing.assert_close(balancer.task_weights.grad, torch.sign(w * norms - target) * norms)


def test_gradnorm_records_initial_losses_and_renormalises():
    model = Tiny()
    balancer = bound(GradNorm)
    present = torch.tensor([True, True, False, True])
    _, losses = with_model(balancer, model, present)
    torch.testing.assert_close(balancer.initial_losses, losses.detach() * present)
    assert balancer.has_initial.tolist() == [True, True, False, True]
    # Equal initial losses at the first step: rate 1, so the target is the mean weighted norm.
    with torch.no_grad():
        balancer.task_weights.copy_(torch.tensor([3.0, 1.0, 1.0, -1.0]))
    balancer.on_train_batch_end(losses.detach())
    w = balancer.task_weights.detach()
    assert w.sum().item() == pytest.approx(4.0) and (w > 0).all()


def test_gradnorm_needs_a_trainable_representation():
    balancer = bound(GradNorm)
    with pytest.raises(ConfigError, match="frozen"):
        balancer(inputs(LOSSES, z=torch.zeros(2, 3)))


@pytest.mark.parametrize(
    ("cls", "kwargs"), [(DWA, {"temperature": 0.0}), (FAMO, {"lr": -1.0}), (GradNorm, {"alpha": -1.0})]
)
def test_bad_arguments(cls, kwargs):
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_famo_min_losses_unknown_task():
    with pytest.raises(ConfigError, match="unknown tasks"):
        bound(FAMO, min_losses={"nope": 1.0})


# --------------------------------------------------------------------------------------------- absent tasks
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_absent_tasks_as_if_only_present_ones_existed(cls):
    present = torch.tensor([True, False, True, True])
    keep = [0, 2, 3]
    model = Tiny()
    full = prepared(cls)
    sub = prepared(cls, names=[NAMES[i] for i in keep], order=keep)
    if cls is GradNorm:
        with_model(full, model, present)  # records L(0) for both alike
        with_model(sub, Tiny(), order=keep, names=[NAMES[i] for i in keep])
    torch.manual_seed(3)
    out, _ = with_model(full, model, present)
    torch.manual_seed(3)
    ref, _ = with_model(sub, model, order=keep, names=[NAMES[i] for i in keep])
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights).all()
    assert out.weights[1] == 0
    torch.testing.assert_close(out.weights[keep], ref.weights)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_all_absent_gives_a_finite_loss(cls):
    balancer = prepared(cls)
    losses = torch.zeros(4, requires_grad=True)
    out = balancer(BalanceInput(losses=losses, present=torch.zeros(4, dtype=torch.bool)))
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0
    assert (out.weights == 0).all()
    out.loss.backward()
    assert losses.grad is not None and torch.isfinite(losses.grad).all()
    # Learned parameters still get a (zero) gradient: DDP without find_unused_parameters waits for every one.
    assert all(p.grad is not None and (p.grad == 0).all() for p in balancer.parameters() if p.requires_grad)
    balancer.on_train_batch_end(losses.detach())
    balancer.on_train_epoch_end()
    assert all(torch.isfinite(t).all() for t in balancer.state_dict().values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("present", [None, [True, True, False, True]], ids=["all", "one_absent"])
def test_model_gradient_is_weighted_sum_of_task_gradients(cls, present):
    model = Tiny()
    balancer = prepared(cls)
    mask = None if present is None else torch.tensor(present)
    torch.manual_seed(0)
    out, losses = with_model(balancer, model, mask)
    params = list(model.parameters())
    got = torch.autograd.grad(out.loss, params, retain_graph=True)
    expected = torch.autograd.grad((out.weights * losses).sum(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_uw_log_variances_learn_from_the_loss():
    balancer = prepared(UncertaintyWeighting)
    present = torch.tensor([True, True, False, True])
    losses = torch.tensor([0.5, 2.0, 0.0, 4.0])
    balancer(inputs(losses, present)).loss.backward()
    s = torch.tensor(STATE)
    expected = (-0.5 * torch.exp(-s) * losses + 0.5) * present
    torch.testing.assert_close(balancer.scalarizer.log_var.grad, expected)


def test_imtl_l_scales_learn_from_the_loss():
    balancer = prepared(IMTLL)
    balancer(inputs(LOSSES)).loss.backward()
    s = torch.tensor(STATE)
    torch.testing.assert_close(balancer.scalarizer.log_scale.grad, torch.exp(s) * torch.tensor(LOSSES) - 1)


def test_famo_logits_are_outside_the_model_optimizer():
    balancer = prepared(FAMO)
    assert list(balancer.parameters()) == []
    assert {"logits", "prev_log_losses", "prev_present", "logit_exp_avg", "logit_steps"} <= set(balancer.state_dict())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_no_telemetry_when_the_step_is_not_logged(cls):
    out, _ = with_model(prepared(cls), Tiny())
    losses, z = Tiny().losses()
    quiet = prepared(cls)(inputs(losses, z=z, log=False))
    assert quiet.logs == {}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in out.logs.values())


# --------------------------------------------------------------------------------------------- state and order
def _step(balancer, model, present=None):
    torch.manual_seed(11)
    out, losses = with_model(balancer, model, present)
    balancer.on_train_batch_end(losses.detach())
    return out


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_state_round_trip(cls):
    model = Tiny()
    balancer = prepared(cls)
    for _ in range(3):  # FAMO: a few Adam steps on the logits
        _step(balancer, model)
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    fresh = bound(cls)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(2):
        a, b = _step(balancer, model), _step(fresh, model)
        assert a.loss.item() == b.loss.item()
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    _same_state(balancer, fresh)


@pytest.mark.parametrize("cls", DETERMINISTIC, ids=lambda c: c.__name__)
def test_permuting_tasks_permutes_weights(cls):
    perm = [2, 0, 3, 1]
    model = Tiny()
    names = [NAMES[i] for i in perm]
    straight, permuted = prepared(cls), prepared(cls, names=names, order=perm)
    a, _ = with_model(straight, model)
    b, _ = with_model(permuted, model, order=perm, names=names)
    torch.testing.assert_close(b.weights, a.weights[perm])
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- end to end
TASKS = [TaskSpec("bin", "binary"), TaskSpec("multi", "multiclass", num_outputs=3), TaskSpec("reg", "regression")]


def _fit(balancer, max_steps=5, ckpt_path=None, root=None):
    torch.manual_seed(0)
    data = SyntheticDataModule(TASKS, num_samples=512, num_features=8, batch_size=64, missing_rate=0.3)
    model = MultiTaskModule(MLPEncoder((8,), hidden=[16]), TASKS, balancer=balancer)
    trainer = Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_trains_in_multitask_module_and_checkpoints(cls, tmp_path):
    model, trainer = _fit(cls())
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"].item())
    for task in TASKS:
        assert math.isfinite(metrics[f"train/balance/weight/{task.name}"].item())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored = MultiTaskModule(MLPEncoder((8,), hidden=[16]), TASKS, balancer=cls())
    restored.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    _same_state(model.balancer, restored.balancer)


def _same(x, y, key=""):
    """Equal tensors, nested in dicts/lists as in extra state (FAMO's Adam state_dict)."""
    if isinstance(x, torch.Tensor):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), key
        for k in x:
            _same(x[k], y[k], f"{key}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), key
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _same(a, b, f"{key}[{i}]")
    else:
        assert x == y, key


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        _same(sa[key], sb[key], key)


@pytest.mark.parametrize("cls", [FAMO, DWA], ids=lambda c: c.__name__)
def test_resume_restores_the_state(cls, tmp_path):
    # 410 training rows in batches of 64: 7 steps per epoch; stop in the middle of the third epoch.
    model, trainer = _fit(cls(), max_steps=17, root=tmp_path)
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    restored, _ = _fit(cls(), max_steps=17, ckpt_path=path, root=tmp_path)  # restores, trains no step
    _same_state(model.balancer, restored.balancer)
    resumed, trainer = _fit(cls(), max_steps=19, ckpt_path=path, root=tmp_path)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    if cls is FAMO:  # the logits' Adam went on from the checkpoint's state: 16 updates before, 2 after
        assert resumed.balancer.logit_steps.item() == 18
    else:
        assert resumed.balancer.history_len.item() == 2
