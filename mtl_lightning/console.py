"""The ``mtl`` console script: every error a user can cause ends as one line ``mtl: error: ...`` and exit code 2.

:func:`run` calls :func:`mtl_lightning.cli.main` and hands what it raises to :func:`error_line`, which recognises
whole classes of user errors, not single cases:

- our own :class:`~mtl_lightning.errors.ConfigError`, wherever it is in the chain (jsonargparse and the Trainer wrap
  what a constructor, a data module's setup or a step raised);
- jsonargparse's parse errors (:func:`mtl_lightning.cli.main` has the parser raise them, ``exit_on_error=False``): an
  unknown key (with a did-you-mean over the keys of the parser that refused it), a class_path naming no class (the
  classes its module has), a value of the wrong type (the key, the value and the types expected, instead of the
  nested Union report), a config file that is missing, empty, not a mapping or not valid YAML (the file and line);
- Lightning's ``MisconfigurationException``; a ``ValueError`` raised while a Trainer, an optimizer or an LR scheduler
  is constructed (they check their arguments so); a file the run names that does not exist (e.g. ``--ckpt_path``);
- ``FloatingPointError``: the NaN/inf loss that :func:`mtl_lightning.losses.raise_nonfinite` stops training with.

Anything else is a bug and keeps its traceback. ``MTL_DEBUG=1`` shows the traceback (the whole chain) of user errors
too, for bug reports. This module imports no Lightning and no jsonargparse: it looks classes up in ``sys.modules``
(an exception of a module never imported cannot have been raised), so ``mtl --version`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_lightning import compat, errors

PREFIX = "mtl: error: "
DEBUG_ENV = "MTL_DEBUG"
# Lightning's "you configured it wrong" exception, under both package names it is published as.
_MISCONFIGURATION = (
    ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
    ("lightning_fabric.utilities.exceptions", "MisconfigurationException"),
    ("lightning.pytorch.utilities.exceptions", "MisconfigurationException"),
)
# Classes whose constructors check the arguments a config gives them and refuse bad ones with a ValueError.
_CHECKED_CONSTRUCTORS = (
    ("lightning.pytorch.trainer.trainer", "Trainer"),
    ("torch.optim.optimizer", "Optimizer"),
    ("torch.optim.lr_scheduler", "LRScheduler"),
)
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".jsonnet")
_SHOWN = 8  # names listed when there is no close match; more would not fit on one line


def run(argv: Sequence[str] | None = None) -> int:
    """``mtl <argv>`` (``sys.argv[1:]`` when None): the exit code, 0 on success and 2 after a user error's line."""
    from mtl_lightning import cli

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv is None:  # main reads sys.argv itself: LightningCLI warns when it is given args and sys.argv both
            cli.main()
        else:
            cli.main(args)
    except SystemExit as exit_:  # --help, --version, --print_config, `mtl export`: their own exit code
        return _exit_code(exit_.code)
    except Exception as exc:
        line = None if debug() else error_line(exc, args)
        if line is None:
            raise
        print(PREFIX + line, file=sys.stderr)
        return 2
    return 0


def debug() -> bool:
    """``MTL_DEBUG`` set (to anything but empty, 0, false or no): user errors keep their traceback too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_line(exc: BaseException, argv: Sequence[str] | None = None) -> str | None:
    """The one line (without the ``mtl: error:`` prefix) telling a user what is wrong, or None if it is a bug.

    ``argv`` (the command's arguments) lets the line name the config file at fault where the exception does not.
    """
    args = list(argv or [])
    ours = errors.find_config_error(exc)
    if ours is not None:
        return _one_line(str(ours))
    if isinstance(exc, argparse.ArgumentError):
        return _one_line(_parse_error(exc, args))
    misconfigured = _find(exc, lambda e: isinstance(e, _loaded(_MISCONFIGURATION)))
    if misconfigured is not None:
        return _one_line(_named(misconfigured))
    diverged = _find(exc, lambda e: isinstance(e, FloatingPointError))
    if diverged is not None:
        return _one_line(str(diverged))
    checked = _loaded(_CHECKED_CONSTRUCTORS)
    refused = _find(
        exc, lambda e: isinstance(e, ValueError) and bool(checked) and _constructing(e, checked) is not None
    )
    if refused is not None:
        return _one_line(_named(refused))
    missing = _find(exc, lambda e: isinstance(e, (FileNotFoundError, PermissionError)))
    if missing is not None:
        return _one_line(_os_error(missing))
    return None


# ----------------------------------------------------------------------------------------------- the chain
def _find(exc: BaseException, test: Any) -> BaseException | None:
    return next((e for e in errors.exception_chain(exc) if test(e)), None)


def _loaded(names: Sequence[tuple[str, str]]) -> tuple[type, ...]:
    """The classes among ``(module, name)`` whose module is imported; importing one here would be slow and useless."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def _constructing(exc: BaseException, classes: tuple[type, ...] = ()) -> str | None:
    """The name of the class whose ``__init__`` raised ``exc`` (the innermost public one), or None.

    With ``classes``, only an instance of those counts. The CLI's own ``__init__`` (which runs everything) does not.
    """
    cli_classes = _loaded([("lightning.pytorch.cli", "LightningCLI")])
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        self = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        public = self is not None and not type(self).__name__.startswith("_")
        if public and not isinstance(self, cli_classes) and (not classes or isinstance(self, classes)):
            found = type(self).__name__
        tb = tb.tb_next
    return found


def _named(exc: BaseException) -> str:
    """The message, after the name of the class whose constructor refused its arguments (when one did)."""
    name = _constructing(exc)
    return f"{name}: {exc}" if name else str(exc)


def _os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def _one_line(text: str) -> str:
    """Lines joined, so that a message written over several lines still ends as one."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


# -------------------------------------------------------------------------------------- jsonargparse errors
class _Report:
    """What jsonargparse's chain of errors says: the key at fault, the class it belongs to, the innermost error.

    Each level of a nested report starts with ``Parser key "k":`` (a key of the parser at that level) or ``Problem
    with given class_path 'c':`` (the keys below are that class's init_args); the chain repeats levels, so a level is
    read once per distinct message.
    """

    def __init__(self, exc: BaseException) -> None:
        self.parts: list[str] = []  # the key, as the segments of its dotted name
        self.class_path: str | None = None  # the class whose init_args the deepest key is one of
        self.union: str | None = None  # the Union report about the deepest key itself (its types)
        self.leaf: BaseException = exc
        previous = None
        for error in errors.exception_chain(exc):
            self.leaf = error
            text = str(error).strip()
            if text == previous:
                continue
            previous = text
            first = text.splitlines()[0] if text else ""
            key = re.match(r'Parser key "([^"]+)":', first)
            given = re.match(r"Problem with given class_path '([^']+)':", first)
            if key:
                if self.parts[-1:] != [key.group(1)]:  # a level may restate its key ("Parser key "k": ...")
                    self.parts.append(key.group(1))
                self.union = None
            elif given:
                self.class_path = given.group(1)
                self.parts.append("init_args")
                self.union = None
            elif first.startswith("Does not validate against any of the Union subtypes"):
                self.union = text

    @property
    def key(self) -> str:
        parts = self.parts[:-1] if self.parts[-1:] == ["init_args"] else self.parts
        return ".".join(parts)

    def under(self, name: str) -> str:
        """The full key of ``name``, a key of the deepest level."""
        return ".".join([*self.parts, name])


def _parse_error(exc: argparse.ArgumentError, args: list[str]) -> str:
    """The line for a jsonargparse parse error; always one, the innermost message at worst."""
    report = _Report(exc)
    text = str(exc)
    leaf = str(report.leaf).strip()
    for explain in (_unknown_key, _config_file, _missing_file, _unknown_class, _wrong_type, _argparse_usage):
        line = explain(report, leaf, text, args)
        if line is not None:
            return line
    return f"{report.key}: {leaf}" if report.key and not leaf.startswith("Parser key") else leaf or text


def _unknown_key(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """A key that no parser level has: did-you-mean over the keys of the parser that refused it."""
    before = re.match(r"Option '([^']+)' is not accepted before subcommand (\S+)", leaf)
    if before:
        return f"option '{before.group(1)}' must come after the command ({before.group(2)}), not before it"
    match = (
        re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", leaf)
        or re.match(r"Group '([^']+)' does not accept option '([^']+)'", leaf)
        or re.match(r"Option '([^']+)' is not accepted", leaf)
    )
    unrecognized = re.match(r"unrecognized arguments: (.*)", leaf)
    if match:
        name = ".".join(match.groups())
        key = report.under(name) if report.parts else name
    elif unrecognized:
        first = unrecognized.group(1).split()[0]
        if not first.startswith("-"):
            return f"unexpected argument '{first}': options are written --key value, e.g. --trainer.max_epochs 5"
        name = key = first.lstrip("-").split("=", 1)[0]
    else:
        return None
    keys = _keys_of(_refusing_parser(report.leaf, args))
    where = _where(key, args)
    line = f"unknown option '{key}'{where}"
    close = _close(name, keys)
    prefix = key[: len(key) - len(name)]
    if close:
        line += f": did you mean {' or '.join(repr(prefix + c) for c in close)}?"
    elif keys:
        group = name.rpartition(".")[0]
        level = sorted({k[len(group) + 1 :] for k in keys if k.startswith(group + ".")} if group else [])
        line += f"; the options there: {_listed(level or _roots(keys))}"
    help_ = f"mtl {_command(args)} --{report.key}.help {report.class_path}" if report.class_path else ""
    return line + f" (all of them: {help_ or f'mtl {_command(args)} --help'})"


def _refusing_parser(leaf: BaseException, args: list[str]) -> Any:
    """The jsonargparse parser that raised ``leaf`` (the innermost one in its traceback), at the subcommand's level.

    The parser is a local of the frames of its own methods: the only handle on it once its constructor has failed.
    """
    parser = getattr(leaf, "subcommand_parser", None)
    if parser is None:
        module = sys.modules.get("jsonargparse")
        parser_class = getattr(module, "ArgumentParser", None)
        tb = leaf.__traceback__
        while tb is not None and isinstance(parser_class, type):
            candidate = tb.tb_frame.f_locals.get("self")
            if isinstance(candidate, parser_class):
                parser = candidate
            tb = tb.tb_next
    subparsers = _subcommand_parsers(parser)
    if subparsers:  # the main parser: the keys are the subcommand's
        parser = subparsers.get(_command(args)) or next(iter(subparsers.values()))
    return parser


def _subcommand_parsers(parser: Any) -> dict[str, Any]:
    return compat.subcommand_parsers(parser)


def _keys_of(parser: Any) -> list[str]:
    """The keys a parser accepts (its actions' destinations), without the ``help`` ones."""
    keys = (getattr(a, "dest", "") for a in compat.parser_actions(parser))
    return [k for k in keys if k and k != argparse.SUPPRESS and k != "help" and not k.endswith(".help")]


def _close(name: str, keys: list[str]) -> list[str]:
    """The keys like ``name``: among its siblings when it is dotted (``trainer.maxepochs``), else among all.

    A dotted name whose group is itself misspelt (``traner.max_epochs``) is matched with the group corrected.
    """
    group, _, last = name.rpartition(".")
    if not group:
        return difflib.get_close_matches(name, _roots(keys), n=2, cutoff=0.6)
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == group}
    if not siblings:
        root, _, rest = name.partition(".")
        fixed = difflib.get_close_matches(root, _roots(keys), n=1, cutoff=0.6)
        return (_close(f"{fixed[0]}.{rest}", keys) or fixed) if fixed else []
    if last in siblings:
        return [siblings[last]]
    return [siblings[c] for c in difflib.get_close_matches(last, list(siblings), n=2, cutoff=0.6)]


def _roots(keys: list[str]) -> list[str]:
    """The top-level names of dotted keys, e.g. trainer of trainer.max_epochs."""
    return sorted({k.split(".")[0] for k in keys})


def _where(key: str, args: list[str]) -> str:
    """`` (in FILE)`` for a key that comes from one of the config files given, not from the command line.

    A file given for a group (``--model FILE``) holds the key without the group: a file matches when one of its keys
    is the key or ends it.
    """
    if any(_plain(a.lstrip("-").split("=", 1)[0].rstrip("+")) == _plain(key) for a in args if a.startswith("--")):
        return ""
    import yaml

    for path in _config_files(args):
        try:
            content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if any(key == k or key.endswith("." + k) for k in _flat_keys(content)):
            return f" (in {path})"
    return ""


def _plain(key: str) -> str:
    """A key without its ``init_args`` levels: ``--model.hidden`` and ``--model.init_args.hidden`` are one key."""
    return ".".join(p for p in key.split(".") if p != "init_args")


def _flat_keys(content: object, prefix: str = "") -> set[str]:
    """The dotted keys of a loaded YAML document; the items of a list are under the list's key."""
    keys: set[str] = set()
    if isinstance(content, dict):
        for name, value in content.items():
            key = f"{prefix}{name}"
            keys |= {key, *_flat_keys(value, key + ".")}
    elif isinstance(content, list):
        for item in content:
            keys |= _flat_keys(item, prefix)
    return keys


def _config_files(args: list[str]) -> list[str]:
    """The files given as configs on the command line: ``--config FILE``, ``--group FILE``, ``--key=FILE``."""
    files = []
    for previous, arg in zip(["", *args], args, strict=False):
        option, equals, value = arg.partition("=")
        if equals and option.startswith("--"):
            candidate = value
        elif previous.startswith("--") and "=" not in previous and not arg.startswith("-"):
            candidate = arg
        else:
            continue
        if candidate.endswith(_CONFIG_SUFFIXES) or previous == "--config" or option == "--config":
            files.append(candidate)
    return files


def _config_file(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """A config file that is empty, not a mapping of keys, or not valid YAML: the file, and the line."""
    yaml_error = _find(report.leaf, lambda e: type(e).__module__.startswith("yaml"))
    sub = re.search(r"Invalid content in sub-config file (.+?): ", text)
    if yaml_error is not None:
        path = sub.group(1) if sub else _bad_config_file(args)
        where = f"config file {path}" if path else "a config file"
        return f"{where} is not valid YAML{_yaml_problem(yaml_error)}"
    if leaf.startswith("Unexpected config:") or text.startswith("Unexpected config:"):
        path = _bad_config_file(args)
        content = leaf.partition(":")[2].strip()
        what = "is empty" if not content else "does not hold a mapping of keys (e.g. trainer:, model:, data:)"
        return f"config file {path} {what}" if path else f"a config file {what}: {_shorten(content)}"
    return None


def _yaml_problem(error: BaseException) -> str:
    """`` at line L, column C: problem (context at line L)``, from a PyYAML MarkedYAMLError (lines from 1)."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or _one_line(str(error))
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(error, "context", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{at}: {problem}"


def _bad_config_file(args: list[str]) -> str | None:
    """The first config file given that does not load as a YAML mapping (jsonargparse loads them in that order)."""
    import yaml

    for path in _config_files(args):
        try:
            content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        except yaml.YAMLError:
            return path
        if not isinstance(content, dict):
            return path
    return None


def _missing_file(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """A file named as a config (``--config``, ``--trainer FILE``, ``--trainer.callbacks+ FILE``) that is not there."""
    match = (
        re.search(r"(?:File does not exist|Path is not a file): '([^']+)'", text)
        or re.search(r"Unable to load config '([^']+)'", text)
        or re.search(r"Expected a path but (\S+) either not accessible or invalid", text)
    )
    if match is None:
        return None
    path = match.group(1)
    looks_like_a_file = path.endswith(_CONFIG_SUFFIXES) or os.sep in path or path.startswith(".")
    if not looks_like_a_file or Path(path).is_file():
        return None  # not meant as a file (a class path, a value): another explanation applies
    state = "is not a file" if Path(path).exists() else "does not exist"
    cwd = "" if Path(path).is_absolute() else f" (relative to the current directory {Path.cwd()})"
    return f"{report.key or 'config'}: file {path} {state}{cwd}"


def _unknown_class(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """A class_path naming nothing importable: the classes its module does have, close matches first."""
    key = f"{report.key}.class_path" if report.key else "class_path"
    if isinstance(report.leaf, AttributeError):
        match = re.match(r"module '([^']+)' has no attribute '([^']+)'", leaf)
        if match is None:
            return None
        module_name, name = match.groups()
        names = _classes_in(module_name)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        others = [n for n in names if n not in close]
        line = f"{key}: module {module_name} has no class {name}"
        if close:
            line += f"; did you mean {' or '.join(f'{module_name}.{c}' for c in close)}?"
        if others:
            line += f" {'Others' if close else 'It has'}: {_listed(others)}"
        return line
    if isinstance(report.leaf, ModuleNotFoundError):
        missing = getattr(report.leaf, "name", None) or leaf
        line = f"{key}: no module named {missing}"
        parent, _, last = str(missing).rpartition(".")
        close = difflib.get_close_matches(last, _submodules(parent), n=3, cutoff=0.6) if parent else []
        return line + (f"; did you mean {' or '.join(f'{parent}.{c}' for c in close)}?" if close else "")
    match = re.search(r"Expected a dot import path string: (\S+)", leaf)
    if match:
        return f"{key}: '{match.group(1)}' is neither a config file nor a class path (package.module.ClassName)"
    return None


def _classes_in(module_name: str) -> list[str]:
    """The public classes of a module: its ``__all__`` and the classes of its own package it holds."""
    module = sys.modules.get(module_name)
    if module is None:
        return []
    package = module_name.split(".")[0]
    names = {n for n in getattr(module, "__all__", []) if isinstance(getattr(module, n, None), type)}
    names |= {
        n
        for n, v in vars(module).items()
        if isinstance(v, type) and not n.startswith("_") and v.__module__.split(".")[0] == package
    }
    return sorted(names)


def _submodules(package_name: str) -> list[str]:
    import pkgutil

    package = sys.modules.get(package_name)
    return sorted(m.name for m in pkgutil.iter_modules(getattr(package, "__path__", None) or []))


def _wrong_type(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """A value of the wrong type: the key, the value and the types expected."""
    match = re.search(r"Expected a (.+?)\. Got value: (.*)", leaf)
    if match is None:
        return None
    value = match.group(2).strip()
    subtypes = re.search(r"Subtypes: \[(.*)\]", report.union or "")
    types = _split(subtypes.group(1)) if subtypes else [match.group(1)]
    expected = _types_text(types)
    if re.search(r"Expected a path but \S+ either not accessible", text):
        expected += " (or a config file holding it)"
    return f"{report.key}: expected {expected}, got '{_shorten(value)}'"


def _split(listing: str) -> list[str]:
    """``a, b[c, d], e`` -> ``[a, b[c, d], e]``: commas between brackets do not separate."""
    items, depth, current = [], 0, ""
    for char in listing:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "NoneType": "null",
    "Sequence": "a list",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
    "Mapping": "a mapping",
    "Path": "a path",
}


def _types_text(types: list[str]) -> str:
    """``[<class 'int'>, <class 'NoneType'>]`` -> ``an integer or null``; Literals become their values."""
    words: list[str] = []
    values: list[str] = []  # the values of all the Literals, as one list
    for type_ in types:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", type_)
        if literal:
            values += [v for v in _split(literal.group(1)) if v not in values]
            continue
        name = re.sub(r"^<class '(.*)'>$", r"\1", type_).split("[")[0].rpartition(".")[2]
        word = _TYPE_WORDS.get(name, f"a {name}")
        if word not in words:
            words.append(word)
    return " or ".join([*(["one of " + ", ".join(values)] if values else []), *words])


def _argparse_usage(report: _Report, leaf: str, text: str, args: list[str]) -> str | None:
    """argparse's own usage errors: an invalid choice (with a did-you-mean), an option without its value."""
    choice = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", leaf)
    if choice:
        what, value, listing = choice.groups()
        choices = [c.strip().strip("'") for c in listing.split(",")]
        what = "command" if what == "subcommand" else what
        close = difflib.get_close_matches(value, choices, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        line = f"unknown {what} '{value}': {hint}choose from {', '.join(choices)}"
        if what == "command" and args and args[0].startswith("-"):  # `mtl --trainer.max_epochs 3 fit`
            line += f"; options go after the command: mtl {_command_in(args, choices)} {args[0]} ..."
        return line
    needs = re.match(r"argument (\S+): expected (one|at least one) argument", leaf)
    if needs:
        return f"{needs.group(1)} needs a value, e.g. {needs.group(1)} VALUE"
    required = re.match(r"the following arguments are required: (.*)", leaf)
    if required:
        return f"missing {required.group(1)}: give it on the command line or in a --config file"
    return None


def _command_in(args: list[str], choices: list[str]) -> str:
    return next((a for a in args if a in choices), choices[0])


def _command(args: list[str]) -> str:
    return next((a for a in args if not a.startswith("-")), "fit")


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _shorten(text: str, width: int = 80) -> str:
    text = _one_line(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def _exit_code(code: object) -> int:
    """``SystemExit.code`` as the process would report it: None is 0, a message is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
