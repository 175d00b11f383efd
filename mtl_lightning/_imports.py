"""Resolve dotted class paths given as strings in task specs (custom heads, losses and metrics)."""

from __future__ import annotations

import importlib
from typing import Any

from mtl_lightning.errors import ConfigError


def import_from_path(path: str, what: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``; ``what`` names the setting for the error message."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{what} {path!r} is neither a known short name nor a dotted path like 'pkg.mod.Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{what} {path!r} could not be imported ({err}); check the spelling and the package") from err
