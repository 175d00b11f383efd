"""Where a study lives: a journal file in the sweep folder by default, or any Optuna storage URL.

Optuna's journal file takes concurrent writers on one machine (a file lock), with no database to set up: local
``--workers`` share it. ``sqlite:///FILE`` also works on one machine; ``postgresql://`` or ``mysql://`` URLs (with
their driver installed) serve workers on many machines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mtl_lightning.errors import ConfigError

JOURNAL = "study.journal"
_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]*@")


def redact(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@host``) hidden, for messages."""
    return _PASSWORD.sub(r"\1***@", url)


def default_storage(directory: Path) -> str:
    return str(directory / JOURNAL)


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: a path (a journal file) or an RDB URL; one clear error if it cannot be opened."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" not in url:
        path = Path(url)
        if not path.parent.is_dir():
            raise ConfigError(f"the study storage {url!r} is in a folder that does not exist: create {path.parent}")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # SQLAlchemy and its drivers raise many types; one line names the URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot open the study storage {redact(url)}: {type(err).__name__}: {first}. Check the URL, that the "
            "server is reachable, and that its Python driver (e.g. psycopg2 for postgresql://) is installed"
        ) from None
