"""Model compression: pruning during training, dynamic int8 quantisation and low-rank (SVD) factorisation.

``ScheduledPruning`` is a training callback (``configs/callbacks/prune.yaml``); quantisation and factorisation turn
a checkpoint into a new one (``mtl compress quantize|svd|report``, see :mod:`mtl_lightning.compression.cli`).
"""

from mtl_lightning.compression.pruning import ScheduledPruning
from mtl_lightning.compression.report import SparsityRow, parameter_counts, sparsity_report

__all__ = ["ScheduledPruning", "SparsityRow", "parameter_counts", "sparsity_report"]
