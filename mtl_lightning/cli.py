"""The ``mtl`` command: LightningCLI with multi-task links between the data and the model.

``mtl fit|validate|test|predict --config configs/quickstart.yaml``. Tasks are declared once, in the data section;
the CLI links them (and the input shape) into the model. Config files stack (a later ``--config`` wins) and a
group can be replaced by its own file, e.g. ``--trainer configs/trainer/gpu.yaml``.

Commands that are not Lightning runs have their own parsers: ``mtl export`` (:mod:`mtl_lightning.export`) and
``mtl compress`` (:mod:`mtl_lightning.compression.cli`); ``mtl --version`` prints the package version.

This module is the console script's entry point and imports no Lightning: ``mtl --version`` and ``mtl --help`` answer
at once instead of after the seconds Lightning, torchmetrics and TorchJD take to import. The LightningCLI subclass
:class:`MTLCLI` lives in :mod:`mtl_lightning.lightning_cli`; ``from mtl_lightning.cli import MTLCLI`` imports it on
first use.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl_lightning import errors

if TYPE_CHECKING:
    from lightning.pytorch.cli import ArgsType

    from mtl_lightning.lightning_cli import MTLCLI

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
# The LightningCLI subcommands, with what each does (for the short `mtl --help`).
LIGHTNING_COMMANDS = {
    "fit": "train (and validate) a model",
    "validate": "evaluate a model (--ckpt_path) on the validation split",
    "test": "evaluate a model (--ckpt_path) on the test split",
    "predict": "per-task predictions of a model (--ckpt_path)",
}
# Commands with their own parser, each a module with ``main(argv: list[str]) -> int``; imported only when used.
COMMANDS = {
    "export": "mtl_lightning.export",
    "compress": "mtl_lightning.compression.cli",
    "serve": "mtl_lightning.serve.cli",
    "sweep": "mtl_lightning.sweep.cli",
    "affinity": "mtl_lightning.affinity.cli",
}
COMMAND_HELP = {
    "export": "a checkpoint as one ONNX or torch.export file, every task's output included",
    "compress": "quantise or factorise (SVD) a checkpoint, or report what one holds",
    "serve": "an HTTP server (LitServe) answering per-task predictions for a checkpoint or ONNX file",
    "sweep": "an Optuna study over config keys (task weights, learning rate, the balancer): trials, Pareto front",
    "affinity": "measure inter-task affinity (TAG lookahead) in one run and propose task groupings",
}
DESCRIPTION = (
    "Multi-task training with Lightning: mtl fit|validate|test|predict --config CONFIG. Other commands: "
    "mtl export --help (ONNX / torch.export), mtl compress --help, mtl --version."
)


def __getattr__(name: str) -> Any:
    # PEP 562: MTLCLI subclasses LightningCLI, so importing it imports Lightning; only when it is asked for.
    if name == "MTLCLI":
        from mtl_lightning.lightning_cli import MTLCLI

        return MTLCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def usage() -> str:
    """``mtl --help``: the commands and how to get each one's help, without importing Lightning."""
    names = [*LIGHTNING_COMMANDS, *COMMANDS]
    rows = [
        *(("commands:", name, text) for name, text in {**LIGHTNING_COMMANDS, **COMMAND_HELP}.items()),
        ("options:", "-h, --help", "show this message and exit"),
        ("options:", "-V, --version", "print the package version and exit"),
    ]
    width = max(len(name) for _, name, _ in rows) + 2
    lines = [
        f"usage: mtl [-h] [-V] {{{','.join(names)}}} ...",
        "",
        "Multi-task training with Lightning: one shared encoder, one head per task, driven by YAML.",
    ]
    for section in ("commands:", "options:"):
        lines += ["", section, *(f"  {name:<{width}}{text}" for s, name, text in rows if s == section)]
    lines += [
        "",
        "Each command has its own help: mtl fit --help (every option of the model, data and trainer),",
        "mtl export --help, mtl compress --help, mtl serve --help, mtl sweep --help, mtl affinity --help.",
        "mtl fit --print_config prints the merged config of a run.",
        "fit, validate, test and predict without --config run configs/quickstart.yaml.",
    ]
    return "\n".join(lines)


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

    ``--version``, ``--help`` without a command, no arguments at all and the :data:`COMMANDS` (``export``,
    ``compress``) end with ``SystemExit`` carrying their exit code, like a command's ``--help``: they build no
    :class:`MTLCLI` to return (and import no Lightning).
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list):
        if not argv:
            print(usage(), file=sys.stderr)
            print("mtl: error: give a command, e.g. mtl fit --config configs/quickstart.yaml", file=sys.stderr)
            raise SystemExit(2)
        if argv[0] in ("--version", "-V"):
            print(version_line())
            raise SystemExit(0)
        if argv[0] in ("--help", "-h"):
            print(usage())
            raise SystemExit(0)
        if argv[0] in COMMANDS:
            raise SystemExit(run_command(argv[0], list(argv[1:])))
    if args is None:
        # Edit sys.argv rather than passing args: LightningCLI warns when both are given.
        sys.argv[1:] = _with_default_config(sys.argv[1:])
    elif isinstance(args, list):
        args = _with_default_config(args)
    from lightning.pytorch import LightningDataModule, LightningModule

    from mtl_lightning.lightning_cli import MTLCLI

    return MTLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        # Parse errors raised (jsonargparse.ArgumentError), not printed with the usage: the console script makes each
        # one line (mtl_lightning/console.py). Subcommand parsers inherit it; --help and --print_config still exit 0.
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": False},
    )


def console_main() -> None:
    """Console-script entry point (``mtl``): like :func:`main`, but bad input ends with one line and exit code 2.

    The translation of errors into that line is :func:`mtl_lightning.console.run`; ``MTL_DEBUG=1`` keeps tracebacks.
    """
    from mtl_lightning import console
    from mtl_lightning.allocator import keep_freed_memory

    keep_freed_memory()  # a training process: reuse freed host memory (see mtl_lightning/allocator.py)
    raise SystemExit(console.run())
