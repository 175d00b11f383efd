"""Shared encoders. Contract: the constructor takes ``input_shape`` (linked from the data module) and the
instance exposes ``out_features``, the width of the representation the heads are built on. An encoder may
return one tensor (hard sharing) or a ``{task: tensor}`` dict (one representation per task)."""

from mtl_lightning.encoders.mlp import MLPEncoder
from mtl_lightning.encoders.transformer import TransformerBlock, TransformerEncoder

__all__ = ["MLPEncoder", "TransformerBlock", "TransformerEncoder"]
