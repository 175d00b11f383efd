"""Fine-tune a pretrained encoder: train the heads on a frozen encoder first, then unfreeze it at a lower LR.

Built on Lightning's :class:`~lightning.pytorch.callbacks.BaseFinetuning`, the base of its ``BackboneFinetuning``
(kept from it: freezing in ``setup`` before the optimizer exists, a ``finetune_function`` at every epoch start, and
the optimizer's parameter groups saved in the callback's state and restored on resume). ``BackboneFinetuning``
itself does not fit this template, for reasons that each change below answers:

- It reads ``pl_module.backbone``; here the backbone is ``pl_module.encoder``. Renaming the encoder (or aliasing it as
  a second attribute, which registers it twice) would change every checkpoint key, so the hooks use ``.encoder``.
- ``MultiTaskModule.configure_optimizers`` hands *all* parameters to the optimizer, and ``unfreeze_and_add_param_group``
  skips parameters the optimizer already holds (with a warning, and comparing by value: two fresh zero biases count
  as the same): the encoder would train at the heads' LR. Frozen parameters are therefore taken out of the optimizer
  when fitting starts, and the unfrozen encoder comes back as a parameter group of its own, named ``encoder``.
- A group added during training breaks most LR schedulers of torch >= 2.9 (``zip(..., strict=True)`` over their
  per-group lists: CosineAnnealingLR at its restart, LambdaLR, SequentialLR, OneCycleLR, CyclicLR ... raise). The new
  group is registered with every scheduler of the optimizer, at ``ratio`` times the heads' base LR, so the encoder's
  LR stays ``ratio`` times the heads' LR whatever the schedule does; ``ratio`` starts at ``backbone_lr_factor`` and is
  multiplied by ``lr_growth`` every epoch up to 1 (BackboneFinetuning's ramp, which sets an absolute LR instead).
- DDP only reduces the gradients of parameters that required grad when it wrapped the model (Lightning issue #20340:
  BackboneFinetuning + DDP trains a different encoder on every rank). The late-unfrozen encoder's gradients are
  all-reduced here, in one flat buffer, before every optimizer step. Sharded strategies (FSDP, FSDP2) are refused.
- While frozen, the encoder runs in eval mode (BatchNorm uses and keeps its running statistics, dropout is off), so
  the heads train on the features they see at validation; Lightning's ``freeze`` makes BatchNorm normalise with batch
  statistics in training and running ones in evaluation. ``train_bn: true`` keeps BatchNorm trainable instead.
- Unfreezing restores the encoder's own ``requires_grad`` flags (``ResNetEncoder(freeze_bn=True)``, layers a user
  froze); Lightning's ``make_trainable`` switches on every parameter.
- A frozen encoder's output does not require grad, but gradient balancers (MGDA, UPGrad, ...) take the task
  gradients w.r.t. it: while frozen, the output is made a leaf that requires grad, so they run. Their weights then
  change nothing (each head is trained by its own loss alone) but their telemetry is real. Parameter mode, which needs
  the encoder's parameters, is refused while they are frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.optim import Optimizer

from mtl_lightning.compat import child_schedulers
from mtl_lightning.contracts import HasGradientMode
from mtl_lightning.errors import ConfigError

log = logging.getLogger(__name__)
GROUP = "encoder"  # the name of the encoder's parameter group (LearningRateMonitor logs lr-<Optimizer>/encoder)


class EncoderFinetuning(BaseFinetuning):
    """Freeze ``pl_module.encoder`` for the first ``unfreeze_at_epoch`` epochs, then train it in a parameter group of
    its own whose LR is ``ratio`` times the heads' LR: ``ratio`` starts at ``backbone_lr_factor`` and is multiplied
    by ``lr_growth`` every later epoch, up to 1. Heads named in ``freeze_heads`` stay frozen throughout.

    Args:
        unfreeze_at_epoch: The epoch at whose start the encoder is unfrozen (0: from the start, at the lower LR);
            None: never (train the heads on a fixed encoder: a linear probe).
        backbone_lr_factor: The encoder's LR when unfrozen, as a fraction of the heads' LR (BackboneFinetuning's
            ``backbone_initial_ratio_lr``).
        lr_growth: Factor applied to that fraction at each later epoch, capped at 1 (1: keep it).
        freeze_heads: Task names whose heads are never trained (kept in eval mode and out of the optimizer).
        train_bn: Keep the encoder's BatchNorm layers trainable (scale, shift and running statistics) while the rest
            of it is frozen.
        verbose: Log the encoder's LR when it changes.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = 1,
        backbone_lr_factor: float = 0.1,
        lr_growth: float = 2.0,
        freeze_heads: Sequence[str] = (),
        train_bn: bool = False,
        verbose: bool = False,
    ):
        super().__init__()
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise ConfigError(f"EncoderFinetuning: unfreeze_at_epoch must be >= 0 or null, got {unfreeze_at_epoch}")
        if not (0 < backbone_lr_factor <= 1 and lr_growth >= 1):
            raise ConfigError(
                "EncoderFinetuning: backbone_lr_factor must be in (0, 1] and lr_growth >= 1, got "
                f"{backbone_lr_factor} and {lr_growth}"
            )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_factor = backbone_lr_factor
        self.lr_growth = lr_growth
        self.freeze_heads = list(freeze_heads)
        self.train_bn = train_bn
        self.verbose = verbose
        self.ratio = backbone_lr_factor  # the encoder's LR / the heads' LR once unfrozen (checkpointed)
        self._trainable: dict[str, bool] = {}  # the encoder's own requires_grad flags, before freezing
        self._frozen_ids: set[int] = set()  # parameters this callback froze (encoder and heads)
        self._late: list[nn.Parameter] = []  # encoder parameters unfrozen after DDP wrapped the model
        self._encoder_frozen = False
        self._hook: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "encoder_lr_ratio": self.ratio}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ratio = state_dict.get("encoder_lr_ratio", self.backbone_lr_factor)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "encoder_lr_ratio"})

    # ---------------------------------------------------------------------------------------------- freezing
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ConfigError(
                f"EncoderFinetuning works on one device or with DDP, not with {type(strategy).__name__}: sharded "
                "parameters cannot change requires_grad after wrapping. Use a ddp preset, or drop the callback"
            )
        balancer = getattr(pl_module, "balancer", None)
        parameter_mode = isinstance(balancer, HasGradientMode) and balancer.mode == "parameter"
        if stage == "fit" and self.unfreeze_at_epoch != 0 and parameter_mode:
            raise ConfigError(
                f"{type(balancer).__name__}(mode='parameter') takes gradients w.r.t. the encoder's parameters, which "
                "EncoderFinetuning freezes for the first epochs; use the balancer's mode: representation, or "
                "unfreeze_at_epoch: 0"
            )
        super().setup(trainer, pl_module, stage)  # calls freeze_before_training; refuses DeepSpeed

    def freeze_before_training(self, pl_module: LightningModule) -> None:
        encoder = _encoder(pl_module)
        heads = getattr(pl_module, "heads", None)
        names = list(heads) if isinstance(heads, nn.ModuleDict) else []
        unknown = [h for h in self.freeze_heads if h not in names]
        if unknown:
            raise ConfigError(f"EncoderFinetuning: freeze_heads names unknown task(s) {unknown}; the tasks are {names}")
        if not self._frozen_ids:  # first set-up: remember what the encoder itself wants trained
            self._trainable = {n: p.requires_grad for n, p in encoder.named_parameters()}
        for name in self.freeze_heads:
            for param in heads[name].parameters():  # type: ignore[index]
                self._freeze(param)
        for module, param in _params_with_module(encoder):
            if not (self.train_bn and isinstance(module, nn.modules.batchnorm._BatchNorm)):
                self._freeze(param)
        self._encoder_frozen = True
        if self._hook is None:
            self._hook = encoder.register_forward_hook(_output_requires_grad)

    def _freeze(self, param: nn.Parameter) -> None:
        param.requires_grad_(False)
        self._frozen_ids.add(id(param))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad or id(p) not in self._frozen_ids]
        super().on_fit_start(trainer, pl_module)  # on resume: the saved groups, with the encoder's
        for optimizer in trainer.optimizers:
            if len(optimizer.param_groups) > 1 and _encoder_group(optimizer) is not None:
                _fit_schedulers(trainer, optimizer, self.ratio)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Frozen parts stay in eval mode (Lightning switches the model back to train mode after validation).
        if self._encoder_frozen and not self.train_bn:
            _encoder(pl_module).eval()
        for name in self.freeze_heads:
            cast(nn.ModuleDict, pl_module.heads)[name].eval()

    # -------------------------------------------------------------------------------------------- unfreezing
    def finetune_function(self, pl_module: LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch:
            return
        trainer = pl_module.trainer
        if epoch == self.unfreeze_at_epoch:
            self.ratio = self.backbone_lr_factor
            self._unfreeze(pl_module, optimizer, trainer)
        else:
            if self._encoder_frozen:  # resumed: set-up froze it again; the restored groups already hold it
                self._unfreeze(pl_module, optimizer, trainer)
            self.ratio = min(1.0, self.ratio * self.lr_growth)
        group = _encoder_group(optimizer)
        if group is not None:
            group["lr"] = optimizer.param_groups[0]["lr"] * self.ratio
            _fit_schedulers(trainer, optimizer, self.ratio)
            if self.verbose:
                log.info(f"EncoderFinetuning: epoch {epoch}, encoder lr {group['lr']:.3g} ({self.ratio:.3g} x heads)")

    def _unfreeze(self, pl_module: LightningModule, optimizer: Optimizer, trainer: Trainer) -> None:
        encoder = _encoder(pl_module)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        unfrozen = []
        for name, param in encoder.named_parameters():
            if id(param) in self._frozen_ids and self._trainable.get(name, True):
                param.requires_grad_(True)
                self._frozen_ids.discard(id(param))
                unfrozen.append(param)
        self._encoder_frozen = False
        encoder.train(pl_module.training)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}  # identity, not torch.equal
        new = [p for p in unfrozen if id(p) not in held]
        if new:
            optimizer.add_param_group(
                {"params": new, "lr": optimizer.param_groups[0]["lr"] * self.ratio, "name": GROUP}
            )
        if isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
            self._late = unfrozen  # DDP wrapped the model while these were frozen: it does not reduce their grads

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Average the late-unfrozen encoder gradients over the ranks, as DDP does for the parameters it wrapped."""
        if not self._late or not (dist.is_available() and dist.is_initialized()):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._late]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        start = 0
        for param in self._late:
            param.grad = flat[start : start + param.numel()].view_as(param)
            start += param.numel()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._late = []


# ------------------------------------------------------------------------------------------------- helpers
def _encoder(pl_module: LightningModule) -> nn.Module:
    encoder = getattr(pl_module, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(
            "EncoderFinetuning needs a LightningModule with an nn.Module `encoder` attribute (MultiTaskModule); "
            f"{type(pl_module).__name__} has none"
        )
    return encoder


def _encoder_group(optimizer: Optimizer) -> dict[str, Any] | None:
    return next((g for g in optimizer.param_groups if g.get("name") == GROUP), None)


def _params_with_module(module: nn.Module) -> Iterator[tuple[nn.Module, nn.Parameter]]:
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            yield sub, param


def _output_requires_grad(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of a frozen encoder: its output (a leaf, no graph behind it) requires grad, so that methods
    taking gradients w.r.t. the representation (gradient balancers) still can; a no-op under no_grad/inference."""
    if not torch.is_grad_enabled():
        return output

    def mark(t: Tensor) -> Tensor:
        return t.requires_grad_() if t.is_floating_point() and t.grad_fn is None and not t.requires_grad else t

    if isinstance(output, Tensor):
        return mark(output)
    if isinstance(output, Mapping):
        return {k: mark(v) if isinstance(v, Tensor) else v for k, v in output.items()}
    return output


def _fit_schedulers(trainer: Trainer, optimizer: Optimizer, ratio: float) -> None:
    """Make the optimizer's LR schedulers drive the encoder's group at ``ratio`` times the first group."""
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizer:
            _fit_scheduler(config.scheduler, optimizer, ratio)


def _fit_scheduler(scheduler: Any, optimizer: Optimizer, ratio: float) -> None:
    """Extend a scheduler's per-group lists to the optimizer's groups (added ones are the encoder's) and set the
    encoder's entries to ``ratio`` times the first group's. Covers torch's schedulers, SequentialLR's and
    ChainedScheduler's children included; LRs of the first group are never changed."""
    for child in child_schedulers(scheduler):
        _fit_scheduler(child, optimizer, ratio)
    groups = optimizer.param_groups
    encoder = [i for i, g in enumerate(groups) if g.get("name") == GROUP]
    scaled = ("base_lrs", "max_lrs")  # per-group LRs: the encoder's are ratio x the first group's
    copied = ("lr_lambdas", "min_lrs")  # per-group factors and floors: the first group's
    for attr in (*scaled, *copied):
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list) or not values:
            continue
        while len(values) < len(groups):
            values.append(values[0])
        for i in encoder:
            values[i] = values[0] * ratio if attr in scaled else values[0]
    first = groups[0]
    for i in encoder:
        # OneCycleLR and CyclicLR read these keys of every group; initial_lr is the base LR of all schedulers.
        for key in ("initial_lr", "max_lr", "min_lr"):
            if key in first:
                groups[i][key] = first[key] * ratio
        for key in ("max_momentum", "base_momentum"):
            if key in first:
                groups[i][key] = first[key]
