"""The multi-task LightningModule: a shared encoder, one head per task, masked per-task losses and metrics.

Flow of one batch ``{"inputs": x, "targets": {task: y}}``::

    z = encoder(x)                  # one tensor, or {task: tensor} for per-task representations
    out_t = heads[t](z_t)           # nn.ModuleDict keyed by task name
    L_t = masked loss_t(out_t, y_t) # only labelled rows; absent tasks give a zero still tied to their head
    loss = balancer(L, z)           # one scalar: Lightning does backward, clipping, AMP, DDP/FSDP sync
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MetricCollection

from mtl_lightning.balancers import BalanceInput, Balancer, StaticWeighting
from mtl_lightning.compression.checkpoint import refuse_resume, restore_compression
from mtl_lightning.errors import ConfigError
from mtl_lightning.heads import build_head
from mtl_lightning.loss_tracker import StepAccumulator, TaskLossMean
from mtl_lightning.losses import build_loss, masked_loss
from mtl_lightning.metrics import build_metrics, metric_inputs, metric_update, predictions
from mtl_lightning.monitoring import check_monitors
from mtl_lightning.sharding import fully_shard_model, register_units
from mtl_lightning.targets import canonical_target, check_targets, expected_shape
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec, parse_tasks
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
            representation per task). Its ``input_shape`` is linked from the data module by the CLI. Optional hooks:
            ``bind_tasks(names)`` (called here with the task names, for per-task gates or towers),
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
    """

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
    ):
        super().__init__()
        specs = parse_tasks(tasks)
        self._save_plain_hparams(specs)
        self.tasks: dict[str, TaskSpec] = {s.name: s for s in specs}
        self.encoder = encoder
        self.heads = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        self.train_metrics = nn.ModuleDict()
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self.balancer = balancer if balancer is not None else StaticWeighting()
        self._build_task_parts()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        self.update_train_metrics = train_metrics
        self.check_finite = check_finite
        self.compile_encoder = compile
        self._configured = False  # configure_model runs again for test/validate after fit: shard/compile once
        self._sharded = False  # set by configure_model: FSDP runs the heads on gathered copies of their parameters
        register_units(encoder)
        self._values_checked: set[str] = set()
        self._active: set[str] | None = None  # None: every task (see set_active_tasks)
        self._log_every_train_step = True  # until setup() knows whether anything monitors a train/ name
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
        self.hparams["tasks"] = [s.to_dict() for s in specs]
        # The init file is read once, when the run starts; a checkpoint of this run already holds those weights, and
        # load_from_checkpoint must not look for a file that may be gone.
        self.hparams["init_from"] = None
        for key in _OBJECT_ARGS:
            if key in self.hparams and not isinstance(self.hparams[key], (dict, str, type(None))):
                del self.hparams[key]

    def _build_task_parts(self) -> None:
        """Heads, losses and metrics of tasks that lack them; drop those of removed tasks; rebuild per-task state.

        Called by ``__init__`` and by :meth:`add_task` / :meth:`remove_task`: the parts of tasks that stay keep their
        weights. The per-task state sized by the number of tasks (loss trackers, static weights, the balancer's
        state) is rebuilt for the new task list.
        """
        specs = list(self.tasks.values())
        bind = getattr(self.encoder, "bind_tasks", None)
        if callable(bind):  # encoders with per-task parts (gates, towers) learn the task names here
            bind(list(self.tasks))
        widths = self._representation_widths(self.encoder)
        for parts in (self.heads, self.losses, self.train_metrics, self.val_metrics, self.test_metrics):
            for name in [n for n in parts if n not in self.tasks]:
                del parts[name]
        for spec in specs:
            if spec.name not in self.heads:
                self.heads[spec.name] = build_head(spec, widths[spec.name])
                self.losses[spec.name] = build_loss(spec)
                for stage in STAGES:
                    getattr(self, f"{stage}_metrics")[spec.name] = build_metrics(spec, stage)
        # The ModuleDicts follow the task order (a new task goes last, like in the spec list).
        for parts in (self.heads, self.losses, self.train_metrics, self.val_metrics, self.test_metrics):
            ordered = [(n, parts[n]) for n in self.tasks]
            parts.clear()
            parts.update(dict(ordered))
        self.balancer.bind(specs, self.encoder)
        # Separate attributes, not a ModuleDict: "train" is a method name that ModuleDict keys may not take.
        self.train_loss_mean = TaskLossMean(len(specs))
        self.val_loss_mean = TaskLossMean(len(specs))
        self.test_loss_mean = TaskLossMean(len(specs))
        # Per-step losses and metric inputs, fed to the trackers above and the metrics in blocks of steps.
        self._pending = {stage: StepAccumulator() for stage in STAGES}
        self.register_buffer("static_weights", torch.tensor([s.weight for s in specs]), persistent=False)
        self.hparams["tasks"] = [s.to_dict() for s in specs]

    def _check_between_fits(self, action: str) -> None:
        trainer = self._trainer
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

    def _representation_widths(self, encoder: nn.Module) -> dict[str, int]:
        width = getattr(encoder, "out_features", None)
        if isinstance(width, Mapping):
            missing = sorted(set(self.tasks) - set(width))
            if missing:
                raise ValueError(f"encoder {type(encoder).__name__}.out_features has no width for tasks {missing}")
            return {name: int(width[name]) for name in self.tasks}
        if not isinstance(width, int):
            raise TypeError(
                f"encoder {type(encoder).__name__} must expose `out_features` (the width of its representation, "
                "an int or a {task: int} dict) so the task heads can be built"
            )
        return dict.fromkeys(self.tasks, width)

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
        """Raw head outputs of ``names`` (default: every task) in canonical shape: ``(N,)`` or ``(N, K)``."""
        outputs = {}
        for name in self.tasks if names is None else names:
            spec = self.tasks[name]
            out = self.heads[name](reps[name])
            outputs[name] = out.squeeze(-1) if spec.num_outputs == 1 and spec.kind != "multilabel" else out
        return outputs

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw outputs (logits for classification) per task."""
        return self.head_outputs(self.representations(inputs)[0])

    # -------------------------------------------------------------------------------------- loss and steps
    def _unpack(self, batch: Any, stage: str) -> tuple[Any, dict[str, Tensor]]:
        if not isinstance(batch, Mapping) or "inputs" not in batch:
            raise TypeError(
                f"{stage} batch must be a dict {{'inputs': ..., 'targets': {{task: tensor}}}}, got "
                f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}"
            )
        targets = dict(batch.get("targets") or {})
        if stage not in self._values_checked:
            # Full label-value check (one host sync) on the first batch of each stage; shapes are checked always.
            inputs = batch["inputs"]
            first = inputs if isinstance(inputs, Tensor) else next(iter(inputs.values()))
            check_targets(self.tasks, targets, first.shape[0], f"the first {stage} batch", values=True)
            self._values_checked.add(stage)
        elif set(targets) - set(self.tasks):
            check_targets(self.tasks, targets, 0, f"a {stage} batch", values=False)
        return batch["inputs"], targets

    def task_losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-task (sum over labelled entries, labelled count), each ``(T,)`` in task order."""
        sums, counts = [], []
        for name, spec in self.tasks.items():
            out = outputs[name]
            if name in targets:
                s, c = masked_loss(self.losses[name], spec, out, canonical_target(spec, targets[name]))
            else:  # absent task: a zero that still touches the head, so DDP sees every parameter used
                s, c = out.sum() * 0.0, torch.zeros((), dtype=torch.long, device=out.device)
            sums.append(s)
            counts.append(c)
        return torch.stack(sums).float(), torch.stack(counts)

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

    def _accumulate(
        self,
        stage: str,
        sums: Tensor,
        counts: Tensor,
        outputs: Mapping[str, Tensor] | None,
        targets: Mapping[str, Tensor],
    ) -> None:
        """Queue a step's loss sums/counts and (unless ``outputs`` is None) its metric inputs; see StepAccumulator."""
        canonical = None if outputs is None else {n: canonical_target(self.tasks[n], t) for n, t in targets.items()}
        if self._pending[stage].add(sums, counts, outputs, canonical):
            self._flush(stage)

    def _flush(self, stage: str) -> None:
        """Update the stage's loss tracker and metrics with the queued steps (one update per metric)."""
        pending = self._pending[stage]
        if not pending.steps:
            return
        sums, counts, blocks = pending.take()
        getattr(self, f"{stage}_loss_mean").update(sums, counts)
        collections = getattr(self, f"{stage}_metrics")
        for name, (out, target) in blocks.items():
            spec = self.tasks[name]
            preds, target = metric_inputs(spec, out.float(), target)
            metric_update(collections[name], spec, preds, target)

    def _raise_nonfinite(self, means: Tensor) -> None:
        bad = [name for name, ok in zip(self.tasks, torch.isfinite(means).tolist(), strict=True) if not ok]
        raise FloatingPointError(
            f"the loss of task(s) {bad} became {means[~torch.isfinite(means)].tolist()} at step "
            f"{self.global_step}; training stopped before the weights were updated. Lower the learning rate, "
            "enable gradient clipping (trainer.gradient_clip_val), or check those tasks' targets for inf/huge values"
        )

    def _active_targets(self, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return targets if self._active is None else {k: v for k, v in targets.items() if k in self._active}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = self._unpack(batch, "train")
        targets = self._active_targets(targets)
        reps, shared = self.representations(inputs)
        outputs = self._scheduled_outputs(reps)
        sums, counts = self.task_losses(outputs, targets)
        # Under DDP a rank's sum is divided by the global count over the world size, so that DDP's gradient
        # averaging gives exactly the single-process mean over the global batch, even when ranks hold different
        # numbers of labelled rows (or none) for a task; `present` is then the same on every rank.
        global_counts = self._global_counts(counts)
        world = self.trainer.world_size if self._trainer is not None else 1
        means = sums * world / global_counts.clamp_min(1)
        if self.check_finite and not bool(torch.isfinite(means).all()):
            self._raise_nonfinite(means)
        log_now = self._train_step_logs_wanted()
        present = global_counts > 0
        result = self.balancer(
            BalanceInput(
                means,
                present,
                reps,
                self.global_step,
                log=log_now,
                shared=shared,
                task_parameters=self._task_parameters(),
            )
        )
        self._last_means = means.detach()
        self._accumulate("train", sums, counts, outputs if self.update_train_metrics else None, targets)
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

    def _global_counts(self, counts: Tensor) -> Tensor:
        """Labelled counts summed over all ranks (one small all-reduce per step under DDP)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return counts
        return self.trainer.strategy.reduce(counts.float(), reduce_op="sum")

    def _train_step_logs_wanted(self) -> bool:
        """Whether this training step's ``train/...`` values can reach a logger or a callback.

        Lightning writes on-step values to the loggers only on the steps where ``should_update_logs`` holds (every
        ``trainer.log_every_n_steps`` optimizer steps, and when stopping) or under ``fast_dev_run``. On the other
        steps ``self.log`` only refreshes ``trainer.callback_metrics``, yet it costs about 0.3 ms of host time per
        name on 2 CPU cores (Lightning wraps, moves and caches every value): the largest part of the per-step
        overhead of small models (docs/benchmarks.md). So the step values are reduced and logged on those steps
        only, plus the last batch of each epoch (epoch-end callbacks and ``trainer.callback_metrics`` after ``fit``
        see the epoch's last step, as before), and on every step when a callback or the LR scheduler may read a
        ``train/`` value between those steps (``_log_every_train_step``, set in ``setup``). The loggers receive
        exactly what they did before. Every input here is the same on every rank, so the cross-rank reduce in
        ``_log_train_step`` stays collective.
        """
        trainer = self._trainer
        if trainer is None or self._log_every_train_step:
            return True
        # getattr fallbacks: a private Lightning attribute; if it moves, log every step (correct, just slower).
        connector = getattr(trainer, "_logger_connector", None)
        # fast_dev_run: set on the Trainer by Lightning's debugging-flags connector, which its type does not declare.
        if getattr(connector, "should_update_logs", True) or trainer.fast_dev_run:  # type: ignore[attr-defined]
            return True
        return bool(getattr(trainer, "is_last_batch", True))

    def _log_train_step(self, loss: Tensor, means: Tensor, weights: Tensor, extra: Mapping[str, Tensor]) -> None:
        # One stacked tensor and one (possible) cross-rank reduction instead of one per logged name. reduce_op by
        # keyword: the second positional parameter of Strategy.reduce is the process group.
        encoder_logs = self._encoder_logs()
        extras = [v.detach().float().reshape(1) for v in encoder_logs.values()]
        stacked = torch.cat([loss.detach()[None], means.detach(), weights.detach(), *extras])
        values = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        logs = {"train/loss": values[0]}
        n = len(self.tasks)
        active = self.active_tasks
        for i, name in enumerate(self.tasks):
            if name in active:  # a disabled task logs nothing rather than zeros
                logs[f"train/{name}/loss"] = values[1 + i]
                logs[f"train/balance/weight/{name}"] = values[1 + n + i]
        for j, key in enumerate(encoder_logs):
            logs[f"train/encoder/{key}"] = values[1 + 2 * n + j]
        # Balancer telemetry names tasks as path segments (grad_norm/<task>, cosine/<a>/<b>): drop disabled tasks'.
        off = set(self.tasks) - set(active)
        logs.update({f"train/balance/{k}": v for k, v in extra.items() if not off & set(k.split("/"))})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    def _encoder_logs(self) -> dict[str, Tensor]:
        """Scalars the encoder reports about its last training forward (``encoder.training_logs()``, optional).

        E.g. an MMoE's gate entropy and expert load; logged as ``train/encoder/<key>`` with the step values, averaged
        over ranks. The encoder must return the same keys on every call (every rank logs the same names).
        """
        report = getattr(self.encoder, "training_logs", None)
        return dict(report()) if callable(report) else {}

    def _eval_step(self, batch: Any, stage: str) -> None:
        inputs, targets = self._unpack(batch, stage)
        targets = self._active_targets(targets)
        outputs = self._scheduled_outputs(self.representations(inputs)[0])
        sums, counts = self.task_losses(outputs, targets)
        self._accumulate(stage, sums, counts, outputs, targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per-task predictions: probabilities for classification, values for regression."""
        inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
        return {name: predictions(self.tasks[name], out) for name, out in self(inputs).items()}

    # ----------------------------------------------------------------------------------- epoch-level logs
    def _log_epoch(self, stage: str) -> None:
        self._flush(stage)
        tracker = getattr(self, f"{stage}_loss_mean")
        # reshape: with a single task the tracker's compute() squeezes to 0-dim tensors.
        means, counts = (t.reshape(-1) for t in tracker.compute())
        tracker.reset()
        labelled = counts > 0
        logs: dict[str, Tensor] = {}
        if stage != "train":
            # The epoch loss of an evaluation stage: static-weighted mean of the per-task epoch means.
            w = self.static_weights.to(means.dtype) * labelled
            logs[f"{stage}/loss"] = (torch.nan_to_num(means) * w).sum() / w.sum().clamp_min(1e-12)
            active = self.active_tasks
            logs.update({f"{stage}/{name}/loss": means[i] for i, name in enumerate(self.tasks) if name in active})
        collections = getattr(self, f"{stage}_metrics")
        if stage != "train" or self.update_train_metrics:
            self._prime_idle_metrics(collections, labelled)
            for i, name in enumerate(self.tasks):
                if bool(labelled[i]) and name in self.active_tasks:
                    logs.update(collections[name].compute())
                collections[name].reset()
        # The values are already global (torchmetrics and the loss tracker reduce their states across ranks in
        # compute()); sync_dist=True only averages identical numbers (a few small all-reduces per epoch), and keeps
        # Lightning from warning on every name that epoch values under DDP should be synced.
        self.log_dict(
            {k: v.float() for k, v in logs.items()}, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
        )

    def _prime_idle_metrics(self, collections: nn.ModuleDict, labelled: Tensor) -> None:
        """Under DDP, give a task's metrics one fully masked row on a rank that never updated them this epoch.

        compute() syncs every metric state across ranks, and a rank whose list states (AUROC's) are still empty
        joins fewer collectives than the others: gloo fails on mismatched sizes, NCCL hangs. This happens when a
        task's rows all land on other ranks (per-task datasets, a rare task). A masked row changes no state.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return
        for i, (name, spec) in enumerate(self.tasks.items()):
            collection = cast(MetricCollection, collections[name])
            if not bool(labelled[i]) or all(m.update_count for m in collection.values(copy_state=False)):
                continue
            width = int(spec.num_outputs or 1)
            out = torch.zeros((1,) if width == 1 and spec.kind != "multilabel" else (1, width), device=self.device)
            missing, dtype = (IGNORE_INDEX, torch.long) if spec.integer_targets else (torch.nan, torch.float)
            target = torch.full(expected_shape(spec, 1), missing, dtype=dtype, device=self.device)
            metric_update(collection, spec, *metric_inputs(spec, out, target))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.balancer.on_train_batch_end(self._last_means)

    def on_train_epoch_end(self) -> None:
        self.balancer.on_train_epoch_end()
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def logged_metric_names(self, stage: str | None = None) -> list[str]:
        """Every name this module logs (per stage), for checking ``monitor`` settings before training."""
        names = []
        for st in [stage] if stage else STAGES:
            names.append(f"{st}/loss" if st != "train" else "train/loss")
            for name in self.tasks:
                names.append(f"{st}/{name}/loss")
                if st != "train" or self.update_train_metrics:
                    names += [f"{st}/{name}/{key}" for key in getattr(self, f"{st}_metrics")[name].keys(keep_base=True)]
        return names

    # ------------------------------------------------------------------------------------ lightning hooks
    def setup(self, stage: str) -> None:
        self._values_checked.clear()
        for pending in self._pending.values():  # leftovers of an interrupted run
            pending.clear()
        if self._trainer is not None:
            scheduler_monitor = self.lr_scheduler_monitor if self.lr_scheduler else None
            check_monitors(self.trainer, self.logged_metric_names(), scheduler_monitor)
            # A callback that monitors a train/ name (checkpoints, early stopping, user callbacks) or formats one into
            # a checkpoint filename may read trainer.callback_metrics after any step: then log every step.
            callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
            reads = [getattr(cb, attr, None) for cb in callbacks for attr in ("monitor", "filename")]
            self._log_every_train_step = any(isinstance(r, str) and "train/" in r for r in [*reads, scheduler_monitor])

    def configure_model(self) -> None:
        """Shard (FSDP2, when the strategy gives a device mesh) and compile the encoder, once per model.

        Lightning calls this hook at the start of every ``fit``/``validate``/``test``/``predict``; the flag keeps
        a model that is fitted then tested from being wrapped twice. Lightning's FSDPStrategy (FSDP1) does its own
        wrapping with :func:`mtl_lightning.sharding.encoder_units_policy` and needs nothing here.
        """
        if self._configured:
            return
        mesh = self.device_mesh
        sharded = mesh is not None or isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy)
        self._sharded = sharded
        if sharded and not self.balancer.supports_sharding:
            raise ConfigError(
                f"{type(self.balancer).__name__} cannot run on a sharded model: {self.balancer.sharding_hint}"
            )
        if mesh is not None:
            names = mesh.mesh_dim_names or ()
            if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
                raise ConfigError(
                    "MultiTaskModule shards with FSDP2 only (data parallel); set the ModelParallelStrategy's "
                    "tensor_parallel_size: 1 (configs/trainer/fsdp2.yaml)"
                )
            fully_shard_model(self, mesh["data_parallel"] if "data_parallel" in names else mesh)
        if self.compile_encoder:
            self.encoder.compile()
        self._configured = True

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's FSDP precision plugin refuses clipping by norm: the norm must be taken over every rank's shard,
        # which FSDP1's root module does in clip_grad_norm_ (as Lightning's FSDP docs advise). FSDP2 (DTensor
        # gradients) and every other strategy use Lightning's own clipping.
        model = getattr(self._trainer, "model", None)
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(self.trainer.strategy, FSDPStrategy)
            and model is not None
            and hasattr(model, "clip_grad_norm_")
        ):
            model.clip_grad_norm_(gradient_clip_val)
            return
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
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            refuse_resume(checkpoint)  # before Lightning's own KeyError about missing optimizer states
        # A compressed checkpoint records how its layers changed (low-rank, int8); rebuild that structure first so
        # that Lightning can load the weights into matching modules.
        restore_compression(self, checkpoint)
        # Task names from the head weights the checkpoint holds, in their order (the order of the ModuleDict).
        saved = list(dict.fromkeys(k.split(".")[1] for k in checkpoint.get("state_dict", {}) if k.startswith("heads.")))
        if saved and saved != self.task_names:
            raise ValueError(
                f"the checkpoint was trained on tasks {saved} but this model declares {self.task_names}. Use the "
                "config the checkpoint was trained with (it is saved next to its logs as config.yaml), or start "
                "from it with new tasks via transfer learning instead of --ckpt_path"
            )
