"""Sharding units of a multi-task model for FSDP (Lightning's ``FSDPStrategy``) and FSDP2 (``fully_shard``).

An encoder may say which of its submodules are worth sharding one by one by defining ``fsdp_units()`` (a
transformer returns its blocks). The tiny task heads are never worth a unit of their own under FSDP1, which
all-gathers per unit; FSDP2 has no such cost per unit and cannot shard an ``nn.ModuleDict`` as such (it has no
forward), so there each head is its own unit.

- FSDP2: :class:`FSDP2Strategy` (``configs/trainer/fsdp2.yaml``) gives the module a data-parallel device mesh over
  every process, and ``MultiTaskModule.configure_model`` calls :func:`fully_shard_model` with it.
- FSDP1: :func:`encoder_units_policy`, the ``auto_wrap_policy`` of ``configs/trainer/fsdp.yaml``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch.nn as nn
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from mtl_lightning.compat import set_model_parallel_sizes
from mtl_lightning.contracts import SupportsFSDPUnits
from mtl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

# The FSDP1 policy below sees one module at a time, with no reference to the model: the units carry a mark, set on
# the module itself when the model is built (no registry that outlives the model).
_UNIT_MARK = "_mtl_fsdp_unit"


def encoder_units(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's sharding units (``encoder.fsdp_units()``), or none when it defines no such method."""
    return list(encoder.fsdp_units()) if isinstance(encoder, SupportsFSDPUnits) else []


def register_units(encoder: nn.Module) -> None:
    """Mark the encoder's units for :func:`encoder_units_policy` (called when the model is built)."""
    for unit in encoder_units(encoder):
        object.__setattr__(unit, _UNIT_MARK, True)  # a plain attribute: not a parameter, buffer or submodule


def encoder_units_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 auto-wrap policy: one FSDP unit per encoder unit; everything else (heads, balancer) in the root unit.

    The signature is FSDP's callable policy: with ``recurse=True`` it asks whether to look inside ``module``.
    """
    return True if recurse else bool(getattr(module, _UNIT_MARK, False))


def fully_shard_model(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2 on a ``MultiTaskModule``: the encoder's units, the encoder, each head, then any other child with
    parameters (a balancer's learned weights), so that every parameter's gradient is reduced across ranks.

    Parameters left out of every ``fully_shard`` call would silently drift apart between ranks (no DDP wrapper
    averages them under ``ModelParallelStrategy``): this is why every child with parameters gets a unit.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    encoder = cast(nn.Module, model.encoder)
    for unit in encoder_units(encoder):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(encoder, mesh=mesh, mp_policy=policy)
    for head in cast(nn.ModuleDict, model.heads).values():
        fully_shard(head, mesh=mesh, mp_policy=policy)
    for name, child in model.named_children():
        if name in ("encoder", "heads"):
            continue
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, mp_policy=policy)
    left = [n for n, p in model.named_parameters() if p.requires_grad and type(p).__name__ != "DTensor"]
    if left:
        raise ConfigError(f"FSDP2 left parameters {left} unsharded; give their module to fully_shard_model")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: data parallel over all processes of all nodes.

    ``ModelParallelStrategy`` defaults to tensor parallelism inside a node (``tensor_parallel_size`` = devices)
    and needs ``data_parallel_size`` spelt out for anything else, i.e. the number of processes written into the
    config. This subclass sizes the data-parallel mesh from the trainer's devices and nodes instead, so one preset
    serves any machine. Everything else (checkpointing, process groups) is Lightning's.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        set_model_parallel_sizes(self, data_parallel=self.num_nodes * self.num_processes, tensor_parallel=1)
        super().setup_environment()


def is_sharded(trainer: Any, mesh: DeviceMesh | None) -> bool:
    """Whether the model runs sharded: FSDP2 (a device mesh) or Lightning's FSDP1 strategy."""
    return mesh is not None or isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def shard(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """FSDP2 on the model when the strategy gave it a device mesh (FSDP1 wraps by its own policy: nothing here)."""
    if mesh is None:
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            "MultiTaskModule shards with FSDP2 only (data parallel); set the ModelParallelStrategy's "
            "tensor_parallel_size: 1 (configs/trainer/fsdp2.yaml)"
        )
    fully_shard_model(model, mesh["data_parallel"] if "data_parallel" in names else mesh)


def clip_fsdp1(trainer: Any, gradient_clip_val: float | None, gradient_clip_algorithm: str | None) -> bool:
    """Clip by norm under Lightning's FSDP1 strategy, where its precision plugin refuses to; True if done.

    The norm must be taken over every rank's shard, which FSDP1's root module does in ``clip_grad_norm_`` (as
    Lightning's FSDP docs advise). FSDP2 (DTensor gradients) and every other strategy use Lightning's own clipping.
    """
    model = getattr(trainer, "model", None)
    if (
        gradient_clip_val
        and gradient_clip_algorithm in (None, "norm")
        and isinstance(getattr(trainer, "strategy", None), FSDPStrategy)
        and model is not None
        and hasattr(model, "clip_grad_norm_")
    ):
        model.clip_grad_norm_(gradient_clip_val)
        return True
    return False
