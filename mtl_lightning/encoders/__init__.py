"""Shared encoders. Contract: the constructor takes ``input_shape`` (linked from the data module) and the
instance exposes ``out_features``, the width of the representation the heads are built on. An encoder may
return one tensor (hard sharing) or a ``{task: tensor}`` dict (one representation per task); the latter subclass
:class:`PerTaskEncoder`. The optional hooks (``bind_tasks``, ``fsdp_units``, ``training_logs``,
``flops_per_sample``) are the protocols of :mod:`mtl_lightning.contracts`."""

from typing import TYPE_CHECKING

from mtl_lightning.encoders.cnn import SmallCNN
from mtl_lightning.encoders.cross_attention import CrossTaskAttention
from mtl_lightning.encoders.cross_stitch import CrossStitch, CrossStitchConv, CrossStitchUnit
from mtl_lightning.encoders.hf import HFEncoder
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
    "CrossTaskAttention",
    "HFEncoder",
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

if TYPE_CHECKING:
    # The hooks each built-in encoder claims, checked by mypy (tests/test_contracts.py checks them at run time).
    from mtl_lightning import contracts as c

    _PER_TASK = (
        CGC,
        MTAN,
        PLE,
        CrossStitch,
        CrossStitchConv,
        CrossTaskAttention,
        MMoE,
        PartialSharing,
        SharedBottom,
        TaskConditioned,
    )
    _encoders: tuple[type[c.Encoder], ...] = (
        MLPEncoder,
        SmallCNN,
        ResNetEncoder,
        TransformerEncoder,
        HFEncoder,
        *_PER_TASK,
    )
    _bind_tasks: tuple[type[c.SupportsBindTasks], ...] = _PER_TASK
    _fsdp_units: tuple[type[c.SupportsFSDPUnits], ...] = (
        ResNetEncoder,
        TransformerEncoder,
        HFEncoder,
        CGC,
        MTAN,
        PLE,
        CrossStitch,
        CrossStitchConv,
        CrossTaskAttention,
        MMoE,
        PartialSharing,
        SharedBottom,
    )
    _training_logs: tuple[type[c.SupportsTrainingLogs], ...] = (
        CGC,
        MTAN,
        PLE,
        CrossStitch,
        CrossStitchConv,
        CrossTaskAttention,
        MMoE,
    )
    _flops: tuple[type[c.SupportsFlopsPerSample], ...] = (TransformerEncoder,)
    _input_shape: tuple[type[c.HasInputShape], ...] = (SmallCNN,)
    _vocab_size: tuple[type[c.HasVocabSize], ...] = (TransformerEncoder, HFEncoder)
