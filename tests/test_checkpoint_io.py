"""AtomicCheckpointIO and the checkpoint checks: no half-written checkpoint, one clear line for one that does not load."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

import mtl_lightning.checkpoint_io as cio
from mtl_lightning.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    check_checkpoint,
    load_checkpoint_file,
    newest_loadable,
    remove_stale_temporaries,
)
from mtl_lightning.errors import ConfigError

CHECKPOINT = {"state_dict": {"w": torch.arange(100_000, dtype=torch.float32)}, "epoch": 3}


def _real(path: Path, mtime: float | None = None) -> Path:
    torch.save(CHECKPOINT, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _truncated(path: Path, mtime: float | None = None) -> Path:
    buffer = io.BytesIO()
    torch.save(CHECKPOINT, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def _fail_midway(exception: BaseException) -> Any:
    """A torch.save that writes part of the file, then fails as a full disk or a Ctrl-C would."""

    def save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise exception

    return save


def test_checkpoint_error_is_a_config_error() -> None:
    # The CLI prints a ConfigError's message alone, as one line.
    assert issubclass(CheckpointError, ConfigError)


def test_save_writes_a_loadable_file_and_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.ckpt"  # the parent folder is created, as TorchCheckpointIO does
    ckpt_io = AtomicCheckpointIO()
    ckpt_io.save_checkpoint({"epoch": 1}, path)
    ckpt_io.save_checkpoint({"epoch": 2}, path)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 2
    assert _leftovers(path.parent) == []
    with pytest.raises(TypeError, match="storage_options"):
        ckpt_io.save_checkpoint({"epoch": 3}, path, storage_options={"x": 1})


def test_data_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append("fsync-folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        fsync(fd)

    def record_replace(src: Any, dst: Any) -> None:
        events.append("replace")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
    assert events == ["fsync-file", "replace", "fsync-folder"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_midway_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    path = _real(tmp_path / "last.ckpt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _fail_midway(OSError(code, os.strerror(code))))
    with pytest.raises(CheckpointError) as caught:
        AtomicCheckpointIO().save_checkpoint({"epoch": 4}, path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "free" in message
    assert ("quota" in message) == (code == errno.EDQUOT)
    assert f"the last good checkpoint is {path}" in message
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_full_disk_before_any_checkpoint_says_none_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", _fail_midway(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match="no checkpoint was written there yet"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "epoch=0.ckpt")
    assert list(tmp_path.iterdir()) == []


class _FullDisk(io.FileIO):
    """A file that runs out of space after 1000 bytes, under the real torch.save."""

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_full_disk_seen_through_torch_runtime_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save reports a failed write as RuntimeError("unexpected pos ...") with the OSError as its context.
    path = _real(tmp_path / "last.ckpt")
    before = path.read_bytes()
    monkeypatch.setattr(cio, "open", lambda p, mode: _FullDisk(p, mode), raising=False)
    with pytest.raises(CheckpointError, match="is full"):
        AtomicCheckpointIO().save_checkpoint(CHECKPOINT, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_other_write_errors_propagate_and_clean_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _real(tmp_path / "last.ckpt")
    monkeypatch.setattr(torch, "save", _fail_midway(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as caught:
        AtomicCheckpointIO().save_checkpoint({"epoch": 4}, path)
    assert not isinstance(caught.value, CheckpointError) and caught.value.errno == errno.EIO
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_during_the_write_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _real(tmp_path / "last.ckpt")
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _fail_midway(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 4}, path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


class _Interrupted(io.FileIO):
    def write(self, data: Any) -> int:
        if self.tell() + len(data) > 1000:
            raise KeyboardInterrupt
        return super().write(data)


def test_keyboard_interrupt_stays_an_interrupt_under_real_torch_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save turns it into a RuntimeError; Lightning handles a KeyboardInterrupt as a graceful stop.
    path = _real(tmp_path / "last.ckpt")
    monkeypatch.setattr(cio, "open", lambda p, mode: _Interrupted(p, mode), raising=False)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(CHECKPOINT, path)
    assert _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_processes_vanish_at_the_next_save(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    dead = cio._temporary_path(path, pid=_dead_pid())
    live = cio._temporary_path(tmp_path / "best.ckpt", pid=os.getpid())
    foreign_old = cio._temporary_path(path, pid=1, host="othernode")
    foreign_new = cio._temporary_path(tmp_path / "epoch=1.ckpt", pid=1, host="othernode")
    for leftover in (dead, live, foreign_old, foreign_new):
        leftover.write_bytes(b"PK\x03\x04 cut short by kill -9")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (day_ago, day_ago))
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path)
    assert sorted(_leftovers(tmp_path)) == sorted([live.name, foreign_new.name])
    assert remove_stale_temporaries(tmp_path) == []


def test_remove_stale_temporaries_returns_what_it_removed(tmp_path: Path) -> None:
    dead = cio._temporary_path(tmp_path / "last.ckpt", pid=_dead_pid())
    dead.write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"not a temporary")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _random(path: Path) -> None:
    path.write_bytes(b"\x13\x99\x07 random bytes" * 200)


def _foreign_zip(path: Path) -> None:
    _zip(path, {"notes.txt": b"hello"})


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_missing, r"does not exist \(no such file\)"),
        (_directory, "is a directory, not a checkpoint"),
        (_empty, r"is empty \(0 bytes\)"),
        (_truncated, r"is truncated or not a checkpoint \(\d+ KB, no zip directory\)"),
        (_random, r"is not a PyTorch checkpoint \(3.2 KB that are neither a zip archive nor a pickle\)"),
        (_foreign_zip, "is a zip archive but not a PyTorch checkpoint"),
    ],
    ids=["missing", "directory", "empty", "truncated", "random", "foreign-zip"],
)
def test_check_checkpoint_names_what_is_wrong(tmp_path: Path, make: Any, expected: str) -> None:
    good = _real(tmp_path / "epoch=1.ckpt", mtime=time.time() - 60)
    broken = tmp_path / "last.ckpt"
    make(broken)
    if broken.is_dir():  # the suggestion then looks inside it
        good = _real(broken / "epoch=1.ckpt")
    with pytest.raises(CheckpointError, match=expected) as caught:
        check_checkpoint(broken)
    message = str(caught.value)
    assert "\n" not in message and str(broken) in message
    assert f"--ckpt_path {good}" in message  # what to use instead


def test_check_checkpoint_finds_a_damaged_part(tmp_path: Path) -> None:
    path = _real(tmp_path / "last.ckpt")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("data/0"))
    data[member.header_offset : member.header_offset + 4] = b"XXXX"  # its local header, as a disk error would
    path.write_bytes(bytes(data))
    assert zipfile.is_zipfile(path)  # the central directory is intact: only the part's header tells
    with pytest.raises(CheckpointError, match=r"is damaged .*data/0 does not open"):
        check_checkpoint(path)


def test_check_checkpoint_passes_real_checkpoints_and_checkpoint_folders(tmp_path: Path) -> None:
    real = _real(tmp_path / "last.ckpt")
    legacy = tmp_path / "legacy.ckpt"
    torch.save(CHECKPOINT, legacy, _use_new_zipfile_serialization=False)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    assert check_checkpoint(real) == real
    assert check_checkpoint(str(legacy)) == legacy
    assert check_checkpoint(sharded) == sharded


def test_a_directory_suggests_a_checkpoint_inside(tmp_path: Path) -> None:
    inside = _real(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=f"give a checkpoint file instead, e.g. --ckpt_path {inside}"):
        check_checkpoint(tmp_path)


def test_load_checkpoint_translates_a_torch_load_failure(tmp_path: Path) -> None:
    # A zip with a data.pkl passes the cheap check; torch.load fails on the pickle and advises weights_only=False.
    bad = _zip(tmp_path / "last.ckpt", {"archive/data.pkl": b"\x13 not a pickle", "archive/version": b"3\n"})
    with pytest.raises(Exception, match="weights_only"):
        torch.load(bad, weights_only=True)
    with pytest.raises(CheckpointError) as caught:
        AtomicCheckpointIO().load_checkpoint(bad)
    message = str(caught.value)
    assert f"checkpoint {bad} is damaged and does not load" in message
    assert "weights_only=False" not in message and "\n" not in message
    assert caught.value.__context__ is None  # torch's advice is not chained either
    with pytest.raises(CheckpointError, match="is damaged and does not load"):
        load_checkpoint_file(bad)


def test_load_refuses_foreign_objects_without_advising_unsafe_loading(tmp_path: Path) -> None:
    path = tmp_path / "module.ckpt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"a safe load refuses \(torch\.nn\.modules\.linear\.Linear\)") as caught:
        load_checkpoint_file(path)
    assert "weights_only=False" not in str(caught.value)


def test_load_checks_before_loading(tmp_path: Path) -> None:
    truncated = _truncated(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="is truncated"):
        AtomicCheckpointIO().load_checkpoint(truncated)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match="consolidate_checkpoint"):
        load_checkpoint_file(sharded)


def test_load_checkpoint_file_returns_the_dict(tmp_path: Path) -> None:
    path = _real(tmp_path / "best.ckpt")
    assert load_checkpoint_file(path)["epoch"] == 3
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint"):
        load_checkpoint_file(tensor)


def test_newest_loadable_skips_a_truncated_newer_file(tmp_path: Path) -> None:
    now = time.time()
    _real(tmp_path / "epoch=0.ckpt", mtime=now - 300)
    best = _real(tmp_path / "epoch=1.ckpt", mtime=now - 200)
    _truncated(tmp_path / "last.ckpt", mtime=now - 100)
    assert newest_loadable(tmp_path) == best
    assert newest_loadable(tmp_path, exclude=[best]) == tmp_path / "epoch=0.ckpt"
    assert newest_loadable(tmp_path / "missing") is None


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_trainer_saves_and_resumes_through_atomic_checkpoint_io(tmp_path: Path) -> None:
    def trainer(max_steps: int) -> Trainer:
        return Trainer(
            plugins=[AtomicCheckpointIO()],
            max_steps=max_steps,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            default_root_dir=tmp_path,
            limit_val_batches=0,
        )

    first = trainer(2)
    assert isinstance(first.strategy.checkpoint_io, AtomicCheckpointIO)
    first.fit(BoringModel())
    check_checkpoint(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")  # ModelCheckpoint's save went through it too
    path = tmp_path / "manual.ckpt"
    first.save_checkpoint(path)
    assert _leftovers(tmp_path) == []
    check_checkpoint(path)

    resumed = trainer(4)
    resumed.fit(BoringModel(), ckpt_path=path)
    assert resumed.global_step == 4  # continued from step 2, not from scratch

    _truncated(path)
    with pytest.raises(CheckpointError, match="is truncated"):
        trainer(6).fit(BoringModel(), ckpt_path=path)
