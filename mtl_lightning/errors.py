"""Errors for bad input (configs, task specs, data), so the CLI can show their message alone.

jsonargparse re-raises an error from a constructor as a long "does not validate against any of the Union
subtypes" report with our message buried inside; it chains the original error as that report's ``__cause__``.
The CLI finds our error in the chain with :func:`find_config_error` and shows it instead: no registry, no state.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ConfigError(ValueError):
    """Base class of the template's input errors; the message names the problem and the fix."""


def find_config_error(error: BaseException) -> ConfigError | None:
    """The ConfigError nearest to ``error`` in its chain of causes and contexts (``error`` itself first), or None.

    Breadth first, the explicit ``__cause__`` before the implicit ``__context__``, so the error our code chose to
    raise last wins over ones it was handling. Each exception is visited once: a chain may contain a cycle.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConfigError):
            return current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are ConfigErrors (one line ``mtl: error: ...``), not a usage dump and exit.

    For the commands with their own parser (``mtl export``, ``mtl compress``); ``--help`` is unchanged.
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")
