"""Model compression side by side: file size, CPU inference latency and test metrics of each variant.

Variants of one trained model (the quickstart's, trained here unless ``--ckpt_path`` is given):

- original: the trained checkpoint (``best.ckpt``);
- fine-tuned, not pruned: the original trained ``--finetune-epochs`` more epochs without pruning, a control for
  the pruned rows, which get that same extra training (their metric changes mix both effects);
- pruned 50% (L1): fine-tuned ``--finetune-epochs`` epochs from the original with ``configs/callbacks/prune.yaml``
  (the callback's final weights, ``pruned.ckpt``);
- pruned rows 50% (L2): the same with ``configs/callbacks/prune_structured.yaml`` (half of the encoder's neurons);
- int8 dynamic: ``mtl compress quantize`` of the original (no retraining);
- SVD energy 0.9 / SVD rank R: ``mtl compress svd`` of the original's encoder (no retraining).

Every variant is written the same way (``save_compressed``: weights and hyper-parameters, no optimizer state), so
the file sizes compare what inference needs; ``gzip`` shows what the zeros of a pruned model would save on disk.
Latency is one forward pass of the LightningModule (``model(x)``, every task head) under ``torch.inference_mode``
on CPU, with ``torch.set_num_threads`` fixed (printed): for each batch size (1 and 256 rows of the test split) the
variants take turns, ``--rounds`` rounds of ``--calls`` calls each after a warm-up, and the table shows each
variant's median time per call and its ratio to the original's. Metric changes are each task's test metric
(the data module's test split, ``trainer.test``) minus the original's.

    python benchmarks/compression.py --out compression.md                  # quickstart, ~4 min on 2 CPU cores
    python benchmarks/compression.py --ckpt_path runs/quickstart/version_0/checkpoints/best.ckpt
    python benchmarks/compression.py --data configs/data/census.yaml --epochs 3 --finetune-epochs 2

Arguments the script does not know (``--data FILE``, ``--model.init_args...``) go to ``mtl fit``/``mtl test``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from mtl_lightning.cli import MTLCLI
from mtl_lightning.cli import main as mtl
from mtl_lightning.compression.checkpoint import load_compressed, read_checkpoint, save_compressed
from mtl_lightning.compression.lowrank import apply_svd, svd_record
from mtl_lightning.compression.quantize import quantize_model
from mtl_lightning.compression.report import markdown_table, parameter_counts, sparsity_report

REPO = Path(__file__).resolve().parents[1]
# The metric shown per task, by preference (the first one the task logs).
METRICS = ("auroc", "accuracy", "r2", "f1", "mae")
# A checkpoint of the final weights for the fine-tuning control (ModelCheckpoint keeps the best val/loss epoch).
_LAST = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"filename": "final", "save_top_k": 1, "monitor": None, "enable_version_counter": False},
}


@dataclass
class Variant:
    name: str
    path: Path
    model: LightningModule
    size: int = 0
    gzip_size: int = 0
    latency: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", help="experiment config(s); default configs/quickstart.yaml")
    p.add_argument("--ckpt_path", help="a trained checkpoint to compress (default: train one here)")
    p.add_argument("--epochs", type=int, help="epochs to train the original (default: the config's)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs of pruning fine-tuning")
    p.add_argument("--rank", type=int, default=32, help="rank of the fixed-rank SVD variant")
    p.add_argument("--energy", type=float, default=0.9, help="energy of the energy-threshold SVD variant")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the latency runs")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per variant and batch size")
    p.add_argument("--calls", type=int, default=50, help="forward calls per round (batch 256: a fifth of it)")
    p.add_argument("--work", help="folder for runs and variant files (default: a temporary one)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    return p.parse_known_args(argv)


def _configs(args: argparse.Namespace) -> list[str]:
    configs = args.config or [str(REPO / "configs" / "quickstart.yaml")]
    return [a for c in configs for a in ("--config", c)]


def _quiet_trainer(root: Path) -> list[str]:
    return ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root)]


def fit(args: argparse.Namespace, extra: list[str], root: Path, name: str, more: list[str]) -> Path:
    """``mtl fit`` under ``root/name``; the folder of its checkpoints."""
    logs = ["--trainer.logger.init_args.save_dir", str(root / name)]
    cli = mtl(["fit", *_configs(args), *extra, *_quiet_trainer(root / name), *logs, *more])
    return Path(cli.trainer.checkpoint_callback.dirpath)


def data_module(args: argparse.Namespace, extra: list[str], root: Path) -> LightningDataModule:
    """The data module the config builds (no training)."""
    cli = MTLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[*_configs(args), *extra, *_quiet_trainer(root / "data"), "--trainer.logger", "false"],
        run=False,
        auto_configure_optimizers=False,
    )
    return cli.datamodule


def build_variants(args: argparse.Namespace, extra: list[str], root: Path) -> list[Variant]:
    if args.ckpt_path:
        original = Path(args.ckpt_path)
    else:
        epochs = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
        original = fit(args, extra, root, "original", epochs) / "best.ckpt"
    source = read_checkpoint(original)
    out = root / "variants"
    made: dict[str, tuple[LightningModule, dict | None, dict]] = {}
    made["original"] = (load_compressed(original), None, source)
    finetune = ["--model.init_args.init_from", str(original), "--trainer.max_epochs", str(args.finetune_epochs)]
    # The same fine-tuning without pruning, so that the pruned rows can be told apart from the extra training.
    control = fit(args, extra, root, "finetuned", [*finetune, "--trainer.callbacks+", json.dumps(_LAST)])
    made["fine-tuned, not pruned"] = (
        load_compressed(control / "final.ckpt"),
        None,
        read_checkpoint(control / "final.ckpt"),
    )
    for name, preset in (("pruned 50% (L1)", "prune.yaml"), ("pruned rows 50% (L2)", "prune_structured.yaml")):
        more = [*finetune, "--trainer.callbacks+", str(REPO / "configs" / "callbacks" / preset)]
        pruned = fit(args, extra, root, preset.removesuffix(".yaml"), more) / "pruned.ckpt"
        made[name] = (load_compressed(pruned), None, read_checkpoint(pruned))
    model = load_compressed(original)
    made["int8 dynamic"] = (model, quantize_model(model), source)
    model = load_compressed(original)
    made[f"SVD energy {args.energy}"] = (model, svd_record(apply_svd(model, energy=args.energy)), source)
    model = load_compressed(original)
    made[f"SVD rank {args.rank}"] = (model, svd_record(apply_svd(model, rank=args.rank)), source)
    variants = []
    for i, (name, (model, step, src)) in enumerate(made.items()):
        path = out / f"{i}.ckpt"
        save_compressed(model, src, step, path)
        loaded = load_compressed(path)  # measure what a user loads back, not the object in memory
        data = path.read_bytes()
        variants.append(Variant(name, path, loaded, size=len(data), gzip_size=len(gzip.compress(data))))
    return variants


def measure_latency(variants: list[Variant], x: torch.Tensor, rounds: int, calls: int) -> None:
    """Median seconds per ``model(x)`` call, the variants taking turns round after round."""
    models: list[Callable] = [v.model for v in variants]
    with torch.inference_mode():
        for model in models:  # warm-up: allocator, kernel selection, packed weights
            for _ in range(max(3, calls // 5)):
                model(x)
        samples: list[list[float]] = [[] for _ in variants]
        for r in range(rounds):
            for i in [(r + k) % len(models) for k in range(len(models))]:  # a new first variant every round
                model = models[i]
                start = time.perf_counter()
                for _ in range(calls):
                    model(x)
                samples[i].append((time.perf_counter() - start) / calls)
    for variant, times in zip(variants, samples, strict=True):
        variant.latency[x.shape[0]] = statistics.median(times)


def measure_metrics(variants: list[Variant], data: LightningDataModule) -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for variant in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            [results] = trainer.test(variant.model, datamodule=data, verbose=False)
        variant.metrics = {k: float(v) for k, v in results.items()}


def _task_metrics(original: Variant) -> list[str]:
    keys = []
    for task in original.model.task_names:
        found = [f"test/{task}/{m}" for m in METRICS if f"test/{task}/{m}" in original.metrics]
        keys += found[:1]
    return keys


def table(variants: list[Variant]) -> str:
    original = variants[0]
    keys = _task_metrics(original)
    rows = []
    for v in variants:
        floats, int8 = parameter_counts(v.model)
        sparsity = sparsity_report(v.model)[-1].sparsity
        row: list[object] = [
            v.name,
            f"{v.size / 1024:.0f} ({v.size / original.size:.2f}x)",
            f"{v.gzip_size / 1024:.0f}",
            f"{floats:,}" + (f" + {int8:,} int8" if int8 else ""),
            f"{100 * sparsity:.0f}%",
        ]
        for batch in sorted(original.latency):
            ms, base = 1000 * v.latency[batch], 1000 * original.latency[batch]
            row.append(f"{ms:.3f} ({ms / base:.2f}x)")
        for key in keys:
            value = v.metrics[key]
            row.append(f"{value:.4f}" if v is original else f"{value - original.metrics[key]:+.4f}")
        rows.append(row)
    headers = ["variant", "file KiB", "gzip KiB", "parameters", "zero weights"]
    headers += [f"ms/call batch {b}" for b in sorted(original.latency)]
    headers += [f"{k.removeprefix('test/')} (Δ)" for k in keys]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    args, extra = parse_args(argv)
    for name in ("ckpt_path", "work", "out"):  # paths given relative to where the script was started
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    os.chdir(REPO)  # config files name data paths relative to the repository root
    root = Path(args.work or tempfile.mkdtemp(prefix="mtl_compression_"))
    variants = build_variants(args, extra, root)
    data = data_module(args, extra, root)
    data.setup("test")
    measure_metrics(variants, data)
    torch.set_num_threads(args.threads)
    inputs = next(iter(data.test_dataloader()))["inputs"]
    for batch, calls in ((1, args.calls), (256, max(1, args.calls // 5))):
        measure_latency(variants, inputs[:batch], args.rounds, calls)
    header = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.set_num_threads({args.threads}), quantized engine {torch.backends.quantized.engine}, "
        f"{args.rounds} rounds; metrics: original's value, then change; "
        f"load average {os.getloadavg()[0]:.2f}\n\n"
    )
    text = header + table(variants)
    print(text)
    if args.out:
        Path(args.out).write_text(
            text
            + "\n\ncommand: python benchmarks/compression.py "
            + shlex.join(argv if argv is not None else sys.argv[1:])
            + "\n"
        )
    return text


if __name__ == "__main__":
    main()
