"""Task kinds: one class per kind, each the one place that knows what its targets and outputs look like.

A task spec names its kind by a short name from :data:`BUILTIN` or by the dotted path of a
:class:`~mtl_lightning.kinds.base.TaskKind` subclass (``kind: my_pkg.kinds.OrdinalKind``), the way heads and
losses are named. :func:`get_kind` resolves either; kinds are stateless, so one instance per class serves every
task.
"""

from __future__ import annotations

from functools import cache

from mtl_lightning._imports import import_from_path
from mtl_lightning.errors import ConfigError
from mtl_lightning.kinds.base import IGNORE_INDEX, KindError, TargetError, TaskKind

BUILTIN: dict[str, str] = {
    "binary": "mtl_lightning.kinds.binary.BinaryKind",
    "multiclass": "mtl_lightning.kinds.multiclass.MulticlassKind",
    "multilabel": "mtl_lightning.kinds.multilabel.MultilabelKind",
    "regression": "mtl_lightning.kinds.regression.RegressionKind",
    "count": "mtl_lightning.kinds.count.CountKind",
}
"""Short names of the kinds that ship, with their classes."""


@cache
def get_kind(name: str) -> TaskKind:
    """The kind named ``name``: a short name from :data:`BUILTIN` or a dotted class path."""
    if not isinstance(name, str):
        raise KindError(f"a task kind must be a name, got {type(name).__name__}")
    path = BUILTIN.get(name, name)
    if "." not in path:
        raise KindError(
            f"unknown kind {name!r}; use one of {', '.join(BUILTIN)} or the dotted path of a "
            "mtl_lightning.kinds.TaskKind subclass"
        )
    try:
        cls = import_from_path(path, "task kind")
    except ConfigError as err:
        raise KindError(str(err)) from err
    if not (isinstance(cls, type) and issubclass(cls, TaskKind)):
        raise KindError(f"task kind {name!r} is not a subclass of mtl_lightning.kinds.TaskKind")
    return cls()


__all__ = ["BUILTIN", "IGNORE_INDEX", "KindError", "TargetError", "TaskKind", "get_kind"]
