"""Model compression: scheduled pruning (callback presets), dynamic int8 quantisation, SVD factorisation, the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import CONFIGS, QUICKSTART, run_cli
from lightning.pytorch import Trainer
from torch.ao.nn.quantized import dynamic as nnqd

from mtl_lightning import MultiTaskModule
from mtl_lightning.compression import ScheduledPruning, parameter_counts, sparsity_report
from mtl_lightning.compression.checkpoint import load_compressed, read_checkpoint, save_compressed
from mtl_lightning.compression.cli import main as compress
from mtl_lightning.compression.lowrank import apply_svd, factorize_linear, rank_for_energy, svd_record
from mtl_lightning.compression.quantize import available_backends, quantize_model
from mtl_lightning.encoders import MLPEncoder
from mtl_lightning.errors import ConfigError

FIT = ["fit", "--config", str(QUICKSTART), "--data.init_args.num_samples", "1500", "--data.init_args.batch_size"]
FIT += ["128", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LINEARS = ["encoder.net.0", "encoder.net.4", "heads.purchase.net.0", "heads.segment.net.0", "heads.spend.net.0"]


def _fit(root: Path, epochs: int, *extra: str):
    return run_cli(
        [*FIT, "--trainer.max_epochs", str(epochs), "--trainer.logger.init_args.save_dir", str(root), *extra], root
    )


@pytest.fixture(autouse=True)
def _keep_quantized_engine():
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A briefly trained quickstart model, its best checkpoint and its data module."""
    root = tmp_path_factory.mktemp("dense")
    cli = _fit(root, 2)
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    data = cli.datamodule
    batch = next(iter(data.test_dataloader()))
    return {"ckpt": ckpt, "data": data, "x": batch["inputs"]}


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


def _predict(model: MultiTaskModule, data) -> list[dict[str, torch.Tensor]]:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.predict(model, dataloaders=data.predict_dataloader())


# ------------------------------------------------------------------------------------------------ pruning
@pytest.mark.parametrize("preset", ["prune.yaml", "prune_structured.yaml"])
def test_pruning_preset_reaches_target_sparsity_and_checkpoint_loads_into_plain_model(preset: str, tmp_path: Path):
    # 3 epochs: the presets prune from epoch 1 to 4 epochs before the end, so all 50% at epoch 1's start.
    cli = _fit(tmp_path, 3, "--trainer.callbacks+", str(CONFIGS / "callbacks" / preset))
    structured = preset == "prune_structured.yaml"
    pruned = LINEARS[:2] if structured else LINEARS
    rows = {r.module: r for r in sparsity_report(cli.model)}
    for name, row in rows.items():
        if name == "total":
            continue
        if name not in pruned:
            assert row.zeros == 0, name  # heads are left alone by the structured preset
        elif structured:
            assert row.zero_rows == row.rows // 2, name  # half of the neurons, whole rows
            assert row.zeros == row.zero_rows * row.shape[1], name
        else:
            assert row.zeros == round(0.5 * row.params), name  # exactly half of each layer's weights
    norms = [m for m in cli.model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(bool((m.weight != 0).all()) for m in norms)  # only the chosen layer types are pruned
    assert float(cli.trainer.callback_metrics[f"prune/sparsity/{pruned[0]}"]) == pytest.approx(0.5, abs=1e-3)

    final = Path(cli.trainer.checkpoint_callback.dirpath) / "pruned.ckpt"
    state = torch.load(final, weights_only=True)["state_dict"]
    assert not [k for k in state if k.endswith(("_orig", "_mask"))]  # pruning made permanent
    plain = MultiTaskModule.load_from_checkpoint(final)
    assert {r.module: r.zeros for r in sparsity_report(plain)} == {m: r.zeros for m, r in rows.items()}
    x = torch.randn(8, 64)
    for task, out in _outputs(plain, x).items():
        torch.testing.assert_close(out, _outputs(cli.model, x)[task])


def test_schedule_reaches_amount_at_end_epoch() -> None:
    cubic = ScheduledPruning(amount=0.5, start_epoch=1, end_epoch=-4)
    targets = [cubic.target_sparsity(e, max_epochs=10) for e in range(10)]  # end_epoch -4 -> epoch 6
    assert targets[0] == 0.0 and targets[6:] == [0.5] * 4
    assert all(a < b for a, b in itertools.pairwise(targets[:7]))  # rising until the end epoch
    assert targets[1] == pytest.approx(0.5 * (1 - (1 - 1 / 6) ** 3))  # cubic: big steps first
    linear = ScheduledPruning(amount=0.6, start_epoch=0, end_epoch=2, schedule="linear")
    assert [linear.target_sparsity(e, None) for e in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.6])
    with pytest.raises(ConfigError, match="max_epochs"):
        cubic.target_sparsity(3, max_epochs=-1)


def test_pruning_bad_input() -> None:
    with pytest.raises(ConfigError, match="pruning_dim"):
        ScheduledPruning(pruning_fn="ln_structured", pruning_norm=2)
    with pytest.raises(ConfigError, match=r"amount"):
        ScheduledPruning(amount=1.5)
    model = _fresh_model()
    callback = ScheduledPruning(modules=["decoder.*"])
    with pytest.raises(ConfigError, match="decoder") as err:
        callback.setup(Trainer(logger=False, enable_progress_bar=False), model, "fit")
    assert all(name in str(err.value) for name in LINEARS)  # the message lists the layers there are


def _fresh_model() -> MultiTaskModule:
    """An untrained quickstart model (MLP 64-256-128, three heads)."""
    tasks = [{"name": "purchase", "kind": "binary"}, {"name": "segment", "kind": "multiclass", "num_outputs": 4}]
    tasks.append({"name": "spend", "kind": "regression"})
    return MultiTaskModule(MLPEncoder([64], hidden=[256, 128], dropout=0.1, norm="layer"), tasks)


# ------------------------------------------------------------------------------------------- quantisation
def test_quantised_outputs_close_to_float_and_linears_are_int8(dense: dict, tmp_path: Path) -> None:
    model = load_compressed(dense["ckpt"])
    x = dense["x"]
    reference = _outputs(model, x)
    float_params = parameter_counts(model)[0]
    record = quantize_model(model)
    assert record["layers"] == LINEARS
    assert all(isinstance(model.get_submodule(n), nnqd.Linear) for n in LINEARS)
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert all(model.get_submodule(n).weight().dtype == torch.qint8 for n in LINEARS)
    floats, int8 = parameter_counts(model)
    assert (
        int8 == sum(r.params for r in sparsity_report(model)[:-1])
        and floats == float_params - int8
        and floats == float_params - int8
    )
    outputs = _outputs(model, x)
    # Tolerance: int8 weights (one scale per tensor) and activations quantised per batch, on x86/fbgemm to 7 bits
    # (reduce_range), add noise of about 1% of each layer's output range, and three layers stack: measured 2-3% RMS
    # of each output's spread. 5% leaves room for other data and backends, while a wrong scale, a wrong layer or a
    # transposed weight gives errors of the order of 100%.
    for task, ref in reference.items():
        rms = (outputs[task] - ref).pow(2).mean().sqrt()
        assert 0 < rms <= 0.05 * ref.std(), task

    path = tmp_path / "int8.ckpt"
    save_compressed(model, read_checkpoint(dense["ckpt"]), record, path)
    loaded = load_compressed(path)
    assert isinstance(loaded.encoder.net[0], nnqd.Linear)
    for task, out in _outputs(loaded, x).items():
        assert torch.equal(out, outputs[task]), task


def test_unavailable_quantisation_backend_lists_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _fresh_model()
    with pytest.raises(ConfigError) as err:
        quantize_model(model, backend="nonexistent")
    assert all(b in str(err.value) for b in available_backends())
    # A real backend name this build lacks (e.g. fbgemm on an ARM machine).
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", ["qnnpack", "none"])
    with pytest.raises(ConfigError, match=r"'x86' is not available.*\['qnnpack'\]"):
        quantize_model(model, backend="x86")
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in LINEARS)  # nothing changed


# -------------------------------------------------------------------------------------------- low rank
def test_full_rank_factorisation_reproduces_the_layer() -> None:
    torch.manual_seed(0)
    for n_in, n_out in [(64, 32), (16, 48)]:
        linear = nn.Linear(n_in, n_out)
        seq = factorize_linear(linear, min(n_in, n_out))
        x = torch.randn(32, n_in)
        assert (seq(x) - linear(x)).abs().max() <= 1e-5


def _known_spectrum(values: list[float], n: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return (u * s) @ v.T


def test_energy_threshold_picks_the_expected_rank() -> None:
    weight = _known_spectrum([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    s = torch.linalg.svdvals(weight)
    expected = {0.5: 1, 16 / 22: 1, 0.75: 2, 0.9: 2, 0.95: 3, 0.99: 4, 1.0: 4}
    assert {e: rank_for_energy(s, e) for e in expected} == expected

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(8, 8)

    net = Net()
    with torch.no_grad():
        net.encoder.weight.copy_(weight.float())
    [row] = apply_svd(net, ["encoder"], energy=0.9)
    assert (row.rank, row.factorised) == (2, True) and row.energy == pytest.approx(20 / 22, rel=1e-6)
    assert net.encoder[0].weight.shape == (2, 8) and net.encoder[1].weight.shape == (8, 2)


def test_svd_cuts_parameters_and_keeps_layers_where_it_would_not(dense: dict) -> None:
    model = load_compressed(dense["ckpt"])
    before = parameter_counts(model)[0]
    rows = apply_svd(model, ["encoder.*"], rank=16)
    saved = sum(r.in_features * r.out_features - 16 * (r.in_features + r.out_features) for r in rows)
    assert all(r.factorised for r in rows) and parameter_counts(model)[0] == before - saved
    model = load_compressed(dense["ckpt"])
    rows = apply_svd(model, ["encoder.*", "heads.segment.*"], energy=1.0)  # full rank: never a saving
    assert not any(r.factorised for r in rows)
    assert all(type(model.get_submodule(r.layer)) is nn.Linear for r in rows)


def test_svd_checkpoint_loads_back_with_identical_predictions(dense: dict, tmp_path: Path) -> None:
    model = load_compressed(dense["ckpt"])
    rows = apply_svd(model, ["encoder.*"], energy=0.9)
    before = _predict(model, dense["data"])
    path = tmp_path / "svd.ckpt"
    save_compressed(model, read_checkpoint(dense["ckpt"]), svd_record(rows), path)
    loaded = load_compressed(path)
    assert isinstance(loaded.encoder.net[0], nn.Sequential)
    after = _predict(loaded, dense["data"])
    for a, b in zip(before, after, strict=True):
        for task in a:
            assert torch.equal(a[task], b[task]), task


def test_svd_bad_input(dense: dict) -> None:
    model = load_compressed(dense["ckpt"])
    with pytest.raises(ConfigError, match=r"'encoder.net.0' \(Linear 64 -> 256, weight 256x64\).*min\(in, out\) = 64"):
        apply_svd(model, ["encoder.*"], rank=65)
    with pytest.raises(ConfigError, match="enc0der") as err:
        apply_svd(model, ["enc0der.*"], rank=4)
    assert all(name in str(err.value) for name in LINEARS)
    for energy in (0.0, 1.5):
        with pytest.raises(ConfigError, match="energy"):
            apply_svd(model, ["encoder.*"], energy=energy)
    with pytest.raises(ConfigError, match="exactly one"):
        apply_svd(model, ["encoder.*"], rank=4, energy=0.9)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in LINEARS)  # nothing changed


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_commands_compose_and_report(dense: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    svd, both = tmp_path / "svd.ckpt", tmp_path / "svd_int8.ckpt"
    assert compress(["svd", "--ckpt_path", dense["ckpt"], "--output", str(svd), "--rank", "8"]) == 0
    assert compress(["quantize", "--ckpt_path", str(svd), "--output", str(both), "--backend", "qnnpack"]) == 0
    model = load_compressed(both)
    assert isinstance(model.encoder.net[0][0], nnqd.Linear)  # the factors are quantised
    assert [s["method"] for s in read_checkpoint(both)["compression"]] == ["svd", "dynamic_int8"]
    capsys.readouterr()
    assert compress(["report", "--ckpt_path", str(both)]) == 0
    out = capsys.readouterr().out
    assert "compression: svd, dynamic_int8" in out and "encoder.net.0.0 | Linear int8 | 8x64" in out
    assert both.stat().st_size < svd.stat().st_size < Path(dense["ckpt"]).stat().st_size


def test_cli_bad_input(dense: dict, tmp_path: Path) -> None:
    out = str(tmp_path / "x.ckpt")
    with pytest.raises(ConfigError, match=r"checkpoint .*missing\.ckpt does not exist"):
        compress(["report", "--ckpt_path", str(tmp_path / "missing.ckpt")])
    with pytest.raises(ConfigError, match="is the input checkpoint"):
        compress(["svd", "--ckpt_path", dense["ckpt"], "--output", dense["ckpt"], "--rank", "4"])
    with pytest.raises(ConfigError, match="backend 'tpu'"):
        compress(["quantize", "--ckpt_path", dense["ckpt"], "--output", out, "--backend", "tpu"])
    with pytest.raises(ConfigError, match="between 1 and"):
        compress(["svd", "--ckpt_path", dense["ckpt"], "--output", out, "--rank", "1000"])
    assert not Path(out).exists()


def test_mtl_predict_and_load_from_checkpoint_take_a_compressed_checkpoint(dense: dict, tmp_path: Path) -> None:
    path = tmp_path / "svd_int8.ckpt"
    compress(["svd", "--ckpt_path", dense["ckpt"], "--output", str(tmp_path / "svd.ckpt"), "--energy", "0.9"])
    compress(["quantize", "--ckpt_path", str(tmp_path / "svd.ckpt"), "--output", str(path)])
    expected = _predict(load_compressed(path), dense["data"])
    model = MultiTaskModule.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(model.encoder.net[0][0], nnqd.Linear)
    cli = run_cli(["predict", *FIT[1:], "--ckpt_path", str(path), "--trainer.logger", "false"], tmp_path / "p")
    for a, b in zip(expected, cli.trainer.predict_loop.predictions, strict=True):
        for task in a:
            assert torch.equal(a[task], b[task]), task
    # Resuming training from it: one error that names the way out, before Lightning's KeyError on optimizer states.
    with pytest.raises(ConfigError, match=r"cannot resume training from a compressed checkpoint \(svd, dynamic_int8\)"):
        _fit(tmp_path / "resume", 3, "--ckpt_path", str(path))
