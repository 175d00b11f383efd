"""An on-disk cache of arrays built from data files, keyed by the source files and the settings that built them.

Real data sets are parsed and encoded once; later runs (and every DDP rank, every CLI subcommand) load the ready
arrays from one ``.npz`` file. A key covers each source file's resolved path, size and modification time (a changed
or replaced file gives a new key, at no hashing cost) plus the settings, so a stale entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "MTL_LIGHTNING_CACHE"


def default_cache_dir() -> Path:
    """``$MTL_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/mtl_lightning``, else ``~/.cache/mtl_lightning``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mtl_lightning"


def cache_key(files: Sequence[str | Path], settings: Mapping[str, Any]) -> str:
    """A short hex digest of the files' identities (path, size, mtime) and the JSON-able settings."""
    parts = []
    for file in files:
        stat = Path(file).stat()
        parts.append([str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"files": parts, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the arrays atomically (a temporary file renamed into place), so that processes building the same
    entry at once never read a half-written file. An unwritable cache folder is not an error: the data was built."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            # Ignored below: mypy also matches **arrays against savez's allow_pickle: bool (numpy's stub signature).
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
