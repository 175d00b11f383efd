"""Per-stage metric state of a multi-task model: each task's metrics and mean loss, fed in blocks of steps.

:class:`StageMetrics` is dict in, dict out, in the spirit of torchmetrics' ``MultitaskWrapper``, but a step may
lack tasks (missing labels, per-task datasets, a curriculum): per step it takes ``{task: output}`` and
``{task: target}`` for the tasks present; per epoch it gives the logged values ``{stage}/loss``,
``{stage}/{task}/loss`` and ``{stage}/{task}/{metric}``. It needs no Trainer: the one distributed concern, priming
the metrics a rank never updated, takes the world size as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics import MetricCollection

from mtl_lightning.heads import sync_parts
from mtl_lightning.loss_tracker import StepAccumulator, TaskLossMean
from mtl_lightning.losses import canonical_targets
from mtl_lightning.metrics import build_metrics
from mtl_lightning.tasks import TaskSpec


class StageMetrics(nn.Module):
    """The metrics (``{task: MetricCollection}``) and per-task loss means of one stage (train, val or test).

    Args:
        stage: The stage's name, the first part of every logged name.
        specs: The tasks, in order; :meth:`sync` follows a changed task list.
        with_metrics: Update and log the metrics (False: the losses only, e.g. ``train_metrics: false``).
    """

    def __init__(self, stage: str, specs: Mapping[str, TaskSpec], with_metrics: bool = True):
        super().__init__()
        self.stage = stage
        self.with_metrics = with_metrics
        self.metrics = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        self.loss_mean = TaskLossMean(0)
        self.pending = StepAccumulator()
        self.sync(specs)

    def sync(self, specs: Mapping[str, TaskSpec]) -> None:
        """Follow the task list: metrics of kept tasks stay, new tasks get fresh ones; the loss means restart."""
        self.specs = dict(specs)
        sync_parts(self.metrics, list(specs), lambda name: build_metrics(specs[name], self.stage))
        self.loss_mean = TaskLossMean(len(specs))
        self.pending.clear()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.metrics

    def __getitem__(self, name: str) -> MetricCollection:
        return cast(MetricCollection, self.metrics[name])

    # ------------------------------------------------------------------------------------------- updates
    def add(
        self,
        sums: Tensor,
        counts: Tensor,
        outputs: Mapping[str, Tensor] | None,
        targets: Mapping[str, Tensor],
        canonical: bool = False,
    ) -> None:
        """Queue a step's loss sums and counts ``(T,)`` and (unless ``outputs`` is None) its metric inputs.

        ``targets`` holds the tasks present in the step, in any shape its kind accepts (``canonical``: already in
        the canonical one). See :class:`StepAccumulator` for why steps are queued.
        """
        if outputs is not None and not canonical:
            targets = canonical_targets(self.specs, targets)
        if self.pending.add(sums, counts, outputs, targets if outputs is not None else None):
            self.flush()

    def flush(self) -> None:
        """Update the loss means and metrics with the queued steps (one update per metric)."""
        if not self.pending.steps:
            return
        sums, counts, blocks = self.pending.take()
        self.loss_mean.update(sums, counts)
        for name, (out, target) in blocks.items():
            spec, kind = self.specs[name], self.specs[name].task_kind
            preds, target = kind.metric_inputs(spec, out.float(), target)
            kind.metric_update(self[name], spec, preds, target)

    # ------------------------------------------------------------------------------------------ the epoch
    def epoch_values(
        self,
        weights: Tensor,
        active: Sequence[str] | None = None,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> dict[str, Tensor]:
        """The epoch's logged values (then reset): global over ranks, since the states sync in ``compute``.

        Args:
            weights: ``(T,)`` weights of ``{stage}/loss``, the weighted mean of the task means (not for train).
            active: The tasks to log (None: all); a disabled task logs nothing rather than zeros.
            world_size: Processes in the run: above 1, metrics a rank never updated are primed first.
            device: Where to make the priming rows.
        """
        self.flush()
        # reshape: with a single task the tracker's compute() squeezes to 0-dim tensors.
        means, counts = (t.reshape(-1) for t in self.loss_mean.compute())
        self.loss_mean.reset()
        labelled = counts > 0
        shown = set(self.specs if active is None else active)
        logs: dict[str, Tensor] = {}
        if self.stage != "train":
            w = weights.to(means) * labelled
            logs[f"{self.stage}/loss"] = (torch.nan_to_num(means) * w).sum() / w.sum().clamp_min(1e-12)
            logs.update({f"{self.stage}/{n}/loss": means[i] for i, n in enumerate(self.specs) if n in shown})
        if self.with_metrics:
            if world_size > 1:
                self._prime_idle(labelled, device)
            for i, name in enumerate(self.specs):
                if bool(labelled[i]) and name in shown:
                    logs.update(self[name].compute())
                self[name].reset()
        return logs

    def _prime_idle(self, labelled: Tensor, device: torch.device | str) -> None:
        """Give a task's metrics one fully masked row on a rank that never updated them this epoch.

        compute() syncs every metric state across ranks, and a rank whose list states (AUROC's) are still empty
        joins fewer collectives than the others: gloo fails on mismatched sizes, NCCL hangs. This happens when a
        task's rows all land on other ranks (per-task datasets, a rare task). A masked row changes no state.
        """
        for i, (name, spec) in enumerate(self.specs.items()):
            collection = self[name]
            if not bool(labelled[i]) or all(m.update_count for m in collection.values(copy_state=False)):
                continue
            kind = spec.task_kind
            out = torch.zeros(kind.output_shape(spec, 1), device=device)
            kind.metric_update(collection, spec, *kind.metric_inputs(spec, out, kind.missing_targets(spec, 1, device)))

    def names(self) -> list[str]:
        """Every name this stage can log, for checking ``monitor`` settings before training."""
        names = [f"{self.stage}/loss"]
        for name in self.specs:
            names.append(f"{self.stage}/{name}/loss")
            if self.with_metrics:
                names += [f"{self.stage}/{name}/{key}" for key in self[name].keys(keep_base=True)]
        return names
