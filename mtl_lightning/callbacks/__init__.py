"""Callbacks of the template (Lightning's own callbacks are used wherever they fit)."""

from mtl_lightning.callbacks.checkpoint import ModelCheckpoint
from mtl_lightning.callbacks.conflict_heatmap import GradientConflictHeatmap
from mtl_lightning.callbacks.finetuning import EncoderFinetuning
from mtl_lightning.callbacks.metrics_table import MetricsTable, task_table
from mtl_lightning.callbacks.prediction_writer import PredictionWriter
from mtl_lightning.callbacks.resume_state import RandomStateCheckpoint
from mtl_lightning.callbacks.task_affinity import TaskAffinity
from mtl_lightning.callbacks.task_schedule import TaskSchedule
from mtl_lightning.callbacks.throughput import ThroughputTimer
from mtl_lightning.callbacks.weight_averaging import EMAWeightAveraging, SWAWeightAveraging

__all__ = [
    "EMAWeightAveraging",
    "EncoderFinetuning",
    "GradientConflictHeatmap",
    "MetricsTable",
    "ModelCheckpoint",
    "PredictionWriter",
    "RandomStateCheckpoint",
    "SWAWeightAveraging",
    "TaskAffinity",
    "TaskSchedule",
    "ThroughputTimer",
    "task_table",
]
