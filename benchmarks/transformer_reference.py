"""The same Transformer encoder and heads trained by a bare PyTorch loop: the ceiling the template is measured against.

``benchmarks/gpu_throughput.py`` measures the template (Lightning, masked per-task losses, metrics, logging). This
script trains the same ``TransformerEncoder`` plus three linear heads on random tokens with a plain loop (bf16
autocast, AdamW, optional ``torch.compile`` of the encoder, no metrics, no logging, no clipping), so the MFU gap
between the two is the template's cost, and the gap between this and 100 % is the model's own.

    python benchmarks/transformer_reference.py --batch-size 128 --compile
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mtl_lightning.callbacks.throughput import dense_bf16_peak_flops
from mtl_lightning.encoders import TransformerEncoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda")
    encoder = TransformerEncoder((args.seq_len,), vocab_size=32000, d_model=768, num_layers=12, num_heads=12).to(device)
    heads = torch.nn.ModuleList([torch.nn.Linear(768, k) for k in (1, 8, 1)]).to(device)
    if args.compile:
        encoder.compile()
    params = [*encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
    x = torch.randint(1, 32000, (args.batch_size, args.seq_len), device=device)
    y_bin = torch.randint(0, 2, (args.batch_size,), device=device).float()
    y_cls = torch.randint(0, 8, (args.batch_size,), device=device)
    y_reg = torch.randn(args.batch_size, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = encoder(x)
            out = [h(z) for h in heads]
            loss = (
                F.binary_cross_entropy_with_logits(out[0].squeeze(-1), y_bin)
                + F.cross_entropy(out[1], y_cls)
                + F.mse_loss(out[2].squeeze(-1), y_reg)
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    flops = (encoder.flops_per_sample() + 6 * sum(q.numel() for q in heads.parameters())) * args.batch_size
    peak = dense_bf16_peak_flops(device)
    mfu = f"{100 * flops / per_step / peak:.1f}" if peak else "-"
    print(
        f"bare loop, batch {args.batch_size}, compile {args.compile}: {args.batch_size / per_step:.1f} samples/s, "
        f"{1000 * per_step:.2f} ms/step, MFU {mfu} %, warm-up {warm:.1f} s, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
