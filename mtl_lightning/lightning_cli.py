"""The LightningCLI behind ``mtl fit|validate|test|predict``: the data's tasks, input shape and vocabulary size are
linked into the model, and our own errors are shown instead of jsonargparse's report.

Kept apart from :mod:`mtl_lightning.cli`, which is the command's entry point: importing this module imports
Lightning (seconds), which ``mtl --version`` and ``mtl --help`` do not need. ``from mtl_lightning.cli import MTLCLI``
still works (the name is resolved on first use).
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from mtl_lightning import errors, trackers
from mtl_lightning._imports import import_from_path
from mtl_lightning.callbacks.checkpoint import ModelCheckpoint
from mtl_lightning.callbacks.config_logging import LoggedConfig
from mtl_lightning.callbacks.input_schema import InputSchemaCheckpoint
from mtl_lightning.callbacks.resume_state import RandomStateCheckpoint
from mtl_lightning.callbacks.run_folder import RemoveFailedRunFolder
from mtl_lightning.checkpoint_io import AtomicCheckpointIO, check_checkpoint, load_checkpoint_file, translate_load_error
from mtl_lightning.cli_checks import (
    UNTRAINED,
    check_same_tasks,
    explicit_model_keys,
    incompatible_shapes,
    own_weights_option,
    refuse_ckpt_path,
    require_checkpoint,
    root_dir_into_logger,
)
from mtl_lightning.launch_checks import check_trainer_config
from mtl_lightning.resume import lock_run, resolve_last, resumed_config_name

# ckpt_path values that Lightning resolves itself (no file to check before the trainer exists).
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# The encoder's vocab_size, linked from the data module's ``vocab_size`` (token data): written once, in the data.
ENCODER_VOCAB_SIZE = "model.init_args.encoder.init_args.vocab_size"


def default_progress_bar() -> ProgressBar:
    """The progress bar ``mtl fit`` adds when the config names none (``enable_progress_bar: false``: no bar).

    TQDM redrawn every 10 batches: on the 9 others it does nothing, where Rich updates its task and reads every
    logged value on each batch and redraws from a thread of its own (the measured costs: docs/benchmarks.md). A
    config picks Rich (or any bar) by naming it in ``trainer.callbacks``.
    """
    return TQDMProgressBar(refresh_rate=10)


def with_resume_callbacks(callbacks: list[Any]) -> list[Any]:
    """The run's callbacks, set up so that ``last.ckpt`` is the newest state, a resume is exact and checkpoints
    carry the data's input schema.

    Every plain Lightning ``ModelCheckpoint`` becomes :class:`mtl_lightning.callbacks.ModelCheckpoint` (a subclass
    that adds no arguments and no state, so changing the class of the built object is safe), and a
    :class:`~mtl_lightning.callbacks.resume_state.RandomStateCheckpoint` is added unless the config has one.
    """
    for callback in callbacks:
        if type(callback) is LightningModelCheckpoint:
            callback.__class__ = ModelCheckpoint
    if not any(isinstance(c, RandomStateCheckpoint) for c in callbacks):
        callbacks = [*callbacks, RandomStateCheckpoint()]
    if not any(isinstance(c, InputSchemaCheckpoint) for c in callbacks):  # what `mtl serve` needs to encode records
        callbacks = [*callbacks, InputSchemaCheckpoint()]
    return callbacks


class MTLCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with the data's tasks linked into the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The run's config also goes to MLflow and W&B, and into their run's folder (callbacks/config_logging.py).
        if len(args) < 3:  # the third positional argument is save_config_callback
            kwargs.setdefault("save_config_callback", LoggedConfig)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments(
            "data.input_shape", "model.init_args.encoder.init_args.input_shape", apply_on="instantiate"
        )
        # jsonargparse skips this link for an encoder without a vocab_size parameter (the key is not in its
        # config) and for a data module without a vocab_size attribute (then the encoder's own value is kept), so
        # configs with other encoders or other data are untouched.
        parser.link_arguments("data.vocab_size", ENCODER_VOCAB_SIZE, apply_on="instantiate")
        # Likewise the padding id of data that pads (a tokenizer's): the encoder masks those positions out.
        parser.link_arguments("data.pad_id", "model.init_args.encoder.init_args.pad_id", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Kept to tell the model options typed on the command line from those of config files (_parse_ckpt_path).
        self._argv: list[str] = (
            [str(a) for a in (sys.argv[1:] if args is None else args)]
            if not isinstance(args, (dict, Namespace))
            else []
        )
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning's: the checkpoint's hyper-parameters replace the model config. Here the file is checked first
        (one line for a broken one), and model options typed on the command line are kept, not silently replaced;
        :meth:`_check_overrides` refuses the ones the checkpoint's weights do not fit."""
        subcommand = self.config.get("subcommand")
        self._overrides: dict[str, tuple[Any, Any]] = {}
        self._tasks_from_checkpoint = False
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        # Before Lightning reads the file: its hparams would replace a model that loads its own weights (an ensemble).
        refuse_ckpt_path(ckpt_path, own_weights_option(config.get("model.class_path")))
        if not ckpt_path or ckpt_path in (*_LIGHTNING_CKPT_NAMES, UNTRAINED):
            return
        path = check_checkpoint(ckpt_path)
        given = {k: config.get(k) for k in explicit_model_keys(self._argv) if k in config}
        try:
            super()._parse_ckpt_path()
        except Exception as err:
            translated = translate_load_error(path, err)
            if translated is None:
                raise
            raise translated from None
        config = self.config[subcommand]
        self._tasks_from_checkpoint = config.get("model.init_args.tasks") is not None
        for key, value in given.items():
            if config.get(key) != value:
                self._overrides[key] = (value, config.get(key))
                config[key] = value

    def before_instantiate_classes(self) -> None:
        subcommand = str(self.subcommand)
        config = self.config.get(subcommand, self.config)
        trainer = config.get("trainer")
        if trainer is None:
            return
        root_dir_into_logger(trainer)
        trackers.allow_local_mlflow_store(trainer)
        check_trainer_config(trainer)
        weights_option = own_weights_option(config.get("model.class_path"))
        if self.subcommand is not None:
            config["ckpt_path"] = require_checkpoint(
                subcommand, config.get("ckpt_path"), config.get("model.init_args.init_from"), weights_option
            )
        if weights_option is not None:
            self._build_directly(config.get("model.class_path"))
        check_same_tasks(
            config.get("model.init_args.tasks"),
            config.get("data.init_args.tasks"),
            "checkpoint" if getattr(self, "_tasks_from_checkpoint", False) else "model",
        )
        resumed = resolve_last(trainer, config.get("ckpt_path"))
        if resumed is not None:  # the run's folder already holds its config.yaml: keep it, save this one beside it
            self._run_lock = lock_run(resumed)
            self.save_config_kwargs["config_filename"] = resumed_config_name(resumed)

    def _build_directly(self, class_path: str) -> None:
        """Build the model class ``class_path`` by its own constructor, not through Lightning's instantiator.

        For a model that loads its own weights (an ensemble): it saves its own hyper-parameters (the checkpoints it
        was built from), and Lightning's instantiator, which records the config as hyper-parameters, would replay
        the data -> encoder links into them and fail on a model that has no encoder (``Expected key
        encoder.init_args.input_shape``). ``add_instantiator`` is the jsonargparse API LightningCLI itself uses.
        """
        cls = import_from_path(class_path, "model")
        self.parser.add_instantiator(lambda class_type, *args, **kwargs: class_type(*args, **kwargs), cls, False, True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning's default bar (Rich when installed, as here) costs 15-20% of a small model's step on 2 CPU cores
        # (docs/benchmarks.md): the cheaper default_progress_bar, unless the user configured a bar or none.
        # The trainer's settings are read as LightningCLI.instantiate_trainer reads them (public attributes).
        config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer") or {}
        callbacks = kwargs.get("callbacks", config.get("callbacks"))
        callbacks = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, default_progress_bar()]
        kwargs["callbacks"] = with_resume_callbacks(callbacks)
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints are never half-written
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("logger") is False:
            # Without a logger Lightning would save the run's config.yaml into default_root_dir (the working
            # directory by default), and refuse every later run there because the file exists: no run folder, no
            # config to keep.
            self.save_config_callback = None
        trainer = super().instantiate_trainer(**kwargs)
        # The folder this run will log to, decided now (before the logger creates it) so a failure can remove it.
        trainer_callbacks: list[Any] = getattr(trainer, "callbacks")  # noqa: B009 (a property mypy cannot see)
        trainer_callbacks.append(RemoveFailedRunFolder(trainer.log_dir if trainer.loggers else None))
        return trainer

    def instantiate_classes(self) -> None:
        ours: errors.ConfigError | None = None
        try:
            super().instantiate_classes()
        except Exception as err:
            # Our own message instead of jsonargparse's nested "Union subtypes" report, which chains it as a cause.
            ours = errors.find_config_error(err)
            if ours is None or ours is err:
                raise
        if ours is not None:
            # Raised here, outside the except block, so that Python leaves its own chain (what it was raised from
            # or while handling) as it is, instead of making the report its context.
            raise ours
        self._check_vocab_size()
        self._check_overrides()

    def _check_overrides(self) -> None:
        """Command-line model options that differ from the checkpoint's are used only if its weights fit them."""
        overrides = getattr(self, "_overrides", {})
        if not overrides:
            return
        ckpt_path = self.config[str(self.subcommand)].get("ckpt_path")
        weights = load_checkpoint_file(ckpt_path, weights_only=True).get("state_dict", {})
        mismatched = incompatible_shapes(weights, self.model.state_dict())
        if mismatched:
            options = "; ".join(
                f"--{k} {given!r} (the checkpoint has {saved!r})" for k, (given, saved) in overrides.items()
            )
            raise errors.ConfigError(
                f"the checkpoint's weights do not fit the model built with {options}: {mismatched[0]}"
                f"{f' and {len(mismatched) - 1} more' if len(mismatched) > 1 else ''}; drop the option (the "
                "checkpoint's value is used) or give a checkpoint trained with it"
            )

    def _check_vocab_size(self) -> None:
        """An encoder vocab_size written by hand as well as linked from the data must agree (the link wins)."""
        given = self.config.get(str(self.subcommand), self.config).get(ENCODER_VOCAB_SIZE)
        linked = getattr(self.datamodule, "vocab_size", None)
        if given is not None and linked is not None and given != linked:
            raise errors.ConfigError(
                f"{ENCODER_VOCAB_SIZE} is {given} but the data's vocab_size is {linked}; the encoder's vocab_size "
                f"comes from the data: remove it from the model config (or set data.init_args.vocab_size)"
            )
