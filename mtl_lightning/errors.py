"""Errors for bad input (configs, task specs, data), so the CLI can show their message alone.

jsonargparse re-raises an error from a constructor as a long "does not validate against any of the Union
subtypes" report with our message buried inside. Every ConfigError records itself when created; the CLI looks up
the ones created while it instantiated the classes and prints the first as a single line.
"""

from __future__ import annotations

import itertools
from collections import deque

_serial = itertools.count(1)
_recent: deque[tuple[int, ConfigError]] = deque(maxlen=16)


class ConfigError(ValueError):
    """Base class of the template's input errors; the message names the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.serial = next(_serial)
        _recent.append((self.serial, self))


def marker() -> int:
    """The serial of the newest ConfigError so far, to pass to :func:`created_since`."""
    return _recent[-1][0] if _recent else 0


def created_since(mark: int) -> list[ConfigError]:
    """ConfigErrors created after ``mark`` (oldest first)."""
    return [err for serial, err in _recent if serial > mark]
