"""The public contracts (mtl_lightning.contracts) and the per-task encoder base: which built-in classes meet which
protocol, out_features around bind_tasks, a user's encoder without hooks and a per-task encoder in a few lines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
from conftest import REPO
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader

from mtl_lightning import MultiTaskModule, contracts
from mtl_lightning.balancers import EqualWeighting, UPGrad
from mtl_lightning.callbacks import GradientConflictHeatmap, ThroughputTimer
from mtl_lightning.callbacks.conflict_heatmap import TAG
from mtl_lightning.callbacks.throughput import model_flops_per_sample
from mtl_lightning.data import MultiTaskTensorDataset, SyntheticDataModule, collate_batch
from mtl_lightning.encoders import (
    CGC,
    MTAN,
    PLE,
    CrossStitch,
    CrossStitchConv,
    CrossTaskAttention,
    HFEncoder,
    MLPEncoder,
    MMoE,
    PartialSharing,
    PerTaskEncoder,
    ResNetEncoder,
    SharedBottom,
    SmallCNN,
    TaskConditioned,
    TransformerEncoder,
)
from mtl_lightning.tasks import TaskSpec

FLAT = (6,)
IMAGE = (3, 8, 8)
SPECS = [TaskSpec("ta", "binary"), TaskSpec("tb", "regression")]
TINY_BERT = REPO / "mtl_lightning" / "data" / "examples" / "text_tiny" / "model"

BIND, FSDP, LOGS = contracts.SupportsBindTasks, contracts.SupportsFSDPUnits, contracts.SupportsTrainingLogs
FLOPS, SHAPE, VOCAB = contracts.SupportsFlopsPerSample, contracts.HasInputShape, contracts.HasVocabSize
ENCODER_PROTOCOLS = (contracts.Encoder, BIND, FSDP, LOGS, FLOPS, SHAPE, VOCAB)
# name -> (tiny factory, input shape, the optional hooks it claims; every encoder claims contracts.Encoder).
ENCODERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], set[type]]] = {
    "mlp": (lambda: MLPEncoder(FLAT, hidden=[8]), FLAT, set()),
    "cnn": (lambda: SmallCNN(IMAGE, channels=[4], fc_width=8), IMAGE, {SHAPE}),
    "resnet": (lambda: ResNetEncoder(IMAGE), IMAGE, {FSDP}),
    "transformer": (
        lambda: TransformerEncoder((5,), vocab_size=11, d_model=8, num_layers=1, num_heads=2),
        (5,),
        {FSDP, FLOPS, VOCAB},
    ),
    # The tiny BERT config that ships with the text example, random weights.
    "hf": (lambda: HFEncoder((5,), str(TINY_BERT), pretrained=False), (5,), {FSDP, VOCAB}),
    "shared_bottom": (lambda: SharedBottom(FLAT, shared=[8], tower=[4]), FLAT, {BIND, FSDP}),
    "partial_sharing": (lambda: PartialSharing(FLAT, hidden=[8, 4], shared_layers=1), FLAT, {BIND, FSDP}),
    "mmoe": (lambda: MMoE(FLAT, num_experts=2, expert_hidden=[4]), FLAT, {BIND, FSDP, LOGS}),
    "cgc": (lambda: CGC(FLAT, expert_hidden=[4]), FLAT, {BIND, FSDP, LOGS}),
    "ple": (lambda: PLE(FLAT, num_levels=2, expert_hidden=[4]), FLAT, {BIND, FSDP, LOGS}),
    "cross_stitch": (lambda: CrossStitch(FLAT, hidden=[4]), FLAT, {BIND, FSDP, LOGS}),
    "cross_stitch_conv": (lambda: CrossStitchConv(IMAGE, channels=[4, 4], pooled_size=1), IMAGE, {BIND, FSDP, LOGS}),
    "cross_attention": (lambda: CrossTaskAttention(FLAT, hidden=[4], num_heads=2), FLAT, {BIND, FSDP, LOGS}),
    "mtan": (lambda: MTAN(IMAGE, channels=[4, 4], pooled_size=1), IMAGE, {BIND, FSDP, LOGS}),
    "task_conditioned": (lambda: TaskConditioned(FLAT, hidden=[4], embedding_dim=2), FLAT, {BIND}),
}
PER_TASK = [name for name, (_, _, hooks) in ENCODERS.items() if BIND in hooks]


def sample(shape: tuple[int, ...], encoder: nn.Module, n: int = 4) -> Tensor:
    g = torch.Generator().manual_seed(0)
    if isinstance(encoder, VOCAB):
        return torch.randint(0, encoder.vocab_size, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


def loader(shape: tuple[int, ...], n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    targets = {"ta": torch.randint(0, 2, (n,), generator=g).float(), "tb": torch.randn(n, generator=g)}
    return DataLoader(MultiTaskTensorDataset(x, targets), batch_size=4, collate_fn=collate_batch)


def quiet_trainer(**kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- built-in classes
@pytest.mark.parametrize("name", ENCODERS)
def test_each_builtin_encoder_meets_exactly_the_protocols_it_claims(name: str) -> None:
    factory, shape, hooks = ENCODERS[name]
    encoder = factory()
    claimed = {contracts.Encoder, *hooks}
    assert {p for p in ENCODER_PROTOCOLS if isinstance(encoder, p)} == claimed
    if isinstance(encoder, BIND):
        encoder.bind_tasks(["ta", "tb"])
    if isinstance(encoder, FSDP):
        units = list(encoder.fsdp_units())
        assert units and all(any(u is m for m in encoder.modules()) for u in units)  # submodules of the encoder
    if isinstance(encoder, LOGS):  # the same keys before and after a training forward
        before = set(encoder.training_logs())
        encoder.train()(sample(shape, encoder))
        assert set(encoder.training_logs()) == before and before
    if isinstance(encoder, FLOPS):
        assert encoder.flops_per_sample() > 0


def test_builtin_balancers_and_data_modules_meet_their_protocols() -> None:
    gradient, weighting = UPGrad(), EqualWeighting()
    for balancer in (gradient, weighting):
        balancer.bind(SPECS)
    assert isinstance(gradient, contracts.HasGradientTelemetry) and isinstance(gradient, contracts.HasGradientMode)
    assert (
        gradient.last_cosine is None
        and list(gradient.task_names) == ["ta", "tb"]
        and gradient.mode
        in (
            "representation",
            "parameter",
        )
    )
    assert not isinstance(weighting, contracts.HasGradientTelemetry)
    assert not isinstance(weighting, contracts.HasGradientMode)
    data = SyntheticDataModule(tasks=SPECS, num_samples=64, num_features=FLAT[0])
    assert isinstance(data, contracts.MultiTaskData) and tuple(data.input_shape) == FLAT
    assert not isinstance(data, contracts.HasSplitRows) and not isinstance(data, contracts.HasClassNames)


# ---------------------------------------------------------------------------------------- per-task encoders
@pytest.mark.parametrize("name", PER_TASK)
def test_per_task_out_features_are_valid_only_after_bind_tasks(name: str) -> None:
    factory, shape, _ = ENCODERS[name]
    encoder = factory()
    assert isinstance(encoder, PerTaskEncoder)
    assert encoder.out_features == {}
    with pytest.raises(RuntimeError, match="no tasks yet: call bind_tasks"):
        encoder(sample(shape, encoder))
    encoder.bind_tasks(["ta", "tb"])
    width = encoder.out_features["ta"]
    assert encoder.out_features == {"ta": width, "tb": width} and width >= 1
    kept = {k: v.clone() for k, v in encoder.state_dict().items() if ".tb" in k or k.endswith("from_tb")}
    encoder.bind_tasks(["tb", "tc"])  # ta goes, tc comes, tb keeps its parts
    assert encoder.out_features == {"tb": width, "tc": width}
    state = encoder.state_dict()
    assert not any(".ta." in k or k.endswith((".ta", "from_ta")) for k in state)
    assert all(torch.equal(state[k], v) for k, v in kept.items() if k in state)
    out = encoder.eval()(sample(shape, encoder))
    assert list(out) == ["tb", "tc"] and all(o.shape == (4, width) for o in out.values())
    with pytest.raises(ValueError, match="distinct task names"):
        encoder.bind_tasks(["tb", "tb"])


def test_new_task_parts_follow_the_encoder_dtype() -> None:
    encoder = MMoE(FLAT, num_experts=2, expert_hidden=[4])
    encoder.bind_tasks(["ta"])
    encoder.double()
    encoder.bind_tasks(["ta", "tb"])
    assert encoder.gates["tb"].weight.dtype == torch.float64


class Towers(PerTaskEncoder):
    """The example of PerTaskEncoder's docstring: a shared trunk and one linear tower per task."""

    def __init__(self, input_shape: Sequence[int], width: int = 8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.towers = nn.ModuleDict()
        self.task_features = width

    def bind_parts(self, names: list[str]) -> None:
        self.towers = self.per_task(self.towers, lambda _: nn.Linear(self.task_features, self.task_features))

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {t: tower(h) for t, tower in self.towers.items()}


def test_a_per_task_encoder_in_a_few_lines_works_in_multitask_module() -> None:
    torch.manual_seed(0)
    encoder = Towers(FLAT)
    model = MultiTaskModule(encoder=encoder, tasks=SPECS)
    assert encoder.task_names == ["ta", "tb"] and encoder.out_features == {"ta": 8, "tb": 8}
    assert {k for k in model.state_dict() if k.startswith("encoder.towers.")} == {
        f"encoder.towers.{t}.{p}" for t in ("ta", "tb") for p in ("weight", "bias")
    }
    out = model(torch.randn(3, *FLAT))
    assert set(out) == {"ta", "tb"} and out["ta"].shape[0] == 3
    tower_b = encoder.towers["tb"]
    model.add_task(TaskSpec("tc", "multiclass", num_outputs=3))
    assert encoder.towers["tb"] is tower_b and list(encoder.towers) == ["ta", "tb", "tc"]
    assert model(torch.randn(3, *FLAT))["tc"].shape == (3, 3)
    model.remove_task("tc")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(model, loader(FLAT), loader(FLAT))
    assert trainer.global_step == 2
    assert all(not torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # every part trained


def test_a_per_task_encoder_that_forgets_task_features_says_so() -> None:
    class NoWidth(PerTaskEncoder):
        def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
            return {}

    encoder = NoWidth()
    assert encoder.out_features == {}  # nothing bound: nothing to report yet
    encoder.bind_tasks(["ta"])
    with pytest.raises(TypeError, match=r"must set self\.task_features"):
        _ = encoder.out_features
    with pytest.raises(TypeError, match="abstract"):
        PerTaskEncoder()  # type: ignore[abstract]


# --------------------------------------------------------------------------- a user's encoder without hooks
class Plain(nn.Module):
    """The least an encoder needs: a forward and out_features, no optional hook."""

    def __init__(self, input_shape: Sequence[int], width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Counted(Plain):
    def flops_per_sample(self) -> int:
        return 1000


def test_throughput_counts_flops_with_or_without_the_hook() -> None:
    plain = MultiTaskModule(encoder=Plain(FLAT), tasks=SPECS)
    assert {p for p in ENCODER_PROTOCOLS if isinstance(plain.encoder, p)} == {contracts.Encoder}
    params = sum(p.numel() for p in plain.encoder.parameters()) + sum(p.numel() for p in plain.heads.parameters())
    assert model_flops_per_sample(plain) == (6 * params, "6 * (encoder + head) params")
    counted = MultiTaskModule(encoder=Counted(FLAT), tasks=SPECS)
    heads = sum(p.numel() for p in counted.heads.parameters())
    assert model_flops_per_sample(counted) == (1000 + 6 * heads, "Counted.flops_per_sample() + 6 * head params")


def test_a_plain_encoder_trains_under_the_throughput_and_heatmap_callbacks() -> None:
    model = MultiTaskModule(encoder=Plain(FLAT), tasks=SPECS)  # loss weighting: no gradient telemetry
    timer = ThroughputTimer(warmup=1)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[timer, GradientConflictHeatmap(1)])
    trainer.fit(model, loader(FLAT), loader(FLAT))
    assert trainer.global_step == 3 and timer.result["timed_steps"] == 2
    assert timer.result["flops_method"] == "6 * (encoder + head) params"


def test_heatmap_reads_any_balancer_with_gradient_telemetry(tmp_path: Any) -> None:
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="heat")
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, loggers=[logger])
    callback = GradientConflictHeatmap(every_n_steps=1)
    telemetry = SimpleNamespace(last_cosine=torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), task_names=["ta", "tb"])
    assert isinstance(telemetry, contracts.HasGradientTelemetry)  # no GradientBalancer needed, only the members
    for module in (SimpleNamespace(), SimpleNamespace(balancer=EqualWeighting()), SimpleNamespace(balancer=telemetry)):
        callback.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    images = events.Images(TAG)
    assert len(images) == 1 and (images[0].width, images[0].height) == (48, 48)
