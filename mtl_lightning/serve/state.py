"""Which model the server serves: one small JSON file that every process of ``mtl serve`` reads.

LitServe runs the HTTP front ends and the inference workers in processes of their own, so a hot reload cannot
swap a Python object: ``POST /reload`` (or the file watcher) loads the candidate, checks it against the served
model's signature and, if it fits, writes the new path and a higher version here (atomically, under a lock).
Each worker looks at the file before every batch (one ``stat``), and a worker that sees a newer version loads it
before that batch; the batch it is running finishes on the old model. So every request sent after a reload
answered is served by the new model. A candidate that does not fit is refused and nothing changes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from mtl_lightning.serve.models import ModelPath, ServedModel, ServeError, incompatibility, load_served_model


class ModelState:
    """The served model's record (``model.json``) in ``folder``: version, path, signature and description."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file = self.folder / "model.json"
        self._lock_file = str(self.folder / "model.json.lock")

    def read(self) -> dict[str, Any]:
        return json.loads(self.file.read_text())

    def stamp(self) -> tuple[int, int]:
        """Changes whenever the record is replaced (a new file each time: inode and mtime)."""
        st = os.stat(self.file)
        return st.st_ino, st.st_mtime_ns

    def publish(self, model: ServedModel) -> dict[str, Any]:
        """Record ``model`` as the served one, one version above the current (1 for the first)."""
        with FileLock(self._lock_file):  # a new lock each time: the HTTP processes are forked from this one
            version = self.read()["version"] + 1 if self.file.exists() else 1
            record = {
                "version": version,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "signature": model.signature(),
                **model.describe(),
            }
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".model.", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.file)
        return record

    def reload(self, path: ModelPath | None = None) -> dict[str, Any]:
        """Load ``path`` (default: the served path again, e.g. a checkpoint rewritten in place), check that it fits
        the served model and publish it; raises :class:`ServeError` and changes nothing when it does not."""
        current = self.read()
        target = path or current["path"]
        candidate = load_served_model(target, device="cpu")  # a check only: the workers load it on their devices
        reason = incompatibility(current["signature"], candidate.signature())
        if reason is not None:
            raise ServeError(
                f"refused to reload {target!r}: {reason}; the served model (version {current['version']}) keeps serving"
            )
        return self.publish(candidate)
