"""Errors for bad input (configs, task specs, data), so the CLI can show their message alone.

jsonargparse re-raises an error from a constructor as a long "does not validate against any of the Union
subtypes" report with our message buried inside; it chains the original error as that report's ``__cause__``.
The CLI finds our error in the chain with :func:`find_config_error` and shows it instead: no registry, no state.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import NoReturn


class ConfigError(ValueError):
    """Base class of the template's input errors; the message names the problem and the fix."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from (``__cause__``) or while handling (``__context__``), breadth first.

    The explicit cause comes before the implicit context, so the error our code chose to raise last is met first.
    Each exception is visited once: a chain may contain a cycle.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def find_config_error(error: BaseException) -> ConfigError | None:
    """The ConfigError nearest to ``error`` in its chain (:func:`exception_chain`, ``error`` itself first), or None."""
    return next((e for e in exception_chain(error) if isinstance(e, ConfigError)), None)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are ConfigErrors (one line ``mtl: error: ...``), not a usage dump and exit.

    For the commands with their own parser (``mtl export``, ``mtl compress``); ``--help`` is unchanged.
    """

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")
