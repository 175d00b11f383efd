"""Checkpoints that are never half-written, and a checkpoint that does not load reported in one line.

Lightning's ``TorchCheckpointIO`` serialises into memory, writes the bytes to a temporary file that fsspec puts in
the system temp folder, and moves it over the destination. On another filesystem (``/tmp`` is often tmpfs) that
move is a copy, so a crash or a full disk can still leave a truncated ``last.ckpt``, nothing is fsynced, and a
``kill -9`` leaves the temporary file behind in ``/tmp``. :class:`AtomicCheckpointIO` writes next to the
destination, fsyncs, and renames: a reader sees the old file or the new one, never a partial one.

On load, :func:`check_checkpoint` catches the usual wrecks (missing, empty, truncated, not a checkpoint) cheaply,
and the errors of ``torch.load`` are turned into :class:`CheckpointError` naming the file, what is wrong and a
checkpoint of the same run that loads. Torch's own advice to retry with ``weights_only=False`` is never passed on:
for a damaged file it does not help, and for a foreign one it runs arbitrary code.

Strategies that write their own checkpoints do not go through a ``CheckpointIO``: FSDP with
``state_dict_type="sharded"`` and ``ModelParallelStrategy`` (distributed checkpoint folders, also on load),
DeepSpeed (its engine saves and loads), and FSDP loads even its full-state files with ``torch.load`` itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import socket
import struct
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mtl_lightning.errors import ConfigError, exception_chain

if TYPE_CHECKING:
    from torch.serialization import MAP_LOCATION

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_checkpoint",
    "load_checkpoint_file",
    "newest_loadable",
    "remove_stale_temporaries",
    "translate_load_error",
]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or loaded; the one-line message names the file, the problem and the fix."""


# ``.{name}.tmp-{host}-{pid}``: hidden, so globs for ``*.ckpt`` never see it. The host is part of the name because
# a pid says nothing about a process on another machine writing to the same shared filesystem.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)$")
# A temporary file of another host cannot be checked by pid; one untouched for a day is dead (a writer keeps
# touching it, and no checkpoint takes hours to write).
_FOREIGN_STALE_AFTER_S = 24 * 3600
# Errors of a full disk or an exceeded quota: the user can fix them by freeing space or saving elsewhere.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT} if hasattr(errno, "EDQUOT") else {errno.ENOSPC}
# Markers of a damaged archive in torch's RuntimeErrors (miniz/PytorchStreamReader), as opposed to other failures.
_CORRUPT_MARKERS = ("PytorchStreamReader", "inline_container", "zip archive", "corrupted", "invalid header")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, struct.error)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _temporary_path(destination: Path, pid: int | None = None, host: str | None = None) -> Path:
    """The temporary file a save of ``destination`` writes, in the same folder so the final rename is atomic."""
    return destination.with_name(f".{destination.name}.tmp-{host or _host()}-{os.getpid() if pid is None else pid}")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine; when unsure, True (a live writer's file must never go)."""
    if os.name == "nt" or pid <= 0:
        # On Windows os.kill(pid, 0) terminates the process instead of probing it; pid 0 is the process group.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files left in ``directory`` by saves that were killed; returns the removed paths.

    A file of this host is stale when its writer's pid is gone; one of another host when it is a day old.
    """
    folder = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    me = _host()
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None:
            continue
        try:
            if match["host"] == me:
                stale = not _pid_alive(int(match["pid"]))
            else:
                stale = time.time() - entry.stat().st_mtime > _FOREIGN_STALE_AFTER_S
            if stale and entry.is_file():
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue  # gone meanwhile, or not ours to remove: cleaning up must never fail a save
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform or filesystem can fsync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 1000 or unit == "PB":
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _last_good(destination: Path) -> str:
    """What survives a failed save of ``destination``, for the error message."""
    if _problem(destination) is None:
        return f"the last good checkpoint is {destination} (left as it was)"
    other = newest_loadable(destination.parent, exclude=(destination,))
    if other is not None:
        return f"the newest checkpoint there that loads is {other}"
    return "no checkpoint was written there yet"


def _disk_full_message(destination: Path, error: OSError) -> str:
    directory = destination.parent
    try:
        usage = shutil.disk_usage(directory)
        space = f" ({_size(usage.free)} free of {_size(usage.total)})"
    except OSError:
        space = ""
    if getattr(errno, "EDQUOT", None) == error.errno:
        what = f"the disk quota for {directory} is exceeded{space.replace(' free', ' free on the disk')}"
    else:
        what = f"the disk holding {directory} is full{space}"
    return (
        f"could not save checkpoint {destination}: {what}; {_last_good(destination)}; free space there or point "
        "the checkpoints at another disk (--trainer.default_root_dir, or the ModelCheckpoint dirpath)"
    )


def _write_atomically(checkpoint: dict[str, Any], destination: Path) -> None:
    """torch.save into a temporary file next to ``destination``, fsync, rename over it, fsync the folder."""
    directory = destination.parent
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)  # what a kill -9 left behind, so leftovers vanish at the next save
    temporary = _temporary_path(destination)
    try:
        # A file object, not a path: torch's C++ writer then reports the OSError (errno) of a full disk and a
        # KeyboardInterrupt as the context of its RuntimeError, where a path gives only "unexpected pos".
        with open(temporary, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(temporary, destination)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        chain = list(exception_chain(err))
        if not isinstance(err, KeyboardInterrupt) and any(isinstance(e, KeyboardInterrupt) for e in chain):
            # torch.save turns a Ctrl-C inside a write into a RuntimeError; keep it an interrupt for Lightning.
            raise KeyboardInterrupt from err
        full = next((e for e in chain if isinstance(e, OSError) and e.errno in _DISK_FULL), None)
        if full is not None:
            raise CheckpointError(_disk_full_message(destination, full)) from err
        raise
    _fsync_directory(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves replace the file atomically and whose loads fail with a clear message.

    Use it as ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://`` ...) keep Lightning's own
    handling; local ones are written next to the destination and renamed (see the module docstring).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path``; the previous file there stays intact until the new one is complete."""
        if storage_options is not None:
            # As TorchCheckpointIO: nothing here would use them, and silently ignoring them hides a mistake.
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{self.__class__.__name__}`. Please implement your custom `CheckpointIO`"
                " to define how you'd like to use `storage_options`."
            )
        local = _local_path(path)
        if local is None:
            super().save_checkpoint(checkpoint, path)
            return
        _write_atomically(checkpoint, local)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,  # the parent's default: keep storages
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Check ``path`` (see :func:`check_checkpoint`), then load it as ``TorchCheckpointIO`` does."""
        local = _local_path(path)
        if local is None:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        checked = _check_file(local)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            translated = translate_load_error(checked, err)
            if translated is None:
                raise
        # Outside the except block: torch's message, chained as the context, tells users to retry with
        # weights_only=False, which does not repair a damaged file and runs code from a foreign one.
        raise translated


def _local_path(path: Any) -> Path | None:
    """``path`` as a local Path, or None for a remote URL (``s3://``, ``http://`` ...: left to fsspec, as in Lightning)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    text = str(os.fspath(path))
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    # A plain path stays as given (relative too), so that messages show what the user typed.
    return None if _URL_RE.match(text) else Path(text)


def _is_checkpoint_folder(path: Path) -> bool:
    """A folder checkpoint: torch.distributed.checkpoint (``.metadata``; FSDP sharded, ModelParallel) or DeepSpeed."""
    return (path / ".metadata").is_file() or ((path / "checkpoint").is_dir() and (path / "latest").is_file())


def _problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a checkpoint (the rest of "checkpoint PATH ..."), or None when it looks fine.

    Cheap for multi-GB files: it reads the first bytes, the zip central directory and the member headers only.
    """
    if not path.exists():
        if path.is_symlink():
            return f"is a link to a missing file ({os.readlink(path)}): the file it pointed at was removed"
        return "does not exist (no such file)"
    if path.is_dir():
        if _is_checkpoint_folder(path):
            return None
        return "is a directory, not a checkpoint (no .metadata of a distributed checkpoint in it)"
    try:
        size = path.stat().st_size
        if size == 0:
            return "is empty (0 bytes): it was probably cut short by a crash or a full disk"
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"\x80"):
            # Pickle protocol marker: torch's legacy (non-zip) format, only torch.load can tell more.
            return None
        if head != b"PK\x03\x04":
            return (
                f"is not a PyTorch checkpoint ({_size(size)} that are neither a zip archive nor a pickle): "
                "it was not written by torch.save, or was overwritten"
            )
        try:
            archive = zipfile.ZipFile(path)
        except _ZIP_ERRORS:
            return (
                f"is truncated or not a checkpoint ({_size(size)}, no zip directory): it was probably cut short "
                "by a crash or a full disk"
            )
        with archive:
            members = archive.infolist()
            if not any(m.filename == "data.pkl" or m.filename.endswith("/data.pkl") for m in members):
                return f"is a zip archive but not a PyTorch checkpoint ({_size(size)}, no data.pkl in it)"
            for member in members:
                try:
                    # Opening reads only the member's local header: damage inside the archive shows here.
                    with archive.open(member):
                        pass
                except _ZIP_ERRORS as err:
                    return f"is damaged ({_size(size)}, its part {member.filename} does not open: {err})"
    except PermissionError:
        return "cannot be read (permission denied)"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None


def _suggestion(path: Path) -> str:
    """What to use instead of the broken ``path``: the newest checkpoint next to it (or in it) that loads."""
    if path.is_dir():
        inside = newest_loadable(path)
        if inside is not None:
            return f"give a checkpoint file instead, e.g. --ckpt_path {inside} (the newest one in it that loads)"
        return "it holds no *.ckpt file that loads; check the path"
    directory = path.parent
    if not directory.is_dir():
        return f"its folder {directory} does not exist either; check the path"
    other = newest_loadable(directory, exclude=(path,))
    if other is not None:
        return f"use another checkpoint, e.g. --ckpt_path {other} (the newest one there that loads)"
    return f"no other checkpoint in {directory} loads; train again without --ckpt_path to get one"


def check_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` if it looks like a loadable checkpoint (a file, or a distributed checkpoint folder), else raise.

    Raises:
        CheckpointError: missing, a plain directory, empty, truncated, damaged or not a checkpoint at all.
    """
    checked = Path(path)
    problem = _problem(checked)
    if problem is not None:
        raise CheckpointError(f"checkpoint {checked} {problem}; {_suggestion(checked)}")
    return checked


def _check_file(path: Path) -> Path:
    """:func:`check_checkpoint`, and a folder is an error: only the strategy that wrote it can load one."""
    checked = check_checkpoint(path)
    if checked.is_dir():
        raise CheckpointError(
            f"checkpoint {checked} is a distributed checkpoint folder, which cannot be loaded as one file: load it "
            "with the strategy that wrote it (FSDP, ModelParallelStrategy, DeepSpeed), or merge an FSDP/"
            f"ModelParallel one into a file with: python -m lightning.pytorch.utilities.consolidate_checkpoint {checked}"
        )
    return checked


def newest_loadable(directory: str | os.PathLike[str], exclude: Iterable[str | os.PathLike[str]] = ()) -> Path | None:
    """The newest (by mtime) ``*.ckpt`` in ``directory`` that passes :func:`check_checkpoint`, or None."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    excluded = {os.path.abspath(p) for p in exclude}
    candidates: list[tuple[float, Path]] = []
    for candidate in folder.glob("*.ckpt"):
        if os.path.abspath(candidate) in excluded:
            continue
        try:
            candidates.append((candidate.stat().st_mtime, candidate))
        except OSError:
            continue  # removed meanwhile, or a link to nothing
    for _, candidate in sorted(candidates, reverse=True):
        if _problem(candidate) is None:
            return candidate
    return None


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")


def translate_load_error(path: Path, error: BaseException) -> CheckpointError | None:
    """A CheckpointError for a failure of torch.load on ``path`` that the user can act on, or None."""
    message = str(error)
    damaged: str | None = None
    if isinstance(error, pickle.UnpicklingError):
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if unsupported:
            return CheckpointError(
                f"checkpoint {path} holds a Python object that a safe load refuses ({unsupported[1]}), so it was "
                "written by other code or a changed version; use a checkpoint written by this template, or, only "
                "if you trust where the file came from, allowlist that class with torch.serialization.add_safe_globals"
            )
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", message)
        damaged = detail[1] if detail else _first_sentence(message)
    elif isinstance(error, EOFError):
        damaged = message or "it ends too early"
    elif isinstance(error, zipfile.BadZipFile):
        damaged = message
    elif isinstance(error, RuntimeError) and any(m in message for m in _CORRUPT_MARKERS):
        damaged = _first_sentence(message).replace("PytorchStreamReader ", "")
    elif isinstance(error, ModuleNotFoundError) or (
        isinstance(error, AttributeError) and message.startswith("Can't get attribute")
    ):
        return CheckpointError(
            f"checkpoint {path} refers to code that is not importable here ({_first_sentence(message)}): it was "
            "written by other code or another version; install that version, or use a checkpoint written by this one"
        )
    if damaged is None:
        return None
    damaged = damaged.rstrip(".")
    return CheckpointError(
        f"checkpoint {path} is damaged and does not load ({damaged}): it was probably cut short or changed after it "
        f"was written; {_suggestion(path)}"
    )


def load_checkpoint_file(
    path: str | os.PathLike[str], map_location: MAP_LOCATION = "cpu", weights_only: bool = True
) -> dict[str, Any]:
    """Check and load a checkpoint file outside a Trainer (export, compress), with the errors of :class:`CheckpointError`."""
    checked = _check_file(Path(path))
    try:
        checkpoint = torch.load(checked, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        translated = translate_load_error(checked, err)
        if translated is None:
            raise
    else:
        if not isinstance(checkpoint, dict):
            raise CheckpointError(
                f"checkpoint {checked} holds a {type(checkpoint).__name__}, not a checkpoint (a dict): give a .ckpt "
                "file written by the trainer"
            )
        return checkpoint
    raise translated  # outside the except block: see AtomicCheckpointIO.load_checkpoint
