"""A Hugging Face ``transformers`` model as the shared encoder: token ids ``(N, S)`` -> one vector per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError
from mtl_lightning.hf_loading import load, transformers_module

POOLINGS = ("cls", "mean")
DTYPES = ("float32", "bfloat16", "float16")


class HFEncoder(nn.Module):
    """``transformers.AutoModel`` (BERT, RoBERTa, DeBERTa, ModernBERT, ... any model with ``last_hidden_state``).

    Padding is read off the ids: positions equal to ``pad_id`` are masked out of attention and of the mean, so
    the batch stays one tensor (``{"inputs": ids}``) and a collate may pad each batch to its longest sequence.

    Args:
        input_shape: ``(max_length,)``, linked from the data module; longer than the model's
            ``max_position_embeddings`` is refused.
        model_name_or_path: A hub name (``bert-base-uncased``, downloaded once into the Hugging Face cache) or a
            folder written by ``save_pretrained``.
        pretrained: Load the weights (``from_pretrained``); ``False`` builds the architecture of the folder's or
            name's ``config.json`` with random weights (tests, from-scratch runs), resized to ``vocab_size``.
        vocab_size: The tokenizer's size, linked from the data module; more ids than the model embeds is refused.
        pad_id: The padding id, linked from the data module (its tokenizer's); None takes the model config's.
        pooling: ``cls`` (the first token's output, BERT-style) or ``mean`` over the non-padding positions.
        gradient_checkpointing: Recompute activations in the backward pass (memory for compute).
        dtype: Weights' dtype at load (``bfloat16`` halves memory); None keeps the checkpoint's float32. Mixed
            precision is the trainer's ``precision``, not this.
        config_overrides: Keys of the model config to change (e.g. ``{num_hidden_layers: 2}``, dropout rates).
        local_files_only: Never contact the hub (air-gapped machines; the cache or a folder only).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        model_name_or_path: str,
        pretrained: bool = True,
        vocab_size: int | None = None,
        pad_id: int | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        config_overrides: dict[str, Any] | None = None,
        local_files_only: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"HFEncoder: pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"HFEncoder: dtype must be one of {list(DTYPES)} or null, got {dtype!r}")
        if len(input_shape) != 1 or int(input_shape[0]) < 1:
            raise ConfigError(
                f"HFEncoder takes token ids: input_shape must be (max_length,), got {tuple(input_shape)}; pair it "
                "with text data, e.g. --data configs/data/text.yaml"
            )
        transformers = transformers_module("HFEncoder")
        overrides = dict(config_overrides or {})
        config = load(transformers.AutoConfig, model_name_or_path, "HFEncoder", "model config", local_files_only)
        unknown = sorted(k for k in overrides if not hasattr(config, k))
        if unknown:
            raise ConfigError(
                f"HFEncoder: config_overrides names keys that {type(config).__name__} does not have: {unknown}; "
                f"its keys include {sorted(config.to_dict())[:30]}"
            )
        if not pretrained and vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)  # random weights: embed exactly the tokenizer's ids
        for key, value in overrides.items():
            setattr(config, key, value)
        torch_dtype = None if dtype is None else getattr(torch, dtype)
        if pretrained:
            self.model = load(
                transformers.AutoModel,
                model_name_or_path,
                "HFEncoder",
                "model",
                local_files_only,
                config=config,
                dtype=torch_dtype,
            )
        else:
            self.model = transformers.AutoModel.from_config(config, dtype=torch_dtype)
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            # BERT-style models' pooler (dense + tanh on [CLS], for their next-sentence head) feeds nothing read
            # here: left in, its parameters get no gradient and DDP stops at the first step (unused parameters).
            self.model.pooler = None
        self.max_length = int(input_shape[0])
        self.pooling = pooling
        self.pad_id = getattr(config, "pad_token_id", None) if pad_id is None else int(pad_id)
        self.embedded = int(self.model.get_input_embeddings().num_embeddings)
        self.vocab_size = self.embedded if vocab_size is None else int(vocab_size)
        # hidden_size on most configs (aliased by DistilBERT's and others' attribute maps); d_model on BART-like ones.
        self.out_features = int(getattr(config, "hidden_size", None) or config.d_model)
        self._check_sizes(model_name_or_path, getattr(config, "max_position_embeddings", None))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()

    def _check_sizes(self, name: str, max_positions: int | None) -> None:
        problems = []
        if self.vocab_size > self.embedded:
            problems.append(
                f"the tokenizer has {self.vocab_size} ids but the model {name!r} embeds {self.embedded}: use the "
                "tokenizer that belongs to the model (data.init_args.tokenizer), or pretrained: false to build "
                "new embeddings"
            )
        if max_positions is not None and self.max_length > int(max_positions):
            problems.append(
                f"the data's max_length is {self.max_length} but the model has {max_positions} positions: set "
                f"data.init_args.max_length to at most {max_positions}"
            )
        if self.pad_id is None and self.pooling == "mean":
            problems.append("the model config has no pad_token_id, so mean pooling cannot tell padding: set pad_id")
        if self.pad_id is not None and not 0 <= self.pad_id < self.embedded:
            problems.append(f"pad_id {self.pad_id} is not an id of the model's embeddings [0, {self.embedded})")
        if problems:
            raise ConfigError("HFEncoder: " + "; ".join(problems))

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer blocks: the members of the model's largest ``nn.ModuleList`` by parameter count.

        Every ``transformers`` encoder keeps its layers in one ModuleList (``encoder.layer``, ``layers``, ...);
        finding it by size needs neither the architecture's attribute names nor transformers' private
        ``_no_split_modules``.
        """
        lists: list[nn.Module] = [m for m in self.model.modules() if isinstance(m, nn.ModuleList)]
        best = max(lists, key=_parameter_count, default=None)
        return [] if best is None else list(best.children())

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.is_floating_point() or tokens.ndim != 2:
            raise TypeError(
                f"HFEncoder expects integer token ids of shape (N, S), got {tuple(tokens.shape)} {tokens.dtype}; "
                "use a data module that yields tokens (e.g. mtl_lightning.data.TextDataModule)"
            )
        keep = None if self.pad_id is None else tokens != self.pad_id
        hidden = self.model(input_ids=tokens, attention_mask=None if keep is None else keep.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        assert keep is not None  # checked at construction: mean pooling needs a pad id
        weights = keep.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
