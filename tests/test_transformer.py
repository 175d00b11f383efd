"""Token sequences end to end: the Transformer encoder, the sequence data, the CLI configs, the throughput callback
and the GPU throughput benchmark's CPU smoke mode."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import CONFIGS, QUIET_TRAINER, REPO, run_cli
from torch.utils.flop_counter import FlopCounterMode

from mtl_lightning.data import DataError, SequenceDataModule
from mtl_lightning.data.sequences import PAD_ID, marker_counts
from mtl_lightning.encoders import TransformerBlock, TransformerEncoder
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import IGNORE_INDEX

ALL_KINDS = [
    {"name": "b", "kind": "binary"},
    {"name": "m", "kind": "multiclass", "num_outputs": 4},
    {"name": "r", "kind": "regression"},
    {"name": "l", "kind": "multilabel", "num_outputs": 3},
]


def small_encoder(**kwargs) -> TransformerEncoder:
    args = {"input_shape": (12,), "vocab_size": 40, "d_model": 16, "num_layers": 2, "num_heads": 4, **kwargs}
    return TransformerEncoder(**args).eval()


# ------------------------------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_output_shape_and_out_features(pooling: str) -> None:
    enc = small_encoder(pooling=pooling)
    out = enc(torch.randint(0, 40, (5, 12)))
    assert enc.out_features == 16
    assert out.shape == (5, 16) and out.dtype == torch.float32
    assert enc(torch.randint(0, 40, (5, 7))).shape == (5, 16)  # shorter sequences are fine


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_gradient_reaches_every_parameter(pooling: str) -> None:
    enc = small_encoder(pooling=pooling, dropout=0.1).train()
    out = enc(torch.randint(0, 40, (4, 12)))
    # A random projection: the sum of a LayerNorm output has no gradient (its features sum to the bias sum).
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_is_irrelevant(pooling: str) -> None:
    enc = small_encoder(pooling=pooling, pad_id=0)
    real = torch.randint(1, 40, (3, 8))
    padded = torch.cat([real, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = enc(padded)
        # Same as the unpadded sequences, and unchanged when the padded positions' embeddings change.
        torch.testing.assert_close(out, enc(real), rtol=1e-5, atol=1e-5)
        enc.position_embedding[:, 8:] += 5.0
        torch.testing.assert_close(enc(padded), out, rtol=1e-5, atol=1e-5)
        # Without a pad_id the same positions count.
        enc.pad_id = None
        assert not torch.allclose(enc(padded), out, atol=1e-3)


def test_all_padding_row_stays_finite() -> None:
    enc = small_encoder(pad_id=0)
    tokens = torch.randint(1, 40, (2, 12))
    tokens[1] = 0
    assert torch.isfinite(enc(tokens)).all()


def test_fsdp_units_are_the_blocks() -> None:
    enc = small_encoder(num_layers=3)
    units = enc.fsdp_units()
    assert units == list(enc.blocks) and len(units) == 3
    assert all(isinstance(u, TransformerBlock) for u in units)


def test_flops_per_sample_formula() -> None:
    # d=8, 2 layers, ffn 4d: per block 12 d^2 + 13 d = 872 parameters; final norm 2 d = 16; N = 1760.
    # 6 N S + 12 L d S^2 with S = 4 (5 with the CLS token).
    assert small_encoder(input_shape=(4,), vocab_size=10, d_model=8, num_heads=2).flops_per_sample() == (
        6 * 1760 * 4 + 12 * 2 * 8 * 4**2
    )
    cls = small_encoder(input_shape=(4,), vocab_size=10, d_model=8, num_heads=2, pooling="cls")
    assert cls.flops_per_sample() == 6 * 1760 * 5 + 12 * 2 * 8 * 5**2


def test_flops_weight_part_matches_torch_flop_counter() -> None:
    enc = small_encoder(input_shape=(16,), d_model=32).train()
    with FlopCounterMode(display=False) as counter:
        enc(torch.randint(0, 40, (3, 16))).pow(2).sum().backward()
    measured = counter.get_total_flops() / 3
    weights = sum(m.weight.numel() for m in enc.blocks.modules() if isinstance(m, nn.Linear))
    attention = 12 * 2 * 32 * 16**2
    # torch counts matmuls only (no biases or norms); on the CPU it may or may not count the SDPA kernel.
    assert measured in (6 * weights * 16, 6 * weights * 16 + attention)
    assert 0.9 < (6 * weights * 16 + attention) / enc.flops_per_sample() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30, "num_heads": 4}, r"d_model \(30\) must be divisible by num_heads \(4\)"),
        ({"input_shape": (4, 3)}, r"input_shape must be \(seq_len,\)"),
        ({"pooling": "max"}, r"pooling must be one of \['mean', 'cls'\]"),
        ({"pad_id": 40}, r"pad_id must be in \[0, vocab_size=40\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"num_layers": 0, "vocab_size": 0}, r"vocab_size must be >= 1, got 0; num_layers must be >= 1"),
    ],
)
def test_bad_encoder_args_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        small_encoder(**kwargs)


def test_bad_inputs_are_named() -> None:
    enc = small_encoder()
    with pytest.raises(TypeError, match="expects integer token ids"):
        enc(torch.randn(2, 12))
    with pytest.raises(ValueError, match="sequences of length 13 but was built for input_shape"):
        enc(torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids range over \[0, 40\] but vocab_size is 40"):
        enc(torch.tensor([[0, 40]]))


# ---------------------------------------------------------------------------------------------------- data
def sequences(**kwargs) -> SequenceDataModule:
    args = {"tasks": ALL_KINDS, "num_samples": 1200, "seq_len": 24, "vocab_size": 64, **kwargs}
    return SequenceDataModule(**args)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = sequences().generate(), sequences().generate(), sequences(seed=1).generate()
    assert torch.equal(a.inputs, b.inputs)
    assert all(torch.equal(a.targets[k].nan_to_num(-7), b.targets[k].nan_to_num(-7)) for k in a.targets)
    assert not torch.equal(a.inputs, c.inputs)
    split_a, split_b = sequences().datasets["val"], sequences().datasets["val"]
    assert torch.equal(split_a.inputs, split_b.inputs)


def test_shapes_dtypes_and_label_values() -> None:
    dm = sequences(missing_rate=0.2)
    assert dm.input_shape == (24,)
    data = dm.generate()
    assert data.inputs.dtype == torch.int64 and data.inputs.shape == (1200, 24)
    assert int(data.inputs.min()) >= 0 and int(data.inputs.max()) < 64
    t = data.targets
    assert t["b"].dtype == torch.float32 and t["b"].shape == (1200,)
    assert set(t["b"][~t["b"].isnan()].unique().tolist()) == {0.0, 1.0}
    assert t["m"].dtype == torch.int64 and set(t["m"][t["m"] != IGNORE_INDEX].unique().tolist()) == {0, 1, 2, 3}
    assert t["l"].shape == (1200, 3) and t["l"].dtype == torch.float32
    r = t["r"][~t["r"].isnan()]
    assert abs(float(r.mean())) < 0.1 and abs(float(r.std()) - 1) < 0.1
    for name, target in t.items():
        flat = target.reshape(len(target), -1)
        missing = (flat.isnan() if flat.is_floating_point() else flat == IGNORE_INDEX).any(1).float().mean()
        assert 0.15 < float(missing) < 0.25, name
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sizes == {"train": 960, "val": 120, "test": 120, "predict": 120}


def test_labels_are_the_marker_counts() -> None:
    dm = sequences(tasks=ALL_KINDS[:3])
    gen = torch.Generator().manual_seed(dm.seed)
    tokens = dm.generate_tokens(gen)
    counts = marker_counts(tokens, dm.markers(gen)).double()
    data = dm.generate()
    assert torch.equal(data.targets["b"], (counts[:, 0] > counts[:, 0].median()).float())
    assert torch.corrcoef(torch.stack([counts[:, 2], data.targets["r"].double()]))[0, 1] > 0.999
    assert torch.corrcoef(torch.stack([counts[:, 1], data.targets["m"].double()]))[0, 1] > 0.9


def test_targets_are_learnable_from_token_counts() -> None:
    # A linear model on the bag of tokens (what mean pooling can represent) explains the regression target.
    data = sequences(num_samples=2000).generate()
    bag = torch.zeros(2000, 64, dtype=torch.float64).scatter_add_(
        1, data.inputs, torch.ones(2000, 24, dtype=torch.float64)
    )
    design = torch.cat([bag, torch.ones(2000, 1, dtype=torch.float64)], dim=1)
    y = data.targets["r"].double()
    fit = design @ torch.linalg.lstsq(design, y[:, None]).solution
    assert 1 - float(((fit[:, 0] - y) ** 2).mean() / y.var()) > 0.99


def test_variable_lengths_pad_at_the_end() -> None:
    data = sequences(min_length=10).generate()
    real = data.inputs != PAD_ID
    lengths = real.sum(1)
    assert int(lengths.min()) >= 10 and int(lengths.max()) <= 24 and len(lengths.unique()) > 5
    assert torch.equal(real, torch.arange(24) < lengths[:, None])  # real tokens first, then only padding


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "num_samples and seq_len must be >= 1"),
        ({"vocab_size": 1}, "vocab_size must be >= 2"),
        ({"marker_fraction": 0.0}, r"marker_fraction must be in \(0, 1\)"),
        ({"min_length": 30}, r"min_length must be in \[1, seq_len=24\]"),
        ({"missing_rate": 1.0}, r"missing_rate must be in \[0, 1\)"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "split fractions"),
    ],
)
def test_bad_data_args_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        sequences(**kwargs)


# ----------------------------------------------------------------------------------------- CLI and timing
def test_cli_fit_padded_cls_with_throughput_timer(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    timer = {"class_path": "mtl_lightning.callbacks.ThroughputTimer", "init_args": {"out": str(out), "warmup": 1}}
    args = ["fit", "--model", str(CONFIGS / "model" / "transformer.yaml")]
    args += ["--data", str(CONFIGS / "data" / "sequences.yaml"), "--data.init_args.num_samples", "600"]
    args += ["--data.init_args.min_length", "8", "--model.init_args.encoder.init_args.pad_id", "0"]
    args += ["--model.init_args.encoder.init_args.pooling", "cls", "--trainer.logger", "false"]
    args += [*QUIET_TRAINER, "--trainer.callbacks+", json.dumps(timer)]
    args += ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]
    cli = run_cli(args, tmp_path)
    encoder = cli.model.encoder
    assert isinstance(encoder, TransformerEncoder) and encoder.pad_id == 0 and cli.trainer.global_step == 3
    result = json.loads(out.read_text())
    assert result["timed_steps"] == 2 and result["warmup_steps"] == 1
    assert result["samples_per_s"] > 0 and result["tokens_per_s"] == pytest.approx(32 * result["samples_per_s"])
    heads = sum(p.numel() for p in cli.model.heads.parameters())
    assert result["flops_per_sample"] == encoder.flops_per_sample() + 6 * heads
    assert result["mfu"] is None and result["peak_mem_gib"] is None  # CPU: no peak FLOPs, no CUDA memory


def _benchmark():
    """benchmarks/gpu_throughput.py as a module (benchmarks/ is not a package)."""
    if "gpu_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_throughput"] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["gpu_throughput"]


def test_benchmark_cpu_smoke_one_cell(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _benchmark()
    rows = bench.main(["--cpu-smoke", "--experiments", "transformer", "--variants", "gpu", "fp16", "--steps", "2"])
    assert [(r.variant, r.status) for r in rows] == [("gpu", "ok"), ("fp16", "skipped")]
    assert rows[0].metrics["timed_steps"] == 2 and rows[0].metrics["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "$ python -m mtl_lightning fit --config configs/experiment/transformer_gpu.yaml" in printed
    assert "GPU only" in printed


def test_benchmark_skips_missing_presets() -> None:
    bench = _benchmark()
    args = bench.parse_args(["--cpu-smoke"])
    variant = bench.Variant("future", "a preset nobody wrote", ("configs/trainer/nope.yaml",))
    assert bench.skip_reason(variant, args, has_cuda=False) == "preset configs/trainer/nope.yaml does not exist yet"
    assert "no CUDA device" in bench.skip_reason(bench.VARIANTS["bf16"], bench.parse_args([]), has_cuda=False)


@pytest.mark.slow
def test_benchmark_cpu_smoke_full_matrix(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_throughput.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["status"] for r in rows} == {"ok"}
    assert {(r["experiment"], r["variant"]) for r in rows} >= {("quickstart", "gpu"), ("transformer", "bf16")}
