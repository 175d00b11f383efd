"""Task affinity (TAG): the lookahead math, that training is untouched, the grouping search, the grouped synthetic
data, the planted groups recovered, ``mtl affinity`` and its errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CONFIGS, QUICKSTART, mtl_subprocess
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from mtl_lightning import MultiTaskModule
from mtl_lightning.affinity import cli as affinity_cli
from mtl_lightning.affinity.grouping import (
    MAX_TASKS,
    best_partitions,
    check_grouping_request,
    group_score,
    set_partitions,
)
from mtl_lightning.affinity.run import attach_affinity
from mtl_lightning.balancers import PCGrad
from mtl_lightning.callbacks import ModelCheckpoint, TaskAffinity
from mtl_lightning.callbacks.task_affinity import (
    HEATMAP_TAG,
    PREFIX,
    PROXY_PREFIX,
    affinity_heatmap,
    lookahead_affinity,
    replayed_randomness,
)
from mtl_lightning.console import error_line
from mtl_lightning.data import DataError, SyntheticDataModule
from mtl_lightning.data.synthetic import grouped_task_directions
from mtl_lightning.encoders import MLPEncoder, MMoE
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

NAMES = ["a", "b", "c", "d"]
PLANTED = [["a", "c"], ["b", "d"]]  # not the task order, so that a search that only cuts the list would fail


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The models here are tiny: one thread is faster than two, and far faster when another process shares the cores.
    torch.set_num_threads(1)


def regressions(names: list[str]) -> list[TaskSpec]:
    return [TaskSpec(n, "regression") for n in names]


def grouped_data(seed: int = 0, **overrides: object) -> SyntheticDataModule:
    settings: dict = {
        "num_samples": 4000,
        "num_features": 16,
        "correlation": 0.9,
        "groups": PLANTED,
        "batch_size": 64,
        "seed": seed,
    }
    settings.update(overrides)
    return SyntheticDataModule(regressions(NAMES), **settings)


def mlp_model(tasks: list[TaskSpec], features: int = 16, **encoder: object) -> MultiTaskModule:
    return MultiTaskModule(MLPEncoder((features,), hidden=[64, 32], **encoder), tasks, train_metrics=False)


def fit(model: LightningModule, data: SyntheticDataModule, steps: int, callbacks: list, **trainer: object) -> Trainer:
    settings: dict = {
        "max_steps": steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "callbacks": callbacks,
    }
    settings.update(trainer)
    run = Trainer(**settings)
    run.fit(model, datamodule=data)
    return run


# ------------------------------------------------------------------------------------------ the lookahead math
def scalar_model() -> MultiTaskModule:
    """z = w x with w = 0, heads out_t = 1 * z + 0: L_t = (w x - y_t)^2, dL_t/dw = 2 (w x - y_t) x."""
    model = MultiTaskModule(nn.Linear(1, 1, bias=False), regressions(["a", "b", "c"]))
    with torch.no_grad():
        model.encoder.weight.zero_()
        for head in model.heads.values():
            for p in head.parameters():
                p.fill_(1.0 if p.ndim == 2 else 0.0)
    return model


def hand_affinity(y: list[float], lr: float) -> list[list[float]]:
    """With x = 1 and w = 0: the step on task i gives w' = 2 lr y_i, so Z[i -> j] = 1 - (w' - y_j)^2 / y_j^2."""
    return [[1 - (2 * lr * yi - yj) ** 2 / yj**2 for yj in y] for yi in y]


def test_lookahead_matches_the_hand_computed_linear_case() -> None:
    model = scalar_model()
    y = [1.0, 2.0, -1.0]
    targets = {n: torch.tensor([[v]]) for n, v in zip("abc", y, strict=True)}
    z = lookahead_affinity(model, torch.ones(1, 1), targets, lr=0.1)
    # e.g. Z[a -> c]: w' = 0.2, L_c = (0.2 + 1)^2 = 1.44 after, 1 before: 1 - 1.44 = -0.44
    expected = torch.tensor(hand_affinity(y, 0.1))
    assert expected[0, 2].item() == pytest.approx(-0.44)
    torch.testing.assert_close(z, expected, atol=1e-6, rtol=0)
    # Only the encoder moves: a lookahead on the heads too would change the numbers. Per-parameter rates are the
    # same as one rate; a parameter without a rate stays put (nothing moves: nothing is measured).
    torch.testing.assert_close(lookahead_affinity(model, torch.ones(1, 1), targets, {"encoder.weight": 0.1}), z)
    assert torch.isnan(lookahead_affinity(model, torch.ones(1, 1), targets, {})).all()


def test_lookahead_leaves_tasks_without_labels_unmeasured() -> None:
    model = scalar_model()
    y = [1.0, 2.0, -1.0]
    targets = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[2.0], [2.0]]), "c": torch.full((2, 1), math.nan)}
    z = lookahead_affinity(model, torch.ones(2, 1), targets, lr=0.1)
    assert torch.isnan(z[2]).all() and torch.isnan(z[:, 2]).all()
    torch.testing.assert_close(z[:2, :2], torch.tensor(hand_affinity(y, 0.1))[:2, :2], atol=1e-6, rtol=0)
    # A task absent from the batch, or not among the measured tasks, is the same.
    del targets["c"]
    torch.testing.assert_close(lookahead_affinity(model, torch.ones(2, 1), targets, lr=0.1), z, equal_nan=True)
    z_ab = lookahead_affinity(model, torch.ones(2, 1), {**targets, "c": -torch.ones(2, 1)}, lr=0.1, tasks=["a", "b"])
    torch.testing.assert_close(z_ab, z, equal_nan=True)


def test_lookahead_restores_weights_buffers_and_random_state() -> None:
    torch.manual_seed(0)
    model = mlp_model(regressions(NAMES), dropout=0.5, norm="batch")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(32, 16)
    targets = {n: torch.randn(32, 1) for n in NAMES}
    state = torch.get_rng_state()
    z = lookahead_affinity(model, x, targets, lr=0.05)
    assert torch.isfinite(z).all()
    assert torch.equal(torch.get_rng_state(), state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running statistics included


def test_lookahead_with_per_task_representations() -> None:
    # MMoE: the encoder returns one mixture per task; its gates are task-specific parameters of the encoder, so a
    # step on task i moves i's gate and the shared experts; the weights are left as they were.
    torch.manual_seed(0)
    model = MultiTaskModule(MMoE((16,), num_experts=3, expert_hidden=[16]), regressions(NAMES))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = lookahead_affinity(model, torch.randn(32, 16), {n: torch.randn(32, 1) for n in NAMES}, lr=0.1)
    assert torch.isfinite(z).all() and (z.diagonal() > 0).all()  # a step on a task lowers its own loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_replayed_randomness_gives_every_forward_the_same_dropout_masks() -> None:
    drop = nn.Dropout(0.5)
    with replayed_randomness(drop, torch.device("cpu")) as replay:
        first = drop(torch.ones(100))
        replay()
        again = drop(torch.ones(100))
    assert torch.equal(first, again)
    assert torch.equal(drop(torch.ones(100)), first)  # and the state on exit is the one on entry


# --------------------------------------------------------------------------------------- the callback in a run
def test_training_with_the_callback_is_bit_identical_to_training_without() -> None:
    tasks = [TaskSpec("p", "binary"), TaskSpec("s", "multiclass", num_outputs=3), TaskSpec("r", "regression")]

    def weights(callbacks: list) -> dict[str, torch.Tensor]:
        seed_everything(0, verbose=False)
        data = SyntheticDataModule(tasks, num_samples=600, num_features=16, missing_rate=0.3, batch_size=32)
        model = mlp_model(tasks, dropout=0.2, norm="batch")
        fit(model, data, 8, callbacks)
        return {k: v.clone() for k, v in model.state_dict().items()}

    affinity = TaskAffinity(every_n_steps=1)
    plain, measured = weights([]), weights([affinity])
    assert affinity.measurements == 8
    assert plain.keys() == measured.keys()
    assert all(torch.equal(plain[k], measured[k]) for k in plain), [
        k for k in plain if not torch.equal(plain[k], measured[k])
    ]


def test_gradient_accumulation_measures_once_per_optimizer_step() -> None:
    affinity = TaskAffinity(every_n_steps=2)
    fit(mlp_model(regressions(NAMES)), grouped_data(), 6, [affinity], accumulate_grad_batches=2)
    assert affinity.measurements == 3  # steps 0, 2, 4: the first of each step's two micro-batches


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_groups_are_recovered(seed: int) -> None:
    seed_everything(seed, verbose=False)
    affinity = TaskAffinity(every_n_steps=5)
    fit(mlp_model(regressions(NAMES)), grouped_data(seed), 200, [affinity])
    z = affinity.affinity
    assert affinity.measurements == 40 and torch.isfinite(z).all()
    best = best_partitions(z.tolist(), 2, top=1)[0]
    assert best.named(NAMES) == PLANTED
    inside = [z[0, 2], z[2, 0], z[1, 3], z[3, 1]]
    across = [z[i, j] for i in range(4) for j in range(4) if i != j and {i, j} not in ({0, 2}, {1, 3})]
    assert min(inside) > max(across)


class RecordCosines(Callback):
    """Every cosine matrix the balancer publishes (after the TaskAffinity callback has seen it)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        cosine = pl_module.balancer.last_cosine
        if cosine is not None and not any(cosine is s for s in self.seen):
            self.seen.append(cosine)


def test_cosine_proxy_is_the_mean_of_the_balancers_cosines(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    model = MultiTaskModule(MLPEncoder((16,), hidden=[32]), regressions(NAMES), balancer=PCGrad(), train_metrics=False)
    affinity, record = TaskAffinity(every_n_steps=3), RecordCosines()
    logger = CSVLogger(tmp_path)
    fit(model, grouped_data(), 6, [affinity, record], logger=logger, log_every_n_steps=1)
    assert len(record.seen) == 6
    expected = torch.stack(record.seen).double().mean(0)
    assert affinity.cosine_proxy is not None
    torch.testing.assert_close(affinity.cosine_proxy, expected)
    torch.testing.assert_close(affinity.cosine_proxy.diagonal(), torch.ones(4, dtype=torch.float64))
    # What the loggers got: the running means, at the measured steps (0 and 3; the last again at the end).
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert f"{PREFIX}/a/c" in header and f"{PROXY_PREFIX}/a/c" in header and f"{PROXY_PREFIX}/c/a" not in header


@pytest.mark.parametrize(("num_tasks", "scalars"), [(8, True), (9, False)])
def test_scalars_are_logged_up_to_eight_tasks(tmp_path: Path, num_tasks: int, scalars: bool) -> None:
    names = [f"t{i}" for i in range(num_tasks)]
    data = SyntheticDataModule(regressions(names), num_samples=200, num_features=16, batch_size=32)
    logger = TensorBoardLogger(tmp_path)
    fit(mlp_model(regressions(names)), data, 1, [TaskAffinity()], logger=logger)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    logged = [t for t in events.Tags()["scalars"] if t.startswith(PREFIX + "/")]
    assert len(logged) == (num_tasks**2 if scalars else 0)
    assert events.Tags()["images"] == [HEATMAP_TAG]  # the heatmap always


def test_affinity_heatmap_scales_to_the_largest_off_diagonal_value() -> None:
    image = affinity_heatmap(torch.tensor([[1.0, 0.01], [-0.02, math.nan]]), cell=2)
    assert image.shape == (4, 4, 3)
    assert image[0, 0].tolist() == [255, 0, 0]  # the diagonal, clamped to full red
    assert image[2, 0].tolist() == [0, 0, 255]  # -0.02: the largest |off-diagonal|, full blue
    assert image[0, 2].tolist() == [255, 128, 128]  # +0.01: half way to red
    assert image[2, 2].tolist() == [255, 255, 255]  # NaN: not measured, white


def test_state_survives_a_checkpoint_and_resume(tmp_path: Path) -> None:
    seed_everything(0, verbose=False)
    data, model = grouped_data(), mlp_model(regressions(NAMES))
    first = TaskAffinity(every_n_steps=2)
    fit(model, data, 6, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True)
    assert first.measurements == 3
    resumed = TaskAffinity(every_n_steps=2)
    run = Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[resumed],
        enable_checkpointing=False,
    )
    run.fit(mlp_model(regressions(NAMES)), datamodule=data, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.measurements == 6  # steps 0, 2, 4 from the checkpoint, then 6, 8, 10
    # The first run's sums are in there: a fresh run over steps 6-10 alone would average 3 measurements.
    state = resumed.state_dict()
    assert torch.equal(state["count"], torch.full((4, 4), 6.0, dtype=torch.float64))
    assert state["task_names"] == NAMES


def test_resume_refuses_a_checkpoint_of_other_tasks() -> None:
    other = TaskAffinity()
    other.load_state_dict({**TaskAffinity().state_dict(), "task_names": ["x", "y"]})
    model = mlp_model(regressions(NAMES))
    with pytest.raises(ConfigError, match=r"checkpoint's affinity covers tasks \['x', 'y'\] but the model has"):
        other.on_train_start(SimpleNamespace(), model)  # type: ignore[arg-type]


def test_callback_refuses_bad_settings_and_sharded_strategies() -> None:
    with pytest.raises(ConfigError, match="every_n_steps and cell must be >= 1"):
        TaskAffinity(every_n_steps=0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TaskAffinity(lr=0.0)
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ConfigError, match="does not run under FSDP"):
        TaskAffinity().setup(SimpleNamespace(strategy=FSDPStrategy()), mlp_model(regressions(NAMES)), "fit")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs a MultiTaskModule"):
        TaskAffinity().setup(SimpleNamespace(), LightningModule(), "fit")  # type: ignore[arg-type]


def test_the_preset_builds_the_callback() -> None:
    import yaml

    preset = yaml.safe_load((CONFIGS / "callbacks" / "task_affinity.yaml").read_text())
    assert preset["class_path"] == "mtl_lightning.callbacks.TaskAffinity"
    callback = TaskAffinity(**preset["init_args"])
    assert (callback.every_n_steps, callback.lr) == (10, None)


# ---------------------------------------------------------------------------------------------------- grouping
HAND = [  # a <-> b and c <-> d help each other; across the pairs little or harm
    [9.0, 0.5, 0.0, -0.1],
    [0.4, 9.0, 0.1, 0.0],
    [0.0, 0.0, 9.0, 0.3],
    [-0.2, 0.1, 0.2, 9.0],
]


def test_best_partition_of_a_hand_made_matrix() -> None:
    proposals = best_partitions(HAND, 2, top=3)
    best = proposals[0]
    assert best.groups == ((0, 1), (2, 3))
    # onto a: Z[b->a] = 0.4, onto b: 0.5, onto c: Z[d->c] = 0.2, onto d: 0.3; the diagonal is never read
    assert best.per_task == pytest.approx((0.4, 0.5, 0.2, 0.3))
    assert best.score == pytest.approx(1.4)
    # {a, b, c} {d}: onto a (0.4 + 0) / 2, onto b (0.5 + 0) / 2, onto c (0 + 0.1) / 2, d alone 0
    assert group_score(HAND, (0, 1, 2)) == pytest.approx(0.5)
    assert [p.score for p in proposals] == sorted((p.score for p in proposals), reverse=True)
    assert len({p.groups for p in proposals}) == 3


def test_extreme_group_counts() -> None:
    assert best_partitions(HAND, 4, top=5) == best_partitions(HAND, 4, top=1)  # one partition: all alone
    assert best_partitions(HAND, 4)[0].score == 0.0
    together = best_partitions(HAND, 1)[0]
    assert together.groups == ((0, 1, 2, 3),)
    assert together.score == pytest.approx(sum(HAND[i][j] for i in range(4) for j in range(4) if i != j) / 3)


STIRLING = {(4, 2): 7, (5, 2): 15, (6, 3): 90, (7, 4): 350, (10, 5): 42525}


@pytest.mark.parametrize(("n", "k"), sorted(STIRLING))
def test_set_partitions_are_every_partition_once(n: int, k: int) -> None:
    found = list(set_partitions(n, k))
    assert len(found) == STIRLING[(n, k)] == len(set(found))
    assert all(sorted(i for g in p for i in g) == list(range(n)) and len(p) == k for p in found)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_agrees_with_brute_force_over_labelings(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 6, generator=gen).tolist()
    best = -math.inf
    for labels in itertools.product(range(3), repeat=6):
        if len(set(labels)) == 3:
            groups = [[i for i in range(6) if labels[i] == g] for g in range(3)]
            best = max(best, sum(group_score(z, g) for g in groups))
    assert best_partitions(z, 3, top=1)[0].score == pytest.approx(best)


def test_grouping_errors() -> None:
    with pytest.raises(ConfigError, match=r"between 1 and the number of tasks \(4\), got 0"):
        best_partitions(HAND, 0)
    with pytest.raises(ConfigError, match=r"between 1 and the number of tasks \(4\), got 5"):
        best_partitions(HAND, 5)
    with pytest.raises(ConfigError, match="needs at least 2 tasks; the config has 1"):
        check_grouping_request(1, 1)
    with pytest.raises(ConfigError, match=f"limited to {MAX_TASKS} tasks.*got {MAX_TASKS + 1}"):
        check_grouping_request(MAX_TASKS + 1, 2)
    with pytest.raises(ValueError, match=r"entries \[\(0, 1\)\] \(row -> column\) are not finite"):
        best_partitions([[0.0, math.nan], [0.0, 0.0]], 1)
    with pytest.raises(ValueError, match="must be square"):
        best_partitions([[0.0, 1.0]], 1)


# ------------------------------------------------------------------------------------------ grouped synthetic data
def test_grouped_directions_correlate_inside_groups_only() -> None:
    group_of = [0, 1, 0, 1, 1, 2]
    w = grouped_task_directions(16, group_of, 0.7, 2.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(w.norm(dim=1), torch.full((6,), 2.0), atol=1e-5, rtol=0)
    unit = w / w.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    for s, t in itertools.combinations(range(6), 2):
        assert cos[s, t].item() == pytest.approx(0.7 if group_of[s] == group_of[t] else 0.0, abs=1e-5)


def test_grouped_data_has_the_planted_correlation_structure() -> None:
    data = grouped_data(num_samples=20000, noise=0.0).generate()
    y = torch.stack([data.targets[n].flatten() for n in NAMES])
    corr = torch.corrcoef(y)
    assert corr[0, 2] > 0.7 and corr[1, 3] > 0.7
    assert max(abs(corr[i, j]) for i, j in [(0, 1), (0, 3), (1, 2), (2, 3)]) < 0.05


def test_default_data_is_unchanged_by_the_groups_option() -> None:
    # The first values the generator gave for these settings before `groups` existed (same seed, same draws).
    tasks = [TaskSpec("a", "regression"), TaskSpec("b", "binary")]
    data = SyntheticDataModule(tasks, num_samples=500, num_features=8, missing_rate=0.2, seed=7).generate()
    nan = math.nan
    torch.testing.assert_close(
        data.inputs[0, :3], torch.tensor([-2.257782220840454, 0.40429842472076416, 0.5721989870071411])
    )
    torch.testing.assert_close(
        data.targets["a"][:4].flatten(),
        torch.tensor([-1.446205496788025, nan, -0.6763238906860352, -0.6003437638282776]),
        equal_nan=True,
    )
    torch.testing.assert_close(
        data.targets["b"][:8].flatten(), torch.tensor([nan, nan, 0, 1, 0, 0, 1, 1.0]), equal_nan=True
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([["a", "x"], ["b", "c", "d"]], r"groups\[0\] names unknown task 'x'; the tasks are \['a', 'b', 'c', 'd'\]"),
        ([["a", "b"], ["b", "c", "d"]], r"task 'b' is in groups\[0\] and groups\[1\]"),
        ([["a", "a", "b"], ["c", "d"]], r"task 'a' is twice in that group"),
        ([["a", "b"], ["c"]], r"tasks \['d'\] are in no group.*e\.g\. \[d\]"),
        ([["a", "b", "c", "d"], []], r"groups\[1\] is empty"),
        ([], "groups is empty"),
        ("abcd", "groups must be a list of lists of task names"),
        ([["a", "b"], "cd"], "groups must be a list of lists of task names"),
    ],
)
def test_bad_groups_are_one_clear_error(groups: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        grouped_data(groups=groups)


def test_grouped_data_needs_features_for_orthogonal_groups() -> None:
    with pytest.raises(
        DataError,
        match=r"num_features must be >= number of groups \+ number of tasks \(6\) for orthogonal groups, got 5",
    ):
        grouped_data(num_features=5)


# ------------------------------------------------------------------------------------------------ mtl affinity
GROUPED_DATA = """
class_path: mtl_lightning.data.SyntheticDataModule
init_args:
  num_samples: 3000
  num_features: 16
  correlation: 0.9
  groups: [[a, c], [b, d]]
  batch_size: 64
  tasks: [{name: a, kind: regression}, {name: b, kind: regression}, {name: c, kind: regression},
          {name: d, kind: regression}]
"""


def affinity_args(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "grouped.yaml"
    data.write_text(GROUPED_DATA)
    return [
        *("--config", str(QUICKSTART), "--data", str(data), "--out", str(tmp_path / "out"), *extra),
        *("--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
    ]


def test_mtl_affinity_proposes_the_planted_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = affinity_args(tmp_path, "--groups", "2", "--top", "3", "--every_n_steps", "4", "--trainer.max_steps", "120")
    assert affinity_cli.main(args) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "affinity.json").read_text())
    assert result["tasks"] == NAMES and result["num_groups"] == 2
    assert result["measurements"] == 30 and result["every_n_steps"] == 4 and result["steps"] == 120
    assert len(result["proposals"]) == 3 and result["proposals"][0]["groups"] == PLANTED
    total = result["proposals"][0]["total_affinity"]
    z = result["affinity"]
    assert total == pytest.approx(z[2][0] + z[0][2] + z[3][1] + z[1][3])
    assert "best partitions into 2 group(s)" in out and "{a, c}  {b, d}" in out
    assert result["cosine_proxy"] is None  # the quickstart's balancer weighs losses: no gradient telemetry


def test_attach_affinity_adds_one_callback_or_adjusts_the_configs() -> None:
    checkpoint = ModelCheckpoint()
    trainer = SimpleNamespace(callbacks=[checkpoint])
    added = attach_affinity(trainer, None, None)  # type: ignore[arg-type]
    assert trainer.callbacks == [added, checkpoint] and added.every_n_steps == 10
    assert attach_affinity(trainer, None, None) is added  # type: ignore[arg-type]
    changed = attach_affinity(trainer, 3, 0.5)  # type: ignore[arg-type]
    assert trainer.callbacks == [changed, checkpoint] and (changed.every_n_steps, changed.lr) == (3, 0.5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--groups", "0"], "--groups must be >= 1, got 0"),
        (
            ["--groups", "4"],
            r"--groups 4 is more than the config's 3 tasks \['purchase', 'segment', 'spend'\]; give at most 3",
        ),
        (["--top", "0"], "--top must be >= 1, got 0"),
        (
            ["--data.init_args.tasks", '[{"name": "a", "kind": "regression"}]'],
            "needs at least 2 tasks; the config has 1",
        ),
        (["fit"], "drop the command name 'fit'"),
        (["--groups", "two"], "argument --groups: invalid int value"),
    ],
)
def test_mtl_affinity_bad_input_is_one_error_before_training(
    tmp_path: Path, extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained despite bad input"))
    args = ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), *extra]
    with pytest.raises(ConfigError, match=message) as err:
        affinity_cli.main(args)
    line = error_line(err.value)
    assert line is not None and "\n" not in line


@pytest.mark.integration  # `python -m mtl_lightning affinity` in subprocesses: the console's one line; DDP on 2 ranks
def test_mtl_affinity_from_the_console_and_under_ddp(tmp_path: Path) -> None:
    proc = mtl_subprocess(["affinity", "--groups", "0"], timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mtl: error: mtl affinity: --groups must be >= 1, got 0"
    dump = tmp_path / "dump"
    args = affinity_args(tmp_path, "--groups", "2", "--every_n_steps", "4", "--trainer.max_steps", "60")
    args += ["--trainer", str(CONFIGS / "trainer" / "ddp_cpu.yaml"), "--data.init_args.batch_size", "32"]
    args += [
        "--trainer.callbacks+",
        json.dumps({"class_path": "test_affinity.DumpAffinity", "init_args": {"out": str(dump)}}),
    ]
    proc = mtl_subprocess(["affinity", *args], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1]) and torch.isfinite(ranks[0]).all()  # every rank holds the same mean
    result = json.loads((tmp_path / "out" / "affinity.json").read_text())
    assert torch.equal(torch.tensor(result["affinity"], dtype=torch.float64), ranks[0])
    assert result["proposals"][0]["groups"] == PLANTED


class DumpAffinity(Callback):
    """For the DDP test (imported by the CLI's subprocess from ``tests/``): each rank's mean affinity at the end."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, TaskAffinity))  # type: ignore[attr-defined]
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(callback.affinity, self.out / f"rank{trainer.global_rank}.pt")
