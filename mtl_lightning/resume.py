"""``--ckpt_path last``: continue the newest run of the experiment, in its own log folder.

Lightning looks for ``last.ckpt`` in the checkpoint folder of the *current* run. With a TensorBoard or CSV
logger and no fixed ``version``, a new run gets a new ``version_N`` folder, so Lightning finds nothing, warns and
starts from scratch: a resume silently lost. Here ``last`` is resolved before the trainer is built: the newest
``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` (a file, or a folder of shards under FSDP) is found, and the
logger's ``version`` is pinned to that run, so the resumed run writes its logs and checkpoints where the
interrupted one did and Lightning's own ``last`` lookup finds the checkpoint. With no such checkpoint the run
stops with an error instead of starting over.

MLflow and W&B start a new run (a new run id, so a new checkpoint folder) likewise; for them the run id is pinned
instead (MLFlowLogger's ``run_id``, WandbLogger's ``id``), and the resumed run continues the tracker's run too:
the newest ``<store>/<experiment id>/<run id>/checkpoints/last.ckpt`` (MLflow's local store) or
``<save_dir>/<project>/<run id>/checkpoints/last.ckpt`` (W&B).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from mtl_lightning import trackers
from mtl_lightning.checkpoint_io import check_checkpoint
from mtl_lightning.errors import ConfigError

# Per kind of logger, the init args that name a run, the first of which is pinned: Lightning puts a run's checkpoints
# in <save_dir>/<name>/<version>/checkpoints, and for these loggers <version> is the folder of the run they continue
# when given (TensorBoard/CSV: version_N; W&B: the run id; MLflow: the run id, under the experiment's id).
_RUN_KEYS = {
    "TensorBoardLogger": ("version",),
    "CSVLogger": ("version",),
    "WandbLogger": ("id", "version"),
    "MLFlowLogger": ("run_id",),
}


def _first_logger(trainer: Mapping[str, Any]) -> tuple[str, MutableMapping[str, Any]] | None:
    """(class name, init_args) of the run's first logger (the one Lightning's checkpoint folder follows), if known."""
    entries = trackers.logger_entries(trainer)
    return entries[0] if entries and entries[0][0] in _RUN_KEYS else None


def _runs_root(name: str, args: Mapping[str, Any], trainer: Mapping[str, Any]) -> Path:
    """The folder holding one folder per run of this logger's experiment (as Lightning's ModelCheckpoint builds it)."""
    if name == "WandbLogger":
        project = args.get("project") or os.environ.get("WANDB_PROJECT") or "lightning_logs"
        return Path(args.get("save_dir") or args.get("dir") or ".") / str(project)
    if name == "MLFlowLogger":
        uri = trackers.mlflow_tracking_uri(args)
        # MLFlowLogger.save_dir is the store's folder for a file: URI, else None (then default_root_dir is used).
        base = uri[len("file:") :] if uri.startswith("file:") else trainer.get("default_root_dir") or "."
        if uri.startswith("file:") and not Path(base).is_dir():
            return Path(base)  # no store yet, so no run (opening it would create an empty one)
        experiment = trackers.mlflow_experiment_id(args)
        if experiment is None:
            raise ConfigError(
                f"--ckpt_path last: MLflow has no experiment {args.get('experiment_name') or 'lightning_logs'!r} at "
                f"{uri} to resume; start without --ckpt_path, or check experiment_name and tracking_uri"
            )
        return Path(base) / experiment
    return Path(args.get("save_dir") or ".") / str(args.get("name") or "lightning_logs")


def _explicit_dirpath(callbacks: Any) -> bool:
    """Whether a ModelCheckpoint callback has its own ``dirpath`` (then Lightning's own lookup finds ``last``)."""
    for cb in callbacks or []:
        path = getattr(cb, "class_path", None) or (cb.get("class_path") if isinstance(cb, dict) else None)
        args = getattr(cb, "init_args", None) or (cb.get("init_args") if isinstance(cb, dict) else None) or {}
        if path and str(path).endswith("ModelCheckpoint") and args.get("dirpath"):
            return True
    return False


def latest_run_with_last(root: Path) -> tuple[str, Path] | None:
    """(version folder name, its last checkpoint) of the newest run under ``root`` that has a ``last*.ckpt``."""
    found = []
    for run in root.glob("*/checkpoints"):
        lasts = [p for p in run.iterdir() if re.fullmatch(r"last(-v\d+)?\.ckpt", p.name)]
        if lasts:
            newest = max(lasts, key=lambda p: p.stat().st_mtime)
            found.append((newest.stat().st_mtime, run.parent.name, newest))
    if not found:
        return None
    _, version, path = max(found)
    return version, path


def resolve_last(trainer: MutableMapping[str, Any], ckpt_path: str | None) -> Path | None:
    """Pin the logger to the newest run that has a last checkpoint when ``ckpt_path`` is ``last`` (see module).

    Returns that run's folder, or None when nothing was resolved here (Lightning's own lookup applies).
    """
    if ckpt_path != "last" or _explicit_dirpath(trainer.get("callbacks")):
        return None
    logger = _first_logger(trainer)
    if logger is None:
        return None
    name, args = logger
    keys = _RUN_KEYS[name]
    if any(args.get(key) is not None for key in keys):
        return None
    root = _runs_root(name, args, trainer)
    found = latest_run_with_last(root) if root.is_dir() else None
    if found is None:
        raise ConfigError(
            f"--ckpt_path last: no run under {root}/ has a checkpoints/last.ckpt to resume from; start without "
            "--ckpt_path, or give the checkpoint's path (ModelCheckpoint needs save_last: true to write last.ckpt)"
        )
    version, last = found
    check_checkpoint(last)  # a truncated last.ckpt: one line naming the newest checkpoint of the run that loads
    pinned: int | str = version
    if name in ("TensorBoardLogger", "CSVLogger") and re.fullmatch(r"version_\d+", version):
        pinned = int(version[len("version_") :])
    args[keys[0]] = pinned
    return root / version


def resumed_config_name(run: Path) -> str:
    """A name for the resumed run's saved config that keeps the first run's ``config.yaml``."""
    i = 1
    while (run / f"config.resume{i}.yaml").exists():
        i += 1
    return f"config.resume{i}.yaml"


def _is_launching_process() -> bool:
    """Whether this is the first process of the run (DDP children and other ranks have a rank in the environment)."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def lock_run(run: Path) -> Any:
    """Hold ``<run>/.mtl.lock`` for the life of this process, or refuse with the pid of the process that holds it.

    Two resumes of one run would write the same checkpoints and TensorBoard steps, and one would end with the
    other's model in its "best" file. The lock is an OS file lock (``filelock``), so a killed holder releases it.
    Only the launching process takes it: the ranks it starts run inside its lock.
    """
    if not _is_launching_process():
        return None
    from filelock import FileLock, Timeout

    lock = FileLock(run / ".mtl.lock", timeout=0)
    holder_file = run / ".mtl.lock.pid"
    try:
        lock.acquire()
    except Timeout:
        holder = holder_file.read_text().strip() if holder_file.exists() else "another process"
        raise ConfigError(
            f"run {run} is in use by process {holder} (another `mtl fit --ckpt_path last` of it?); wait for it to end "
            "or stop it, or start a new run without --ckpt_path last"
        ) from None
    holder_file.write_text(f"{os.getpid()}\n")
    return lock
