"""Checkpoint and seed ensembles (mtl_lightning/ensemble.py): averaging per kind in prediction space, the same logged
names and values as a single model for an ensemble of one, the members' mean for three, refusals of checkpoints that
cannot be averaged, and the CLI surfaces (mtl test / predict / export)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, QUICKSTART, SMALL_DATA, run_cli

from mtl_lightning import export
from mtl_lightning.ensemble import EnsembleError, MultiTaskEnsemble, check_members, load_ensemble, load_member
from mtl_lightning.errors import ConfigError
from mtl_lightning.kinds import KindError, TaskKind, get_kind
from mtl_lightning.tasks import TaskSpec

ENSEMBLE = "mtl_lightning.ensemble.MultiTaskEnsemble"
WRITER = str(CONFIGS / "callbacks" / "prediction_writer.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------- the kinds
KIND_SPECS = [
    TaskSpec("b", "binary"),
    TaskSpec("ml", "multilabel", num_outputs=3),
    TaskSpec("mc", "multiclass", num_outputs=4),
    TaskSpec("r", "regression", num_outputs=2),
    TaskSpec("c", "count"),
]


@pytest.mark.parametrize("spec", KIND_SPECS, ids=lambda s: s.kind)
def test_averaged_output_predicts_the_mean_of_the_members_predictions(spec: TaskSpec) -> None:
    kind = spec.task_kind
    generator = torch.Generator().manual_seed(0)
    outputs = 3 * torch.randn(3, *kind.output_shape(spec, 16), generator=generator, dtype=torch.float64)
    averaged = kind.average_outputs(spec, outputs)
    assert averaged.shape == outputs.shape[1:]
    want = torch.stack([kind.predictions(spec, o) for o in outputs]).mean(0)
    torch.testing.assert_close(kind.predictions(spec, averaged), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind_name", ["binary", "multilabel"])
def test_confident_members_keep_a_finite_logit_and_loss(kind_name: str) -> None:
    # logit(mean(sigmoid)) would be inf here (the mean probability rounds to 1 in float32) and the BCE loss NaN.
    spec = TaskSpec("t", kind_name, num_outputs=None if kind_name == "binary" else 2)
    outputs = torch.full((3, *spec.task_kind.output_shape(spec, 4)), 40.0)
    averaged = spec.task_kind.average_outputs(spec, outputs)
    assert torch.isfinite(averaged).all()
    assert torch.isfinite(F.binary_cross_entropy_with_logits(averaged, torch.zeros_like(averaged)))


class _CalibratedKind(TaskKind):
    """A user's kind with predictions of its own and no averaging rule."""

    def predictions(self, spec: TaskSpec, output: torch.Tensor) -> torch.Tensor:
        return output.tanh()


def test_a_kind_with_its_own_predictions_must_say_how_to_average() -> None:
    spec = TaskSpec("t", "regression")
    with pytest.raises(KindError, match=r"task 't'.*override TaskKind.average_outputs"):
        _CalibratedKind().average_outputs(spec, torch.zeros(2, 3))
    # The regression kind, whose predictions are its outputs, averages them.
    torch.testing.assert_close(
        get_kind("regression").average_outputs(spec, torch.tensor([[1.0], [3.0]])), torch.tensor([2.0])
    )


# -------------------------------------------------------------------------------------------- the members
@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three quickstart models that differ only in their seed, trained for a few steps."""
    paths = []
    for seed in SEEDS:
        root = tmp_path_factory.mktemp(f"seed{seed}")
        args = ["fit", "--config", str(QUICKSTART), *SMALL_DATA, "--seed_everything", str(seed)]
        args += ["--trainer.max_steps", "6", "--trainer.limit_val_batches", "1", *QUIET[:2]]
        cli = run_cli([*args, "--trainer.logger.init_args.save_dir", str(root / "runs")], root)
        paths.append(Path(cli.trainer.checkpoint_callback.last_model_path))  # type: ignore[union-attr]
    return paths


@pytest.fixture(scope="module")
def single_test(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """``mtl test --ckpt_path`` of the first member: the single model's logged test values."""
    root = tmp_path_factory.mktemp("single")
    cli = run_cli(["test", "--config", str(QUICKSTART), *SMALL_DATA, "--ckpt_path", str(members[0]), *QUIET], root)
    return dict(cli.trainer.callback_metrics)


def _ensemble_test(paths: list[Path], root: Path) -> object:
    listed = "[" + ",".join(map(str, paths)) + "]"
    args = ["test", "--config", str(QUICKSTART), *SMALL_DATA, "--model", ENSEMBLE]
    return run_cli([*args, "--model.checkpoints", listed, *QUIET], root)


def _test_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from conftest import build_cli

    data = build_cli(*SMALL_DATA).datamodule
    data.setup("test")
    split = data.datasets["test"]
    return split.inputs, dict(split.targets)


def _predict(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.predict_step({"inputs": inputs}, 0)  # type: ignore[operator]


def test_an_ensemble_of_one_is_the_single_model(members: list[Path], single_test: dict, tmp_path: Path) -> None:
    logged = dict(_ensemble_test(members[:1], tmp_path).trainer.callback_metrics)  # type: ignore[attr-defined]
    assert sorted(logged) == sorted(single_test)
    for name, value in single_test.items():
        assert torch.equal(logged[name], value), name
    inputs, _ = _test_inputs()
    ensemble, single = _predict(load_ensemble(members[:1]), inputs), _predict(load_member(members[0]), inputs)
    for name, value in single.items():
        assert torch.equal(ensemble[name], value), name


def test_three_members_predict_their_mean_and_log_a_single_models_names(
    members: list[Path], single_test: dict, tmp_path: Path
) -> None:
    inputs, targets = _test_inputs()
    each = [_predict(load_member(p), inputs) for p in members]
    got = _predict(load_ensemble(members), inputs)
    assert list(got) == ["purchase", "segment", "spend"]  # binary, multiclass, regression
    for name in got:
        assert not torch.allclose(each[0][name], each[1][name])  # the seeds made different models
        torch.testing.assert_close(got[name], torch.stack([p[name] for p in each]).mean(0), rtol=1e-5, atol=1e-6)

    logged = dict(_ensemble_test(members, tmp_path).trainer.callback_metrics)  # type: ignore[attr-defined]
    assert sorted(logged) == sorted(single_test)  # test/loss, test/<task>/loss, test/<task>/<metric>
    # The logged values are those of the averaged predictions.
    y, labelled = targets["spend"].reshape(-1), ~targets["spend"].reshape(-1).isnan()
    mse = ((got["spend"].reshape(-1) - y)[labelled] ** 2).mean()
    torch.testing.assert_close(logged["test/spend/mse"], mse, rtol=1e-5, atol=1e-6)
    y, labelled = targets["purchase"].reshape(-1), ~targets["purchase"].reshape(-1).isnan()
    bce = F.binary_cross_entropy(got["purchase"][labelled].double(), y[labelled].double())
    torch.testing.assert_close(logged["test/purchase/loss"].double(), bce, rtol=1e-4, atol=1e-6)
    y = targets["segment"]
    nll = F.nll_loss(got["segment"][y != -100].log(), y[y != -100])
    torch.testing.assert_close(logged["test/segment/loss"], nll, rtol=1e-4, atol=1e-6)
    accuracy = (got["segment"].argmax(1)[y != -100] == y[y != -100]).float().mean()
    torch.testing.assert_close(logged["test/segment/accuracy"], accuracy)


def test_mtl_predict_writes_the_ensembles_predictions(members: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    listed = "[" + ",".join(map(str, members)) + "]"
    args = ["predict", "--config", str(QUICKSTART), *SMALL_DATA, "--model", ENSEMBLE, "--model.init_args.checkpoints"]
    args += [listed, *QUIET, "--trainer.callbacks+", WRITER, "--trainer.callbacks.output_path", str(out)]
    cli = run_cli(args, tmp_path)
    frame = pd.read_csv(out)
    inputs = cli.datamodule.datasets["predict"].inputs[frame["id"].to_numpy()]  # type: ignore[attr-defined]
    want = _predict(load_ensemble(members), inputs)
    np.testing.assert_allclose(frame["spend"].to_numpy(), want["spend"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame["purchase_prob"].to_numpy(), want["purchase"].numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- refusals
def _edited(path: Path, out: Path, edit) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, out)
    return out


def _drop_spend(checkpoint: dict) -> None:
    checkpoint["hyper_parameters"]["tasks"] = [
        t for t in checkpoint["hyper_parameters"]["tasks"] if t["name"] != "spend"
    ]
    for key in [k for k in checkpoint["state_dict"] if ".spend." in k or k.startswith("heads.spend")]:
        del checkpoint["state_dict"][key]


def _spend_as_count(checkpoint: dict) -> None:
    for task in checkpoint["hyper_parameters"]["tasks"]:
        if task["name"] == "spend":
            task["kind"] = "count"


def test_members_with_other_tasks_are_refused_naming_the_checkpoint(members: list[Path], tmp_path: Path) -> None:
    fewer = _edited(members[1], tmp_path / "fewer.ckpt", _drop_spend)
    with pytest.raises(
        EnsembleError, match=rf"member {re.escape(str(fewer))} cannot be averaged with .*: it lacks \['spend'\]"
    ):
        load_ensemble([members[0], fewer])
    counted = _edited(members[1], tmp_path / "count.ckpt", _spend_as_count)
    with pytest.raises(EnsembleError, match=r"declares spend \(count, 1 outputs instead of regression, 1 outputs\)"):
        load_ensemble([members[0], counted])


def test_members_reading_other_inputs_are_refused(members: list[Path]) -> None:
    first, other = load_member(members[0]), load_member(members[1])
    config = dict(other.saved_encoder_config)  # type: ignore[arg-type]
    other.saved_encoder_config = {**config, "init_args": {**config["init_args"], "input_shape": [32]}}  # type: ignore[assignment]
    with pytest.raises(EnsembleError, match=r"reads other inputs .* its input shape is \(32,\), not \(64,\)"):
        check_members([str(members[0]), "other.ckpt"], [first, other])


def test_data_with_other_tasks_is_refused(members: list[Path]) -> None:
    with pytest.raises(EnsembleError, match=r"but the data lacks \['spend'\]"):
        MultiTaskEnsemble(
            [str(members[0])], tasks=[TaskSpec("purchase", "binary"), TaskSpec("segment", "multiclass", 4)]
        )
    with pytest.raises(EnsembleError, match="at least one checkpoint"):
        MultiTaskEnsemble([])


def test_the_cli_refuses_a_ckpt_path_and_fitting_an_ensemble(members: list[Path], tmp_path: Path) -> None:
    base = ["--config", str(QUICKSTART), *SMALL_DATA, "--model", ENSEMBLE, *QUIET]
    base += ["--model.init_args.checkpoints", f"[{members[0]}]"]
    with pytest.raises(ConfigError, match=r"--ckpt_path .* cannot be given with a model that loads its weights"):
        run_cli(["test", *base, "--ckpt_path", str(members[0])], tmp_path)
    with pytest.raises(EnsembleError, match="not trained itself"):
        run_cli(["fit", *base, "--trainer.max_steps", "1"], tmp_path)


# ------------------------------------------------------------------------------------------------- export
def test_exported_ensemble_runs_in_onnxruntime_and_averages_the_members(members: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ensemble.onnx"
    with pytest.raises(export.ExportError, match="give --output"):
        export.main(["--ckpt_path", *map(str, members)])
    assert export.main(["--ckpt_path", *map(str, members), "--output", str(out)]) == 0  # its check compares to eager
    inputs, _ = _test_inputs()
    got = export.run_onnx(out, inputs[:50])
    each = [_predict(load_member(p), inputs[:50]) for p in members]
    for name, value in got.items():
        torch.testing.assert_close(value, torch.stack([p[name] for p in each]).mean(0), rtol=1e-4, atol=1e-5)
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert metadata["mtl_ensemble"] == "[" + ", ".join(f'"{p}"' for p in members) + "]"
