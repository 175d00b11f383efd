"""Sharing architectures (shared-bottom, MMoE, CGC/PLE, cross-stitch, MTAN, task-conditioned): outputs, gradients,
gates, re-binding tasks, training logs, training inside MultiTaskModule and with gradient balancers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torchjd.aggregation as tjd
from conftest import CONFIGS
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from mtl_lightning import MultiTaskModule
from mtl_lightning.balancers import BalanceInput, UPGrad
from mtl_lightning.data import MultiTaskTensorDataset, collate_batch
from mtl_lightning.encoders import (
    CGC,
    MTAN,
    PLE,
    CrossStitch,
    CrossStitchConv,
    CrossTaskAttention,
    MMoE,
    PartialSharing,
    SharedBottom,
    TaskConditioned,
)
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

FLAT = (12,)
IMAGE = (3, 8, 8)
# name -> (factory, input shape, representation width); small sizes so every test runs in milliseconds.
ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "shared_bottom": (lambda: SharedBottom(FLAT, shared=[16], tower=[8]), FLAT, 8),
    "partial_sharing": (lambda: PartialSharing(FLAT, hidden=[16, 8], shared_layers=1), FLAT, 8),
    "mmoe": (lambda: MMoE(FLAT, num_experts=3, expert_hidden=[16, 8]), FLAT, 8),
    "cgc": (lambda: CGC(FLAT, num_shared_experts=2, num_task_experts=1, expert_hidden=[8]), FLAT, 8),
    "ple": (lambda: PLE(FLAT, num_levels=3, num_shared_experts=2, num_task_experts=2, expert_hidden=[8]), FLAT, 8),
    "cross_stitch": (lambda: CrossStitch(FLAT, hidden=[16, 8]), FLAT, 8),
    "cross_stitch_conv": (lambda: CrossStitchConv(IMAGE, channels=[4, 8], pooled_size=2), IMAGE, 32),
    "mtan": (lambda: MTAN(IMAGE, channels=[4, 8, 8], pooled_size=2), IMAGE, 32),
    "cross_attention": (lambda: CrossTaskAttention(FLAT, hidden=[16, 8], num_heads=2), FLAT, 8),
    "task_conditioned_film": (lambda: TaskConditioned(FLAT, hidden=[16, 8], embedding_dim=4), FLAT, 8),
    "task_conditioned_concat": (
        lambda: TaskConditioned(FLAT, hidden=[16, 8], embedding_dim=4, conditioning="concat"),
        FLAT,
        8,
    ),
}
TASKS = ["ta", "tb", "tc"]
# Prefixes of each architecture's per-task parameters (task name filled in), for "task a's loss leaves b alone".
OWN_PARTS = {
    "shared_bottom": ["towers.{t}."],
    "partial_sharing": ["towers.{t}."],
    "mmoe": ["gates.{t}."],
    "cgc": ["levels.0.task_experts.{t}.", "levels.0.task_gates.{t}."],
    "mtan": ["attention.{t}."],
    "task_conditioned_concat": ["embeddings.{t}."],
}


def build(name: str, tasks: list[str] = TASKS, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    encoder = ARCHS[name][0]()
    encoder.bind_tasks(list(tasks))
    return encoder


def inputs(name: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *ARCHS[name][1], generator=torch.Generator().manual_seed(seed))


def randomise(encoder: nn.Module) -> nn.Module:
    """Move every parameter off its initialisation (zero-initialised FiLM maps pass no gradient to the embeddings)."""
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return encoder


def belongs_to(key: str, task: str) -> bool:
    """Whether a state-dict entry is a per-task part of ``task`` (a ModuleDict key or a cross-stitch weight)."""
    return any(part in (task, f"from_{task}") for part in key.split("."))


# ------------------------------------------------------------------------------------------ outputs and gradients
@pytest.mark.parametrize("name", ARCHS)
def test_outputs_match_out_features(name: str) -> None:
    encoder = build(name)
    out = encoder(inputs(name))
    assert list(out) == TASKS
    assert encoder.out_features == dict.fromkeys(TASKS, ARCHS[name][2])
    for task, z in out.items():
        assert z.shape == (6, encoder.out_features[task]) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", ARCHS)
def test_gradient_reaches_every_parameter(name: str) -> None:
    encoder = randomise(build(name))
    out = encoder(inputs(name))
    sum((z * torch.randn_like(z)).sum() for z in out.values()).backward()
    for key, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", OWN_PARTS)
def test_one_task_loss_reaches_its_own_and_the_shared_parts_only(name: str) -> None:
    encoder = randomise(build(name))
    z = encoder(inputs(name))["ta"]
    (z * torch.randn_like(z)).sum().backward()
    own = {t: [p.format(t=t) for p in OWN_PARTS[name]] for t in TASKS}
    for key, p in encoder.named_parameters():
        grad = 0.0 if p.grad is None else float(p.grad.abs().sum())
        if any(key.startswith(prefix) for prefix in own["ta"]):
            assert grad > 0, key
        elif any(key.startswith(prefix) for t in ("tb", "tc") for prefix in own[t]):
            assert grad == 0, key
    shared = [k for k, _ in encoder.named_parameters() if not any(k.startswith(p) for ps in own.values() for p in ps)]
    assert shared and all(encoder.get_parameter(k).grad is not None for k in shared)


def test_hard_sharing_and_independent_networks_are_the_two_ends_of_shared_bottom() -> None:
    hard = SharedBottom(FLAT, shared=[8], tower=[])
    hard.bind_tasks(["a", "b"])
    out = hard(torch.randn(3, *FLAT))
    assert out["a"] is out["b"] and hard.out_features == {"a": 8, "b": 8}
    independent = SharedBottom(FLAT, shared=[], tower=[8])
    independent.bind_tasks(["a", "b"])
    assert isinstance(independent.bottom, nn.Identity) and independent(torch.randn(3, *FLAT))["a"].shape == (3, 8)
    assert PartialSharing(FLAT, hidden=[16, 8, 4], shared_layers=2).tower_widths == [4]


# ------------------------------------------------------------------------------------------------------- gates
def test_mmoe_mixture_is_the_gate_weighted_sum_of_experts() -> None:
    encoder = build("mmoe").train()
    x = inputs("mmoe")
    out = encoder(x)
    experts = torch.stack([e(x) for e in encoder.experts], dim=1)
    for task in TASKS:
        gate = encoder._last_gates[task]
        assert (gate >= 0).all()
        torch.testing.assert_close(gate.sum(-1), torch.ones(6))
        torch.testing.assert_close(gate, torch.softmax(encoder.gates[task](x), -1))
        torch.testing.assert_close(out[task], (gate[..., None] * experts).sum(1))


@pytest.mark.parametrize("name", ["cgc", "ple"])
def test_ple_gates_are_distributions_over_own_and_shared_experts(name: str) -> None:
    encoder = build(name).train()
    encoder(inputs(name))
    assert len(encoder._last_gates) == encoder.num_levels
    for level in encoder._last_gates:
        for gate in level.values():
            assert gate.shape == (6, encoder.num_task_experts + encoder.num_shared_experts) and (gate >= 0).all()
            torch.testing.assert_close(gate.sum(-1), torch.ones(6))


def test_ple_shared_gate_weighs_every_expert_of_the_level() -> None:
    encoder = build("ple")
    level = encoder.levels[0]
    assert level.shared_gate is not None and encoder.levels[-1].shared_gate is None
    x = inputs("ple")
    shared_out, _, _ = level(x, dict.fromkeys(TASKS, x))
    logits = torch.cat([level.shared_gate(x), *(level.shared_gate_rows[t](x) for t in TASKS)], -1)
    weights = torch.softmax(logits, -1)
    assert weights.shape[-1] == encoder.num_shared_experts + len(TASKS) * encoder.num_task_experts
    experts = torch.stack([e(x) for e in level.experts()], dim=1)  # shared first, then each task's, in task order
    torch.testing.assert_close(shared_out, (weights[..., None] * experts).sum(1))


def test_cgc_is_ple_with_one_level() -> None:
    torch.manual_seed(0)
    cgc = CGC(FLAT, 2, 1, [8])
    torch.manual_seed(0)
    ple = PLE(FLAT, 1, 2, 1, [8])
    for encoder in (cgc, ple):
        torch.manual_seed(1)
        encoder.bind_tasks(["a", "b"])
    x = torch.randn(4, *FLAT)
    for task, z in cgc(x).items():
        torch.testing.assert_close(z, ple(x)[task])


# ------------------------------------------------------------------------------------------------ cross-stitch
@pytest.mark.parametrize("name", ["cross_stitch", "cross_stitch_conv"])
def test_cross_stitch_starts_near_identity(name: str) -> None:
    encoder = build(name)
    for unit in encoder.stitches:
        alpha = unit.alpha.detach()
        torch.testing.assert_close(alpha.diagonal(), torch.full((3,), 0.9))
        torch.testing.assert_close(alpha.sum(1), torch.ones(3))  # the paper's convex initialisation
    assert float(encoder.training_logs()["stitch_diagonal"]) == pytest.approx(0.9)


@pytest.mark.parametrize("cls", [CrossStitch, CrossStitchConv])
def test_cross_stitch_with_alpha_same_one_is_independent_columns(cls) -> None:
    shape = FLAT if cls is CrossStitch else IMAGE
    sizes = {"hidden": [8, 4]} if cls is CrossStitch else {"channels": [4, 6], "pooled_size": 1}
    encoder = cls(shape, alpha_same=1.0, **sizes)
    encoder.bind_tasks(TASKS)
    x = torch.randn(5, *shape)
    out = encoder(x)
    for task in TASKS:
        h = x.flatten(1) if cls is CrossStitch else x
        for blocks in encoder.blocks:
            h = blocks[task](h)
        torch.testing.assert_close(out[task], h if cls is CrossStitch else h.mean(dim=(-2, -1)))
    assert float(encoder.training_logs()["stitch_diagonal"]) == 1.0


def test_cross_stitch_mixes_columns_by_alpha() -> None:
    encoder = CrossStitch(FLAT, hidden=[4])
    encoder.bind_tasks(["a", "b"])
    with torch.no_grad():
        encoder.stitches[0].rows["a"].from_b.fill_(0.25)
    x = torch.randn(3, *FLAT)
    columns = {t: encoder.blocks[0][t](x) for t in "ab"}
    torch.testing.assert_close(encoder(x)["a"], 0.9 * columns["a"] + 0.25 * columns["b"])


def test_one_task_cross_stitch_is_a_plain_column() -> None:
    encoder = CrossStitch(FLAT, hidden=[4], alpha_same=0.5)
    encoder.bind_tasks(["a"])
    x = torch.randn(3, *FLAT)
    torch.testing.assert_close(encoder(x)["a"], encoder.blocks[0]["a"](x))


# --------------------------------------------------------------------------------------------------- re-binding
@pytest.mark.parametrize("name", ARCHS)
def test_bind_tasks_keeps_kept_tasks_adds_new_drops_removed(name: str) -> None:
    encoder = build(name, ["ta", "tb"])
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    kept_modules = {k: m for k, m in encoder.named_modules() if belongs_to(k, "tb") and k.endswith(".tb")}
    encoder.bind_tasks(["tb", "tc"])
    after = encoder.state_dict()
    assert not [k for k in after if belongs_to(k, "ta")], "the removed task's parts are gone"
    assert [k for k in after if belongs_to(k, "tc")], "the new task has parts"
    for key, value in after.items():
        if not belongs_to(key, "tc"):
            assert key in before and torch.equal(value, before[key]), f"{key} changed"
    for key, module in kept_modules.items():
        assert encoder.get_submodule(key) is module
    assert list(encoder.out_features) == ["tb", "tc"]
    assert list(encoder(inputs(name))) == ["tb", "tc"]
    # Idempotent: the same list again changes nothing.
    snapshot = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.bind_tasks(["tb", "tc"])
    assert snapshot.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in snapshot.items())


def test_cross_stitch_rebinding_keeps_the_entries_between_kept_tasks() -> None:
    encoder = build("cross_stitch", ["ta", "tb"])
    with torch.no_grad():
        encoder.stitches[1].rows["tb"].from_ta.fill_(0.3)
        encoder.stitches[1].rows["tb"].from_tb.fill_(0.6)
    encoder.bind_tasks(["tb", "tc", "ta"])
    alpha = encoder.stitches[1].alpha.detach()
    assert float(alpha[0, 0]) == pytest.approx(0.6) and float(alpha[0, 2]) == pytest.approx(0.3)
    assert float(alpha[1, 1]) == pytest.approx(0.9) and float(alpha[1, 0]) == pytest.approx(0.05)  # new task: init


def test_forward_before_bind_tasks_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"call bind_tasks\(names\) first"):
        MMoE(FLAT)(torch.randn(2, *FLAT))


# ---------------------------------------------------------------------------------------------------- logs
LOGGING = [n for n in ARCHS if n in ("mmoe", "cgc", "ple", "cross_stitch", "cross_stitch_conv", "mtan")]


@pytest.mark.parametrize("name", LOGGING)
def test_training_logs_keep_their_keys(name: str) -> None:
    encoder = build(name)
    first = encoder.training_logs()  # before any forward: zeros under the same keys
    assert first and all(v.ndim == 0 for v in first.values())
    encoder.train()(inputs(name, seed=1))
    trained = encoder.training_logs()
    encoder.eval()(inputs(name, n=3, seed=2))
    after_eval = encoder.training_logs()
    encoder.train()(inputs(name, seed=3))
    assert list(first) == list(trained) == list(after_eval) == list(encoder.training_logs())
    for key, value in trained.items():
        assert torch.isfinite(value) and not value.requires_grad, key
        assert torch.equal(value, after_eval[key]), f"{key}: an evaluation forward changed the training logs"


def test_mmoe_logs_entropy_and_expert_load() -> None:
    encoder = build("mmoe").train()
    with torch.no_grad():  # uniform gates for "ta" and "tb"; "tc" always picks expert 0
        for t in TASKS:
            encoder.gates[t].weight.zero_()
            encoder.gates[t].bias.zero_()
        encoder.gates["tc"].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    encoder(inputs("mmoe"))
    logs = encoder.training_logs()
    assert float(logs["gate_entropy/ta"]) == pytest.approx(1.0)
    assert float(logs["gate_entropy/tc"]) == pytest.approx(0.0, abs=1e-6)
    load = torch.tensor([float(logs[f"expert_load/{i}"]) for i in range(3)])
    torch.testing.assert_close(load, torch.tensor([5 / 9, 2 / 9, 2 / 9]))
    assert float(logs["expert_load_cv"]) == pytest.approx(float(load.std(unbiased=False) / load.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MMoE(FLAT, num_experts=0), r"MMoE: num_experts must be an integer >= 1, got 0; e.g. num_experts: 4"),
        (lambda: MMoE(FLAT, expert_hidden=[]), r"expert_hidden needs at least one width"),
        (lambda: PLE(FLAT, num_levels=0), r"num_levels must be an integer >= 1"),
        (lambda: PLE(FLAT, num_task_experts=0), r"use MMoE instead"),
        (lambda: SharedBottom(FLAT, shared=[], tower=[]), r"give at least one layer"),
        (lambda: PartialSharing(FLAT, hidden=[8], shared_layers=2), r"use 0..1"),
        (lambda: CrossStitch(FLAT, alpha_same=1.5), r"alpha_same must be in \[0, 1\]"),
        (lambda: CrossStitch(FLAT, norm="group"), r"norm must be one of"),
        (lambda: CrossStitchConv(FLAT), r"input_shape must be \(C, H, W\).*configs/data/images.yaml"),
        (lambda: MTAN((3, 4, 4), channels=[4, 4, 4, 4]), r"4 stages halve the image 3 times"),
        (lambda: MTAN(IMAGE, kernel_size=2), r"kernel_size must be odd"),
        (lambda: MTAN(IMAGE, pooled_size=0), r"pooled_size must be an integer >= 1, got 0; 1 = global average"),
        (lambda: TaskConditioned(FLAT, conditioning="add"), r"conditioning must be one of \['concat', 'film'\]"),
        (lambda: TaskConditioned(FLAT, dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_raise_one_line_config_errors(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- inside MultiTaskModule
SPECS = [
    TaskSpec("ta", "binary"),
    TaskSpec("tb", "multiclass", num_outputs=3),
    TaskSpec("tc", "regression"),
]


def loader(shape: tuple[int, ...], n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    targets = {
        "ta": torch.randint(0, 2, (n,), generator=g).float(),
        "tb": torch.randint(0, 3, (n,), generator=g),
        "tc": torch.randn(n, generator=g),
    }
    return DataLoader(MultiTaskTensorDataset(x, targets), batch_size=batch_size, collate_fn=collate_batch)


def fit(model: MultiTaskModule, shape: tuple[int, ...], steps: int = 2) -> Trainer:
    trainer = Trainer(
        fast_dev_run=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader(shape), loader(shape))
    return trainer


@pytest.mark.parametrize("name", ARCHS)
def test_multitask_module_trains_with_each_architecture(name: str) -> None:
    encoder = build(name)
    model = MultiTaskModule(encoder=encoder, tasks=SPECS)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    trainer = fit(model, ARCHS[name][1])
    assert trainer.state.finished and trainer.global_step == 2
    assert any(not torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    logged = {k for k in trainer.callback_metrics if k.startswith("train/encoder/")}
    expected = {f"train/encoder/{k}" for k in getattr(encoder, "training_logs", dict)()}
    assert logged == expected


@pytest.mark.parametrize("gramian", ["batched", "autogram"])
@pytest.mark.parametrize("name", ARCHS)
def test_upgrad_parameter_mode_gives_the_exact_update(name: str, gramian: str) -> None:
    """UPGrad in parameter mode on each architecture: the encoder's gradient is TorchJD's UPGrad of the per-task
    gradients w.r.t. all its parameters (one torch.autograd.grad per task as the reference)."""
    encoder = randomise(build(name))
    heads = nn.ModuleDict({t: nn.Linear(ARCHS[name][2], 1) for t in TASKS})
    balancer = UPGrad(mode="parameter", gramian=gramian)
    balancer.bind([TaskSpec(t, "regression") for t in TASKS], encoder)
    x, y = inputs(name, n=8), torch.randn(8, 3)
    reps = encoder(x)
    losses = torch.stack([((heads[t](reps[t]).squeeze(-1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)])
    params = [p for p in encoder.parameters() if p.requires_grad]
    jacobian = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=False)])
            for loss in losses
        ]
    )
    out = balancer(BalanceInput(losses, torch.ones(3, dtype=torch.bool), reps))
    out.loss.backward()
    got = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(got, tjd.UPGrad()(jacobian), atol=1e-5, rtol=1e-4)


def test_upgrad_in_both_modes_inside_multitask_module() -> None:
    """Parameter mode trains a per-task-representation encoder; representation mode refuses it with an error that
    says to use parameter mode (docs/balancing.md), except where every task reads one tensor (hard sharing)."""
    model = MultiTaskModule(encoder=build("mmoe"), tasks=SPECS, balancer=UPGrad(mode="parameter"))
    assert fit(model, FLAT).global_step == 2
    assert "train/balance/weight/ta" in model.trainer.callback_metrics
    model = MultiTaskModule(encoder=build("mmoe"), tasks=SPECS, balancer=UPGrad(mode="representation"))
    with pytest.raises(ConfigError, match=r"one representation per task.*mode: parameter"):
        fit(model, FLAT)
    hard = SharedBottom(FLAT, shared=[8], tower=[])
    model = MultiTaskModule(encoder=hard, tasks=SPECS, balancer=UPGrad(mode="representation"))
    assert fit(model, FLAT).global_step == 2


# ---------------------------------------------------------------------------------------------------- configs
# Every configs/model/*.yaml trains, validates, tests and predicts in tests/test_cli.py (test_every_config_...).
@pytest.mark.parametrize("config", ["cross_stitch_conv", "mtan"])
def test_image_configs_declare_their_data_partner(config: str) -> None:
    text = (CONFIGS / "model" / f"{config}.yaml").read_text()
    assert "\n# pairs-with: --data configs/data/images.yaml\n" in text


@pytest.mark.parametrize("cls", [CrossStitchConv, MTAN])
@pytest.mark.parametrize("pooled_size", [1, 2, 3])
def test_conv_encoders_pool_to_a_grid(cls, pooled_size: int) -> None:
    encoder = cls(IMAGE, channels=[4, 6], pooled_size=pooled_size)
    encoder.bind_tasks(["a", "b"])
    assert encoder.out_features == dict.fromkeys("ab", 6 * pooled_size**2)
    assert encoder(torch.randn(2, *IMAGE))["b"].shape == (2, 6 * pooled_size**2)
