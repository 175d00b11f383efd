"""The multi-task LightningModule: a shared encoder, one head per task, masked per-task losses and metrics.

Flow of one batch ``{"inputs": x, "targets": {task: y}}``::

    z = encoder(x)                  # one tensor, or {task: tensor} for per-task representations
    out_t = heads[t](z_t)           # TaskHeads (an nn.ModuleDict keyed by task name)
    L_t = masked loss_t(out_t, y_t) # only labelled rows; absent tasks give a zero still tied to their head
    loss = balancer(L, z)           # one scalar: Lightning does backward, clipping, AMP, DDP/FSDP sync

This file is the Lightning glue only. What depends on a task's kind is in :mod:`mtl_lightning.kinds`; the heads in
:mod:`mtl_lightning.heads`; the per-stage metrics and loss means in :mod:`mtl_lightning.stage_metrics`; when step
values are logged in :mod:`mtl_lightning.step_logging`; sharding in :mod:`mtl_lightning.sharding`; what tools
change in a checkpoint before it loads in :mod:`mtl_lightning.checkpoint_hooks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mtl_lightning import compat
from mtl_lightning.balancers import BalanceInput, Balancer, StaticWeighting
from mtl_lightning.balancers.base import BalancerContext
from mtl_lightning.batches import unpack_batch
from mtl_lightning.checkpoint_hooks import run_load_hooks
from mtl_lightning.contracts import SupportsBindTasks, SupportsTrainingLogs
from mtl_lightning.heads import TaskHeads, representation_widths, sync_parts
from mtl_lightning.losses import build_loss, canonical_targets, raise_nonfinite, task_losses
from mtl_lightning.metrics import task_predictions
from mtl_lightning.monitoring import check_monitors
from mtl_lightning.sharding import clip_fsdp1, is_sharded, register_units, shard
from mtl_lightning.stage_metrics import StageMetrics
from mtl_lightning.step_logging import TrainStepLogging, every_step, log_this_step, train_step_values
from mtl_lightning.tasks import TaskSpec, parse_tasks
from mtl_lightning.transfer import InitReport, load_matching

STAGES = ("train", "val", "test")
# Constructor arguments that are objects (modules, callables). They are kept in the checkpoint's hparams only as
# the config that built them (when built from a config); a bare object is not stored, so checkpoints stay
# loadable with torch.load(weights_only=True).
_OBJECT_ARGS = ("encoder", "balancer", "optimizer", "lr_scheduler")


class MultiTaskModule(LightningModule):
    """A shared encoder and one head per task, trained on the balancer's combination of the task losses.

    Args:
        encoder: Any ``nn.Module`` exposing ``out_features`` (an int, or ``{task: int}`` when it returns one
            representation per task). Its ``input_shape`` is linked from the data module by the CLI. Optional hooks
            are the protocols of :mod:`mtl_lightning.contracts`: ``bind_tasks(names)`` (per-task gates or towers),
            ``fsdp_units()`` (the blocks to shard one by one) and ``training_logs()`` (scalars to log).
        tasks: Task specs; linked from the data module by the CLI, so a task is declared once.
        balancer: Turns per-task losses into one scalar; default: static weights from the specs (all 1 =
            equal weighting).
        optimizer: Optimizer factory, e.g. ``torch.optim.AdamW`` with its ``init_args`` in YAML.
        lr_scheduler: Optional LR scheduler factory.
        lr_scheduler_interval: Step the scheduler every ``epoch`` or ``step``.
        lr_scheduler_monitor: Metric for schedulers that need one (ReduceLROnPlateau).
        train_metrics: Update per-task metrics on training batches (set False to save time on huge runs).
        check_finite: Stop with an error naming the task as soon as a task loss is NaN/inf, before the
            weights are updated (costs one host sync per step on accelerators).
        compile: Compile the encoder with ``torch.compile`` when the model is configured (after any sharding).
            Only the encoder: compiling the whole LightningModule would trace ``self.log`` and the metrics.
        init_from: A checkpoint or state-dict file to initialise from: every tensor whose name and shape match is
            loaded, and a report says what was loaded, new, unused or skipped (``self.init_report``). For a new run
            from a trained model (tasks added or removed, a pretrained encoder); ``--ckpt_path`` resumes a run.
        init_include: Only load names starting with these prefixes, e.g. ``["encoder."]``.
        init_strict: Fail on a tensor whose shape differs (False: keep its fresh initialisation and report it).
        log_train_steps: When training steps log their values (:mod:`mtl_lightning.step_logging`): ``logger``
            on the steps the loggers write, ``every`` on every step, ``auto`` (default) ``every`` when a callback
            or the scheduler monitor reads a ``train/`` value.
    """

    static_weights: Tensor  # buffer (re)registered by _build_task_parts: the weights of val/loss and test/loss

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Sequence[TaskSpec],
        balancer: Balancer | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        train_metrics: bool = True,
        check_finite: bool = True,
        compile: bool = False,
        init_from: str | None = None,
        init_include: Sequence[str] = (),
        init_strict: bool = True,
        log_train_steps: TrainStepLogging = "auto",
    ):
        super().__init__()
        specs = parse_tasks(tasks)
        self._save_plain_hparams(specs)
        self.tasks: dict[str, TaskSpec] = {s.name: s for s in specs}
        self.encoder = encoder
        self.heads = TaskHeads()
        self.losses = nn.ModuleDict()
        # Separate attributes, not a ModuleDict: "train" is a method name that ModuleDict keys may not take.
        self.train_metrics = StageMetrics("train", self.tasks, with_metrics=train_metrics)
        self.val_metrics = StageMetrics("val", self.tasks)
        self.test_metrics = StageMetrics("test", self.tasks)
        self.balancer = balancer if balancer is not None else StaticWeighting()
        self._build_task_parts()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.update_train_metrics = train_metrics
        self.check_finite = check_finite
        self.compile_encoder = compile
        self.log_train_steps: TrainStepLogging = log_train_steps
        self._configured = False  # configure_model runs again for test/validate after fit: shard/compile once
        self._sharded = False  # set by configure_model: FSDP runs the heads on gathered copies of their parameters
        register_units(encoder)
        self._values_checked: set[str] = set()
        self._active: set[str] | None = None  # None: every task (see set_active_tasks)
        self._log_every_train_step = True  # resolved from log_train_steps in setup()
        self.init_report: InitReport | None = None
        if init_from:
            self.init_report = load_matching(self, init_from, include=init_include, strict=init_strict)
            rank_zero_info(self.init_report.summary())

    # ----------------------------------------------------------------------------------------------- set-up
    def _save_plain_hparams(self, specs: list[TaskSpec]) -> None:
        with warnings.catch_warnings():
            # Objects are dropped just below; Lightning's advice to ignore them would also drop the configs.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
            objects = [
                key
                for key in _OBJECT_ARGS
                if key in self.hparams and not isinstance(self.hparams[key], (dict, str, type(None)))
            ]
            if objects:
                # Saved again without them: Lightning's frozen copy (hparams_initial), which the loggers write to
                # hparams.yaml, would otherwise keep the encoder with its weights pickled into YAML (seconds per
                # run start for a model of a million parameters, and a copy of the weights held in memory).
                self.save_hyperparameters(ignore=objects)
        self.hparams["tasks"] = [s.to_dict() for s in specs]
        # The init file is read once, when the run starts; a checkpoint of this run already holds those weights, and
        # load_from_checkpoint must not look for a file that may be gone.
        self.hparams["init_from"] = None

    def _build_task_parts(self) -> None:
        """Heads, losses and metrics of tasks that lack them; drop those of removed tasks; rebuild per-task state.

        Called by ``__init__`` and by :meth:`add_task` / :meth:`remove_task`: the parts of tasks that stay keep their
        weights. The per-task state sized by the number of tasks (loss means, static weights, the balancer's
        state) is rebuilt for the new task list.
        """
        specs = list(self.tasks.values())
        if isinstance(self.encoder, SupportsBindTasks):  # per-task parts (gates, towers) learn the task names here
            self.encoder.bind_tasks(list(self.tasks))
        self.heads.sync(self.tasks, representation_widths(self.encoder, list(self.tasks)))
        sync_parts(self.losses, list(self.tasks), lambda name: build_loss(self.tasks[name]))
        for stage in self._stages():
            stage.sync(self.tasks)
        self.balancer.bind(specs, self.encoder)
        self.register_buffer("static_weights", self.balancer.fixed_weights(specs).float(), persistent=False)
        self.hparams["tasks"] = [s.to_dict() for s in specs]

    def _stages(self) -> tuple[StageMetrics, StageMetrics, StageMetrics]:
        return self.train_metrics, self.val_metrics, self.test_metrics

    def _check_between_fits(self, action: str) -> None:
        trainer = compat.attached_trainer(self)
        if trainer is not None and (trainer.training or trainer.validating or trainer.testing or trainer.predicting):
            raise RuntimeError(f"{action}: call it between fits, not while the trainer runs")

    def add_task(self, spec: TaskSpec | Mapping[str, Any]) -> None:
        """Add a task to a (trained) model between fits: a new head, loss and metrics; everything else is kept.

        The next ``trainer.fit`` builds a fresh optimizer (and LR schedule) over all parameters, so no optimizer
        state of the old task set is carried over; a stateful balancer restarts its state for the new task list.
        Save with ``trainer.save_checkpoint``: the checkpoint then records the new task list.
        """
        self._check_between_fits("add_task")
        new = parse_tasks([*self.tasks.values(), spec])[-1]
        self.tasks[new.name] = new
        self._build_task_parts()
        self._values_checked.clear()
        device = next(self.encoder.parameters(), torch.zeros(())).device
        self.to(device)

    def remove_task(self, name: str) -> None:
        """Remove a task between fits: its head, loss and metrics go; the other tasks keep their weights."""
        self._check_between_fits("remove_task")
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; this model's tasks are {self.task_names}")
        if len(self.tasks) == 1:
            raise ValueError(f"cannot remove {name!r}: it is the model's only task")
        del self.tasks[name]
        if self._active is not None:
            self._active.discard(name)
        self._build_task_parts()

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    # -------------------------------------------------------------------------------------------- forward
    def representations(self, inputs: Tensor | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """(per-task representations, the shared tensor under hard sharing or None).

        Under hard sharing every head reads its own alias (a view) of the shared tensor, so a gradient method gets
        all T per-task gradients w.r.t. the representation from one plain backward through the heads, instead of
        T backward passes (or a vmap whose cost grows as T^2; docs/benchmarks.md).
        """
        z = self.encoder(inputs)
        if isinstance(z, Mapping):
            return {name: z[name] for name in self.tasks}, None
        if not z.requires_grad:
            return dict.fromkeys(self.tasks, z), z
        return {name: z.view_as(z) for name in self.tasks}, z

    def head_outputs(self, reps: Mapping[str, Tensor], names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Raw head outputs of ``names`` (default: every task), each in its kind's canonical shape."""
        return self.heads.outputs(self.tasks, reps, names)

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw outputs (logits for classification) per task."""
        return self.head_outputs(self.representations(inputs)[0])

    # -------------------------------------------------------------------------------------- loss and steps
    def _unpack(self, batch: Any, stage: str) -> tuple[Any, dict[str, Tensor]]:
        # The full label-value check (one host sync) on the first batch of each stage; shapes are checked always.
        # The targets come out in canonical shape, once per step for the losses and the metrics.
        inputs, targets = unpack_batch(batch, stage, self.tasks, check_values=stage not in self._values_checked)
        self._values_checked.add(stage)
        if self._active is not None:
            targets = {k: v for k, v in targets.items() if k in self._active}
        return inputs, canonical_targets(self.tasks, targets)

    def task_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], canonical: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-task (sum over labelled entries, labelled count), each ``(T,)`` in task order."""
        return task_losses(self.losses, self.tasks, outputs, targets, canonical=canonical)

    def _scheduled_outputs(self, reps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Head outputs of the active tasks; a disabled task's head runs on zero rows.

        The zero-row output costs nothing yet ties the head's parameters to the loss (through the absent-task zero in
        :meth:`task_losses`), so every strategy sees the same zero gradient: DDP finds no unused parameters, FSDP2
        all-gathers and reduces the head's shards, and optimizers treat the head alike on one process or many.
        """
        active = self.active_tasks
        outputs = self.head_outputs(reps, active)
        if len(active) < len(self.tasks):
            idle = {n: r[:0] for n, r in reps.items() if n not in outputs}
            outputs.update(self.head_outputs(idle, list(idle)))
        return outputs

    @property
    def active_tasks(self) -> list[str]:
        """The tasks computed in training and evaluation steps (all, unless a schedule disabled some)."""
        return list(self.tasks) if self._active is None else [n for n in self.tasks if n in self._active]

    def set_active_tasks(self, names: Sequence[str] | None) -> None:
        """Compute only ``names`` from now on (None: every task); e.g. from a curriculum callback.

        A disabled task's head runs on zero rows only, its loss is a zero (its weight renormalises away) and
        its losses and metrics are not logged, so its curves show a gap rather than zeros. Predictions
        (``forward``/``predict_step``) always cover every task. Call it with the same names on every rank.
        """
        if names is not None:
            unknown = sorted(set(names) - set(self.tasks))
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; this model's tasks are {self.task_names}")
        self._active = None if names is None else set(names)

    def _world_size(self) -> int:
        trainer = compat.attached_trainer(self)
        return 1 if trainer is None else trainer.world_size

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = self._unpack(batch, "train")
        reps, shared = self.representations(inputs)
        outputs = self._scheduled_outputs(reps)
        sums, counts = self.task_losses(outputs, targets, canonical=True)
        # Under DDP a rank's sum is divided by the global count over the world size, so that DDP's gradient
        # averaging gives exactly the single-process mean over the global batch, even when ranks hold different
        # numbers of labelled rows (or none) for a task; `present` is then the same on every rank.
        trainer = compat.attached_trainer(self)
        world = 1 if trainer is None else trainer.world_size
        global_counts = counts if world == 1 else self.trainer.strategy.reduce(counts.float(), reduce_op="sum")
        means = sums * world / global_counts.clamp_min(1)
        present = global_counts > 0
        present_on_host = None
        if self.check_finite:
            # One host synchronisation for two facts: whether every loss is finite, and which tasks are present
            # (which a gradient method needs on the host to take the present tasks' sub-Gramian).
            flags = torch.cat([torch.isfinite(means).all().view(1), present]).tolist()
            if not flags[0]:
                raise_nonfinite(self.task_names, means, self.global_step)
            present_on_host = flags[1:]
        log_now = log_this_step(trainer, self._log_every_train_step)
        result = self.balancer(
            BalanceInput(
                means,
                present,
                reps,
                self.global_step,
                log=log_now,
                shared=shared,
                task_parameters=self._task_parameters(),
                present_on_host=present_on_host,
            )
        )
        self._last_means = means.detach()
        self.train_metrics.add(sums, counts, outputs if self.update_train_metrics else None, targets, canonical=True)
        if log_now:  # a task without a label anywhere in the step logs NaN (a gap in the curve), not a zero loss
            shown = torch.where(present, means.detach(), torch.full_like(means, torch.nan))
            self._log_train_step(result.loss, shown, result.weights, result.logs)
        return result.loss

    def _task_parameters(self) -> list[Tensor]:
        """The parameters between the representations and the losses, for gradient methods to hand over.

        Empty under FSDP (its forward reads gathered copies, not these tensors, so their gradients must come from
        the sharded backward) and for balancers that do not read them (gathering them costs ~0.1 ms at 10 tasks).
        """
        if self._sharded or not self.balancer.uses_task_parameters:
            return []
        return [*self.heads.parameters(), *self.losses.parameters()]  # the balancer skips frozen ones

    def _log_train_step(self, loss: Tensor, means: Tensor, weights: Tensor, extra: Mapping[str, Tensor]) -> None:
        encoder_logs = dict(self.encoder.training_logs()) if isinstance(self.encoder, SupportsTrainingLogs) else {}
        logs = train_step_values(
            self.trainer.strategy, loss, means, weights, encoder_logs, extra, self.task_names, self.active_tasks
        )
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    def _eval_step(self, batch: Any, stage: StageMetrics) -> None:
        inputs, targets = self._unpack(batch, stage.stage)
        outputs = self._scheduled_outputs(self.representations(inputs)[0])
        sums, counts = self.task_losses(outputs, targets, canonical=True)
        stage.add(sums, counts, outputs, targets, canonical=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per-task predictions, as each task's kind makes them: probabilities for classification, values, ..."""
        inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
        return task_predictions(self.tasks, self(inputs))

    # ----------------------------------------------------------------------------------- epoch-level logs
    def _log_epoch(self, stage: StageMetrics) -> None:
        logs = stage.epoch_values(self.static_weights, self.active_tasks, self._world_size(), self.device)
        # The values are already global (torchmetrics and the loss tracker reduce their states across ranks in
        # compute()); sync_dist=True only averages identical numbers (a few small all-reduces per epoch), and keeps
        # Lightning from warning on every name that epoch values under DDP should be synced.
        self.log_dict(
            {k: v.float() for k, v in logs.items()}, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.balancer.on_train_batch_end(self._last_means)

    def on_train_epoch_end(self) -> None:
        self.balancer.on_train_epoch_end()
        self._log_epoch(self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def logged_metric_names(self, stage: str | None = None) -> list[str]:
        """Every name this module logs (per stage), for checking ``monitor`` settings before training."""
        return [name for s in self._stages() if stage in (None, s.stage) for name in s.names()]

    # ------------------------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str) -> None:
        self._values_checked.clear()
        for metrics in self._stages():  # leftovers of an interrupted run
            metrics.pending.clear()
        trainer = compat.attached_trainer(self)
        if trainer is not None:
            scheduler_monitor = self.lr_scheduler_monitor if self.lr_scheduler else None
            check_monitors(trainer, self.logged_metric_names(), scheduler_monitor)
            self._log_every_train_step = every_step(self.log_train_steps, trainer, scheduler_monitor)

    def configure_model(self) -> None:
        """Shard (FSDP2, when the strategy gives a device mesh) and compile the encoder, once per model.

        Lightning calls this hook at the start of every ``fit``/``validate``/``test``/``predict``; the flag keeps
        a model that is fitted then tested from being wrapped twice. Lightning's FSDPStrategy (FSDP1) does its own
        wrapping with :func:`mtl_lightning.sharding.encoder_units_policy` and needs nothing here.
        """
        if self._configured:
            return
        mesh = self.device_mesh
        self._sharded = is_sharded(compat.attached_trainer(self), mesh)
        self.balancer.check(BalancerContext(sharded=self._sharded))
        shard(self, mesh)
        if self.compile_encoder:
            self.encoder.compile()
        self._configured = True

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if not clip_fsdp1(compat.attached_trainer(self), gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = compat.attached_trainer(self)
        # Tools that change a model's structure (compression) rebuild it here, so that Lightning can load the weights
        # into matching modules; they may refuse to resume a fit from their checkpoints.
        run_load_hooks(self, checkpoint, fitting=trainer is not None and trainer.state.fn == TrainerFn.FITTING)
        # Task names from the head weights the checkpoint holds, in their order (the order of the ModuleDict).
        saved = list(dict.fromkeys(k.split(".")[1] for k in checkpoint.get("state_dict", {}) if k.startswith("heads.")))
        if saved and saved != self.task_names:
            raise ValueError(
                f"the checkpoint was trained on tasks {saved} but this model declares {self.task_names}. Use the "
                "config the checkpoint was trained with (it is saved next to its logs as config.yaml), or start "
                "from it with new tasks via transfer learning instead of --ckpt_path"
            )
