"""Initialise a model from a checkpoint or state-dict file, loading what matches and reporting exactly what happened.

Used by ``MultiTaskModule(init_from=...)`` (``--model.init_args.init_from path.ckpt``): start a new run from a
trained model, e.g. with a task added or removed, or a new head on a pretrained encoder. Unlike ``--ckpt_path``
(which resumes the *same* run: optimizer, epoch, every weight), only weights are taken, and only where the name
and the shape match. Lightning's own ``load_from_checkpoint`` is all-or-nothing (``strict``) and says nothing about
what it skipped, which is the information a user needs when tasks change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError


@dataclass
class InitReport:
    """What :func:`load_matching` did, tensor name by tensor name."""

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unused: list[str] = field(default_factory=list)  # in the file, not in the model (e.g. a removed task's head)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: skipped (strict=False)
    excluded: list[str] = field(default_factory=list)  # in both, but outside ``include``

    def summary(self) -> str:
        def groups(names: list[str]) -> str:
            # "heads.churn (2 tensors)" instead of every parameter name.
            counts: dict[str, int] = {}
            for n in names:
                key = ".".join(n.split(".")[:2])
                counts[key] = counts.get(key, 0) + 1
            return ", ".join(f"{k} ({v})" for k, v in counts.items()) or "-"

        return (
            f"init_from {self.source}: loaded {len(self.loaded)} tensors [{groups(self.loaded)}]; "
            f"new {len(self.new)} [{groups(self.new)}]; unused from the file {len(self.unused)} "
            f"[{groups(self.unused)}]; shape mismatches skipped {len(self.mismatched)} [{groups(self.mismatched)}]; "
            f"excluded {len(self.excluded)} [{groups(self.excluded)}]"
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a Lightning checkpoint (its ``state_dict``) or of a plain state-dict file."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: a sharded FSDP checkpoint; save one file with save_distributed_checkpoint: false)"
        raise ConfigError(f"init_from: {path} is not a file{hint if path.is_dir() else ''}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with arbitrary objects, or not a torch file at all
        raise ConfigError(f"init_from: cannot read {path} as a checkpoint or state dict: {err}") from None
    state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"init_from: {path} holds no state dict (a mapping of names to tensors)")
    return dict(state)


def load_matching(model: nn.Module, path: str | Path, include: Sequence[str] = (), strict: bool = True) -> InitReport:
    """Copy into ``model`` every tensor of the file whose name and shape match.

    Args:
        model: The freshly built model.
        path: A Lightning checkpoint or a state-dict file. A bare encoder state dict (names without the
            ``encoder.`` prefix, e.g. saved with ``torch.save(encoder.state_dict())``) is recognised.
        include: Name prefixes to load (e.g. ``["encoder."]``); empty loads every match.
        strict: Fail on a name present in both with another shape (``False``: skip it and report it).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    if not set(state) & set(own) and {f"encoder.{k}" for k in state} & set(own):
        state = {f"encoder.{k}": v for k, v in state.items()}
    report = InitReport(source=str(path))
    to_load = {}
    tolerated: list[str] = []
    for name, value in state.items():
        if name not in own:
            report.unused.append(name)
        elif include and not any(name.startswith(p) for p in include):
            report.excluded.append(name)
        elif own[name].shape != value.shape:
            report.mismatched.append(f"{name}: file {tuple(value.shape)} vs model {tuple(own[name].shape)}")
            if name.startswith("balancer."):
                # Per-task balancer state (T-sized) is expected to differ when tasks were added or removed.
                tolerated.append(report.mismatched[-1])
        else:
            to_load[name] = value
    refused = [m for m in report.mismatched if m not in tolerated]
    if refused and strict:
        raise ConfigError(
            f"init_from {path}: shapes differ for {refused}; set init_strict: false to skip these "
            "tensors (they keep their fresh initialisation), or fix the model so they match"
        )
    if not to_load:
        raise ConfigError(
            f"init_from {path}: no tensor matches this model by name and shape (file names start with "
            f"{sorted({k.split('.')[0] for k in state})}, the model's with {sorted({k.split('.')[0] for k in own})})"
        )
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.new = sorted(k for k in own if k not in to_load and k not in state)
    return report
