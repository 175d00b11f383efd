"""Checks of the trainer config against this machine, before anything is built: one line naming what to use instead.

Lightning's own messages are kept where they are clear. These cover the cases where Lightning is silent (fp16 on a
CPU is turned into bf16 with a warning; ``num_nodes > 1`` without a launcher waits forever for nodes that never
come) or cryptic ("No supported gpu backend found!").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from mtl_lightning.errors import ConfigError

# Environment variables that a multi-node launcher sets (torchrun / torchelastic, SLURM, LSF, MPI), or that a
# user sets by hand for Lightning's default environment (NODE_RANK with MASTER_ADDR).
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "NODE_RANK")


def _strategy_name(strategy: Any) -> str:
    """``ddp``/``fsdp``/... for a string, or the class name (lowercase) for a ``class_path`` config or an object."""
    if isinstance(strategy, str):
        return strategy.lower()
    if isinstance(strategy, Mapping) or hasattr(strategy, "class_path"):
        path = strategy["class_path"] if isinstance(strategy, Mapping) else strategy.class_path
        return str(path).rsplit(".", 1)[-1].lower()
    return type(strategy).__name__.lower() if strategy is not None else "auto"


def _gpu_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """Raise a ConfigError for a trainer config that cannot run here (or would hang, or silently change)."""
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    precision = str(trainer.get("precision") or "32-true").lower()
    strategy = _strategy_name(trainer.get("strategy"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _gpu_available())
    fsdp1 = strategy in ("fsdp", "fsdpstrategy") or strategy.startswith("fsdp_")  # fsdp_cpu_offload, ...
    if fsdp1 and (on_cpu or not _gpu_available()):
        raise ConfigError(
            "Lightning's FSDP strategy (configs/trainer/fsdp.yaml) needs GPUs; on CPU use FSDP2: "
            "--trainer configs/trainer/fsdp2.yaml --trainer.accelerator cpu --trainer.devices 2"
        )
    if accelerator in ("gpu", "cuda") and not _gpu_available():
        raise ConfigError(
            f"trainer.accelerator is {accelerator!r} but this machine has no usable CUDA GPU (torch "
            f"{torch.__version__}, cuda available: {torch.cuda.is_available()}); run on CPU with "
            "--trainer configs/trainer/cpu.yaml (or ddp_cpu.yaml / fsdp2.yaml --trainer.accelerator cpu)"
        )
    devices = trainer.get("devices")
    wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
    if not on_cpu and isinstance(wanted, int) and wanted > torch.cuda.device_count() >= 1:
        raise ConfigError(
            f"trainer.devices asks for {wanted} GPUs but this machine has {torch.cuda.device_count()}; use "
            f"--trainer.devices {torch.cuda.device_count()} (or -1 for every visible GPU)"
        )
    if on_cpu and precision in ("16-mixed", "16"):
        raise ConfigError(
            f"precision {precision!r} (float16) needs a GPU, and this run is on CPU; on CPU use bfloat16: "
            "--trainer configs/trainer/bf16.yaml (precision: bf16-mixed)"
        )
    num_nodes = int(trainer.get("num_nodes") or 1)
    if num_nodes > 1 and not any(os.environ.get(k) for k in _LAUNCHER_ENV):
        raise ConfigError(
            f"trainer.num_nodes is {num_nodes} but no launcher started this process, so it would wait forever for "
            "the other nodes: start one process per node with torchrun (--nnodes, --node_rank, --master_addr) or "
            "srun under SLURM (README, 'Several machines'), or set num_nodes: 1"
        )
