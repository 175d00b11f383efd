"""A pre-LayerNorm Transformer encoder for token sequences, pooled to one vector per sample."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mtl_lightning.errors import ConfigError

POOLINGS = ("mean", "cls")


class TransformerBlock(nn.Module):
    """``x + proj(attention(LN(x)))`` then ``x + MLP(LN(x))``, attention by ``scaled_dot_product_attention``.

    One fused ``qkv`` projection (one matmul instead of three) and a GELU MLP of width ``ffn_mult * d_model``.
    SDPA picks the fastest kernel it can: flash attention on a GPU when there is no mask and the inputs are
    half precision, a memory-efficient or plain kernel otherwise.
    """

    def __init__(self, d_model: int, num_heads: int, ffn_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model),
            nn.GELU(),
            nn.Linear(ffn_mult * d_model, d_model),
        )
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(N, S, d_model)``; ``attn_mask``: ``(N, 1, 1, S)`` booleans, True where a key may be attended."""
        n, s, d = x.shape
        # (N, S, 3, H, d/H) -> 3 x (N, H, S, d/H), the layout SDPA expects.
        q, k, v = self.qkv(self.norm1(x)).view(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_drop(self.proj(attn.transpose(1, 2).reshape(n, s, d)))
        return x + self.resid_drop(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Token ids ``(N, S)`` -> ``(N, d_model)``: embeddings, pre-LN blocks, final LayerNorm, mean or CLS pooling.

    Args:
        input_shape: ``(seq_len,)``, linked from the data module; inputs may be shorter, not longer.
        vocab_size: Number of token ids; inputs must lie in ``[0, vocab_size)``.
        d_model: Width of the representation (``out_features``).
        num_layers: Number of :class:`TransformerBlock`.
        num_heads: Attention heads; must divide ``d_model``.
        ffn_mult: Width of the MLP as a multiple of ``d_model``.
        dropout: Dropout on the embeddings, the attention weights and the residual branches.
        pooling: ``mean`` over the (non-padding) positions, or ``cls``: the output of a learned token prepended to
            every sequence.
        pad_id: Token id of padding: padded keys are masked out of attention and out of the mean. None (no
            padding) keeps attention unmasked, so SDPA can use its flash kernel.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        vocab_size: int,
        d_model: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        pooling: Literal["mean", "cls"] = "mean",
        pad_id: int | None = None,
    ):
        super().__init__()
        _check_args(input_shape, vocab_size, d_model, num_layers, num_heads, ffn_mult, dropout, pooling, pad_id)
        self.seq_len = int(input_shape[0])
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.pooling = pooling
        self.pad_id = pad_id
        self.out_features = d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.seq_len, d_model))
        # The CLS token needs no position: it is a learned vector of its own, always at the front.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads, ffn_mult, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self._vocab_checked = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 L)
        so the variance of the residual stream does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in cast(Iterable[TransformerBlock], self.blocks):  # a ModuleList is typed as holding any Module
            for proj in (block.proj, cast(nn.Linear, block.mlp[-1])):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
        nn.init.normal_(self.position_embedding, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules to shard one by one under FSDP/FSDP2: each block (embeddings stay with the root unit)."""
        return list(self.blocks)

    def flops_per_sample(self) -> int:
        """Matmul FLOPs of one forward + backward pass of one full-length sample, for model FLOPs utilisation.

        PaLM's accounting (Chowdhery et al. 2022, appendix B): ``6 * N * S`` for the weights, with ``N`` the
        non-embedding parameters (blocks and final norm) and ``S`` the tokens per sample (plus one for CLS), and
        ``12 * num_layers * d_model * S**2`` for the attention scores and the weighted values (full, unmasked
        ``S x S`` matrices: padding and the embedding lookups are not counted).
        """
        n = sum(p.numel() for p in [*self.blocks.parameters(), *self.norm.parameters()])
        s = self.seq_len + (1 if self.cls_token is not None else 0)
        return 6 * n * s + 12 * len(self.blocks) * self.d_model * s * s

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.is_floating_point() or tokens.ndim != 2:
            raise TypeError(
                f"TransformerEncoder expects integer token ids of shape (N, S), got {tuple(tokens.shape)} "
                f"{tokens.dtype}; use a data module that yields tokens (e.g. mtl_lightning.data.SequenceDataModule)"
            )
        if tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"TransformerEncoder got sequences of length {tokens.shape[1]} but was built for input_shape "
                f"({self.seq_len},); the positional embeddings have no entry past position {self.seq_len - 1}"
            )
        # Once, and never while tracing for torch.compile: an out-of-range id would otherwise end in an opaque
        # CUDA device-side assert. One host sync on the first batch only.
        if not self._vocab_checked and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids range over [{low}, {high}] but vocab_size is {self.vocab_size}; set the encoder's "
                    "vocab_size to at least the data's vocab_size"
                )
            self._vocab_checked = True

    def forward(self, tokens: Tensor) -> Tensor:
        self._check_tokens(tokens)
        x = self.token_embedding(tokens) + self.position_embedding[:, : tokens.shape[1]]
        keep = None if self.pad_id is None else tokens != self.pad_id  # (N, S), True for real tokens
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            if keep is not None:
                keep = F.pad(keep, (1, 0), value=True)
        mask = None
        if keep is not None:
            # A sequence of padding only would mask every key, and softmax over nothing is NaN: let it attend to
            # all positions (its mean pooling below is then 0).
            mask = (keep | ~keep.any(dim=1, keepdim=True))[:, None, None, :]
        x = self.embed_drop(x)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.cls_token is not None:
            return x[:, 0]
        if keep is None:
            return x.mean(dim=1)
        weights = keep.to(x.dtype)[..., None]
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _check_args(
    input_shape: Sequence[int],
    vocab_size: int | None,
    d_model: int,
    num_layers: int,
    num_heads: int,
    ffn_mult: int,
    dropout: float,
    pooling: str,
    pad_id: int | None,
) -> None:
    """Raise one ConfigError naming the bad argument(s) and the fix."""
    if vocab_size is None:  # neither linked from the data nor written in the config
        raise ConfigError(
            "TransformerEncoder: vocab_size is not set; use a data module with a vocab_size (the CLI links it into "
            "the encoder, e.g. configs/data/sequences.yaml) or set model.init_args.encoder.init_args.vocab_size"
        )
    problems = []
    if len(input_shape) != 1 or int(input_shape[0]) < 1:
        problems.append(
            f"input_shape must be (seq_len,) with seq_len >= 1, got {tuple(input_shape)}; the data must yield "
            "token ids of shape (N, seq_len)"
        )
    for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("num_layers", num_layers)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    for name, value in (("num_heads", num_heads), ("ffn_mult", ffn_mult)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if num_heads >= 1 and d_model % num_heads:
        problems.append(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout}")
    if pooling not in POOLINGS:
        problems.append(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if pad_id is not None and not 0 <= pad_id < vocab_size:
        problems.append(f"pad_id must be in [0, vocab_size={vocab_size}) or null, got {pad_id}")
    if problems:
        raise ConfigError("TransformerEncoder: " + "; ".join(problems))
