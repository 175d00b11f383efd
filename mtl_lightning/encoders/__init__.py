"""Shared encoders. Contract: the constructor takes ``input_shape`` (linked from the data module) and the
instance exposes ``out_features``, the width of the representation the heads are built on. An encoder may
return one tensor (hard sharing) or a ``{task: tensor}`` dict (one representation per task); the latter subclass
:class:`PerTaskEncoder`. The optional hooks (``bind_tasks``, ``fsdp_units``, ``training_logs``,
``flops_per_sample``) are the protocols of :mod:`mtl_lightning.contracts`."""

from mtl_lightning.encoders.cnn import SmallCNN
from mtl_lightning.encoders.cross_stitch import CrossStitch, CrossStitchConv, CrossStitchUnit
from mtl_lightning.encoders.mlp import MLPEncoder
from mtl_lightning.encoders.mmoe import MMoE
from mtl_lightning.encoders.mtan import MTAN
from mtl_lightning.encoders.per_task import PerTaskEncoder
from mtl_lightning.encoders.ple import CGC, PLE
from mtl_lightning.encoders.resnet import ResNetEncoder
from mtl_lightning.encoders.shared_bottom import PartialSharing, SharedBottom
from mtl_lightning.encoders.task_conditioned import TaskConditioned
from mtl_lightning.encoders.transformer import TransformerBlock, TransformerEncoder

__all__ = [
    "CGC",
    "MTAN",
    "PLE",
    "CrossStitch",
    "CrossStitchConv",
    "CrossStitchUnit",
    "MLPEncoder",
    "MMoE",
    "PartialSharing",
    "PerTaskEncoder",
    "ResNetEncoder",
    "SharedBottom",
    "SmallCNN",
    "TaskConditioned",
    "TransformerBlock",
    "TransformerEncoder",
]
