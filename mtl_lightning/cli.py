"""The ``mtl`` command: LightningCLI with multi-task links between the data and the model.

``mtl fit|validate|test|predict --config configs/quickstart.yaml``. Tasks are declared once, in the data section;
the CLI links them (and the input shape) into the model. Config files stack (a later ``--config`` wins) and a
group can be replaced by its own file, e.g. ``--trainer configs/trainer/gpu.yaml``.

Commands that are not Lightning runs have their own parsers: ``mtl export`` (:mod:`mtl_lightning.export`) and
``mtl compress`` (:mod:`mtl_lightning.compression.cli`); ``mtl --version`` prints the package version.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from mtl_lightning import errors
from mtl_lightning.launch_checks import check_trainer_config
from mtl_lightning.resume import resolve_last, resumed_config_name

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
# Commands with their own parser, each a module with ``main(argv: list[str]) -> int``; imported only when used.
COMMANDS = {"export": "mtl_lightning.export", "compress": "mtl_lightning.compression.cli"}
DESCRIPTION = (
    "Multi-task training with Lightning: mtl fit|validate|test|predict --config CONFIG. Other commands: "
    "mtl export --help (ONNX / torch.export), mtl compress --help, mtl --version."
)


class MTLCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with the data's tasks linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        parser.link_arguments(
            "data.input_shape", "model.init_args.encoder.init_args.input_shape", apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.get("trainer")
        if trainer is None:
            return
        check_trainer_config(trainer)
        resumed = resolve_last(trainer, config.get("ckpt_path"))
        if resumed is not None:  # the run's folder already holds its config.yaml: keep it, save this one beside it
            self.save_config_kwargs["config_filename"] = resumed_config_name(resumed)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning's default RichProgressBar redraws every batch: 15-20% of a small model's step on 2 CPU cores
        # (docs/benchmarks.md). Same bar, refreshed every 10 batches, unless the user configured a bar or none.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            config["callbacks"] = [*callbacks, RichProgressBar(refresh_rate=10)]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        mark = errors.marker()
        try:
            super().instantiate_classes()
        except Exception as err:
            # Surface our own message instead of jsonargparse's nested "Union subtypes" report.
            ours = errors.created_since(mark)
            if ours and not isinstance(err, errors.ConfigError):
                raise ours[0] from None
            raise


def _with_default_config(args: list[str]) -> list[str]:
    """Run the quickstart when a subcommand is given without any ``--config``."""
    if not args or args[0].startswith("-") or any(a == "--config" or a.startswith("--config=") for a in args):
        return args
    if not QUICKSTART.exists() or any(a in ("-h", "--help") for a in args):
        return args
    return [args[0], "--config", str(QUICKSTART), *args[1:]]


def version_line() -> str:
    from mtl_lightning import __version__

    return f"mtl_lightning {__version__}"


def run_command(name: str, argv: list[str]) -> int:
    """Run one of :data:`COMMANDS`; its module is imported here so the Lightning commands do not pay for it."""
    module_name = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise  # a dependency of the command is missing: its own message says which
        raise errors.ConfigError(
            f"`mtl {name}` is not available in this installation: its module {module_name} is missing"
        ) from None
    return int(module.main(argv) or 0)


def main(args: ArgsType = None) -> MTLCLI:
    """Entry point of ``mtl`` and ``python -m mtl_lightning``; pass ``args`` to run it in-process (tests).

    ``--version`` and the :data:`COMMANDS` (``export``, ``compress``) end with ``SystemExit`` carrying their exit
    code, like ``--help``: they build no :class:`MTLCLI` to return.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv:
        if argv[0] in ("--version", "-V"):
            print(version_line())
            raise SystemExit(0)
        if argv[0] in COMMANDS:
            raise SystemExit(run_command(argv[0], list(argv[1:])))
    if args is None:
        # Edit sys.argv rather than passing args: LightningCLI warns when both are given.
        sys.argv[1:] = _with_default_config(sys.argv[1:])
    elif isinstance(args, list):
        args = _with_default_config(args)
    return MTLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        parser_kwargs={"description": DESCRIPTION},
    )


def console_main() -> None:
    """Console-script entry point (``mtl``): like :func:`main`, but bad input ends with one line and exit code 2."""
    try:
        main()
    except errors.ConfigError as err:
        print(f"mtl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
