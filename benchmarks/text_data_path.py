"""Is the text data path the bottleneck? Tokenising, batching (dynamic padding) and the model's training step.

On the example review table (``mtl_lightning/data/examples/text_tiny``, or ``--rows`` rows generated like it),
with its word-level tokenizer and an ``HFEncoder`` BERT of ``--width`` hidden units and ``--layers`` layers
(random weights; width 32 and 2 layers is ``configs/experiment/text_hf_tiny.yaml``):

- tokenise: ``TextDataModule`` loading the table (reading, tokenising every row once, the targets), rows/s;
- batch: the training loader's batches (index, gather, cut to the batch's longest row), ms per batch;
- step: forward, per-task losses, backward and AdamW step of ``MultiTaskModule`` on those batches, ms per step.

The data path must cost a small fraction of the step: ``batch / step`` is that fraction while training, and
``tokenise`` is paid once per run. Rounds alternate batch and step timing; medians and their range are printed.

    python benchmarks/text_data_path.py                          # the tiny experiment's model
    python benchmarks/text_data_path.py --width 768 --layers 12 --heads 12 --rounds 3    # BERT-base size
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtl_lightning import MultiTaskModule
from mtl_lightning.data import TextDataModule
from mtl_lightning.data.examples.make_text import OUT, make_table, write_model_config, write_tokenizer
from mtl_lightning.encoders import HFEncoder

TASKS = [
    {"name": "sentiment", "kind": "binary"},
    {"name": "topic", "kind": "multiclass", "num_outputs": 4},
    {"name": "intensity", "kind": "regression"},
]


def example(rows: int | None, folder: Path) -> Path:
    """The shipped example, or ``rows`` rows generated like it (with their own tokenizer) under ``folder``."""
    if rows is None:
        return OUT
    table = make_table(rows)
    table.to_csv(folder / "reviews.csv", index=False)
    size = write_tokenizer(table["text"].tolist(), folder / "tokenizer")
    write_model_config(size, folder / "model")
    return folder


def model_for(dm: TextDataModule, source: Path, args: argparse.Namespace) -> MultiTaskModule:
    overrides = {
        "hidden_size": args.width,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.width,
        "max_position_embeddings": max(64, args.max_length),
    }
    encoder = HFEncoder(
        dm.input_shape,
        str(source / "model"),
        pretrained=False,
        vocab_size=dm.vocab_size,
        pad_id=dm.pad_id,
        config_overrides=overrides,
    )
    return MultiTaskModule(encoder=encoder, tasks=dm.tasks, train_metrics=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="generate this many rows (default: the example)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="batches and steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        source = example(args.rows, Path(tmp))
        common = {"path": str(source / "reviews.csv"), "tokenizer": str(source / "tokenizer"), "tasks": TASKS}
        dm = TextDataModule(**common, max_length=args.max_length, batch_size=args.batch_size)  # type: ignore[arg-type]
        _ = dm.tokenizer  # loading the tokenizer is not tokenising
        start = time.perf_counter()
        rows = sum(len(ds) for split, ds in dm.datasets.items() if split != "predict")  # predict is test
        tokenise_s = time.perf_counter() - start
        model = model_for(dm, source, args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = dm.train_dataloader()

        def batches() -> list[dict]:
            out = []
            while len(out) < args.steps:
                out.extend(b for b, _ in zip(loader, range(args.steps - len(out)), strict=False))
            return out

        def step(batch: dict) -> None:
            optimizer.zero_grad(set_to_none=True)
            preds = model(batch["inputs"])
            sums, counts = model.task_losses(preds, batch["targets"])
            (sums / counts.clamp_min(1)).mean().backward()  # equal weighting of the per-task means
            optimizer.step()

        data_ms, step_ms, widths = [], [], []
        for _ in range(args.rounds + 1):  # the first round warms up
            t = time.perf_counter()
            ready = batches()
            data_ms.append(1e3 * (time.perf_counter() - t) / len(ready))
            widths += [b["inputs"].shape[1] for b in ready]
            t = time.perf_counter()
            for batch in ready:
                step(batch)
            step_ms.append(1e3 * (time.perf_counter() - t) / len(ready))
    data_ms, step_ms = data_ms[1:], step_ms[1:]
    ratios = sorted(d / s for d, s in zip(data_ms, step_ms, strict=True))
    params = sum(p.numel() for p in model.encoder.parameters())
    print(
        f"# text data path: {rows} rows, tokenizer of {dm.vocab_size} ids, max_length {args.max_length}, batch "
        f"{args.batch_size}; BERT width {args.width} x {args.layers} layers ({params / 1e6:.2f} M encoder "
        f"parameters); torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load "
        f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.steps} batches"
    )
    print(f"tokenise (once per run): {tokenise_s:.2f} s, {rows / tokenise_s:,.0f} rows/s")
    print(f"batch width (dynamic padding): median {statistics.median(widths):.0f} of max_length {args.max_length}")
    print(f"batch ms: median {statistics.median(data_ms):.3f} [{min(data_ms):.3f}, {max(data_ms):.3f}]")
    print(f"step ms:  median {statistics.median(step_ms):.2f} [{min(step_ms):.2f}, {max(step_ms):.2f}]")
    print(f"batch / step: median {statistics.median(ratios):.4f} [{ratios[0]:.4f}, {ratios[-1]:.4f}]")


if __name__ == "__main__":
    sys.exit(main())
