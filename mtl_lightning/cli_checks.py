"""Checks of a parsed ``mtl`` config that refuse what would otherwise be silently dropped or replaced.

Each function takes plain config values and raises a :class:`~mtl_lightning.errors.ConfigError` with one line that
names the option and the fix. :class:`~mtl_lightning.lightning_cli.MTLCLI` calls them before anything is built.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from mtl_lightning._imports import import_from_path
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec, parse_tasks

# ``--ckpt_path untrained``: evaluate or predict with the model's initial weights on purpose (smoke tests).
UNTRAINED = "untrained"
_EVALUATING = ("validate", "test", "predict")


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (nested) as dicts and lists, other values as they are."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def own_weights_option(class_path: Any) -> str | None:
    """The option through which a model class loads its trained weights itself, or None (the usual case).

    A class says so with a ``weights_option`` class attribute (``MultiTaskEnsemble``: ``checkpoints``); such a model
    is evaluated without ``--ckpt_path``. A class path that does not import gives None: jsonargparse reports it.
    """
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    try:
        cls = import_from_path(class_path, "model")
    except ConfigError:
        return None
    option = getattr(cls, "weights_option", None)
    return option if isinstance(option, str) else None


def refuse_ckpt_path(ckpt_path: str | None, weights_option: str | None) -> None:
    """A model that loads its own weights (``weights_option``) takes no ``--ckpt_path``: it would be replaced by
    the checkpoint's model, or have its weights overwritten."""
    if weights_option and ckpt_path:
        raise ConfigError(
            f"--ckpt_path {ckpt_path} cannot be given with a model that loads its weights from "
            f"model.init_args.{weights_option}: drop --ckpt_path and list the checkpoints in --model.init_args.{weights_option}"
        )


def require_checkpoint(
    subcommand: str, ckpt_path: str | None, init_from: str | None, weights_option: str | None = None
) -> str | None:
    """The ``ckpt_path`` to run with: refuse validate/test/predict of an untrained model unless asked for.

    Without a checkpoint Lightning evaluates the freshly initialised model and exits 0, which reads as a result.
    ``--ckpt_path untrained`` asks for exactly that (it returns None); a model with ``init_from``, or one that loads
    its own weights (``weights_option``, see :func:`own_weights_option`), has weights already.
    """
    refuse_ckpt_path(ckpt_path, weights_option)
    if weights_option:
        return None
    if ckpt_path == UNTRAINED:
        return None
    if subcommand in _EVALUATING and not ckpt_path and not init_from:
        raise ConfigError(
            f"mtl {subcommand} needs trained weights: give --ckpt_path PATH (a .ckpt file, e.g. runs/quickstart/"
            f"version_0/checkpoints/best.ckpt) or --ckpt_path last (the newest run's last.ckpt); --ckpt_path "
            f"{UNTRAINED} runs the untrained model on purpose"
        )
    return ckpt_path


def _names(specs: Sequence[TaskSpec]) -> str:
    return ", ".join(f"{s.name} ({s.kind}, {s.num_outputs} outputs)" for s in specs)


def check_same_tasks(model_tasks: Any, data_tasks: Any, source: str) -> None:
    """Refuse model tasks (from the model section or a checkpoint) that differ from the data's.

    The CLI links the data's tasks into the model, so other tasks given in the model section would be replaced
    without a word; a checkpoint trained for other tasks would fail to load with a state-dict error.
    """
    if model_tasks is None or data_tasks is None:
        return
    model_list, data_list = _plain(model_tasks), _plain(data_tasks)
    if any(isinstance(t, str) for t in [*model_list, *data_list]):
        # Task names that the data module resolves into specs itself (census-income's `[income]`): names only.
        given_names = [t if isinstance(t, str) else t.get("name") for t in model_list]
        declared_names = [t if isinstance(t, str) else t.get("name") for t in data_list]
        if given_names == declared_names:
            return
        given_text, declared_text = ", ".join(map(str, given_names)), ", ".join(map(str, declared_names))
    else:
        given, declared = parse_tasks(model_list), parse_tasks(data_list)
        if given == declared:
            return
        given_text, declared_text = _names(given), _names(declared)
    if source == "checkpoint":
        raise ConfigError(
            f"the checkpoint was trained for tasks [{given_text}] but the data declares [{declared_text}]; "
            "evaluate it on data with the same tasks, or give a checkpoint of these tasks"
        )
    raise ConfigError(
        f"model.init_args.tasks [{given_text}] differ from data.init_args.tasks [{declared_text}]; tasks are "
        "declared once, in the data section (the CLI links them into the model): remove them from the model section"
    )


def root_dir_into_logger(trainer: MutableMapping[str, Any]) -> None:
    """Honour ``trainer.default_root_dir`` for a logger with a relative ``save_dir`` (the presets' ``runs``).

    Lightning uses ``default_root_dir`` only when no logger sets a folder, so with the presets' TensorBoard logger
    the option did nothing. Here a relative ``save_dir`` is taken inside it: ``--trainer.default_root_dir /scratch``
    writes to ``/scratch/runs/quickstart/version_N``; an absolute ``save_dir`` is kept.
    """
    root = trainer.get("default_root_dir")
    if not root:
        return
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        args = logger.get("init_args") if logger is not None and hasattr(logger, "get") else None
        if not args or "save_dir" not in args:
            continue
        save_dir = args.get("save_dir")
        if save_dir is None or not Path(str(save_dir)).is_absolute():
            args["save_dir"] = str(Path(str(root)) / (str(save_dir) if save_dir is not None else ""))


def explicit_model_keys(argv: Sequence[str]) -> list[str]:
    """The ``model.…`` keys given one by one on the command line (``--model.init_args.x 3`` or ``=3``)."""
    keys = []
    for token in argv:
        if token.startswith("--model.") and not token.startswith("--model.help"):
            keys.append(token[2:].split("=", 1)[0].rstrip("+"))
    return keys


def incompatible_shapes(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """The state-dict entries whose presence or shape differ (``name: checkpoint shape vs model shape``)."""
    out = []
    for name in sorted(set(expected) | set(found)):
        a, b = expected.get(name), found.get(name)
        shape_a = tuple(a.shape) if a is not None else None
        shape_b = tuple(b.shape) if b is not None else None
        if shape_a != shape_b:
            out.append(f"{name}: {shape_a or 'absent'} in the checkpoint, {shape_b or 'absent'} in the model")
    return out
