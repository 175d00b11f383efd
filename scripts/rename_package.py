#!/usr/bin/env python
"""Rename the Python package of a fork, e.g. ``python scripts/rename_package.py acme_mtl`` (a dry run), then the
same with ``--apply``.

The current name is read from ``pyproject.toml`` (``[project] name``), so the script can rename again later. Every
occurrence of that name as a whole word (not inside a longer identifier) is replaced in every text file of the
repository: imports and dotted paths in the package, tests, benchmarks and notebooks, the ``class_path:`` strings of
configs/, pyproject.toml (project name, console-script target, package discovery, package data, the dev extra's
self-reference), README.md and docs/. Then the package folder is moved. docs/fork.md is left as it is: it tells how
the template's own name was replaced.

The files are the repository's (``git ls-files``: tracked and untracked-but-not-ignored); outside a git checkout,
every file below the root except virtual environments, caches and run outputs. Binary files are never touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Kept as written: it explains how the template's own name was replaced.
KEEP = {"docs/fork.md"}
# Outside a git checkout: folders never searched (environments, caches, run outputs, build products).
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    ".ipynb_checkpoints",
    "runs",
    "lightning_logs",
    "build",
    "dist",
}
NAME = re.compile(r"[a-z_][a-z0-9_]*")


class RenameError(Exception):
    """The rename cannot be done as asked; the message says why and what to do."""


def current_name(root: Path) -> str:
    """``[project] name`` of pyproject.toml (read with a regex: tomllib needs Python 3.11)."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    found = re.search(r'^name\s*=\s*"([^"]+)"', project.group(1), re.MULTILINE) if project else None
    if found is None:
        raise RenameError(f"no [project] name in {root / 'pyproject.toml'}")
    name = found.group(1)
    if not (root / name / "__init__.py").is_file():
        raise RenameError(f"pyproject.toml names the project {name!r} but there is no package folder {name}/ at {root}")
    return name


def check_new_name(new: str, old: str, root: Path) -> None:
    """One clear error when ``new`` cannot be the package's name."""
    if new == old:
        raise RenameError(f"the package is already called {old!r}")
    if not NAME.fullmatch(new) or keyword.iskeyword(new):
        raise RenameError(
            f"{new!r} is not a valid package name: use lowercase letters, digits and '_', starting with a letter "
            "or '_' (PEP 8), e.g. acme_mtl"
        )
    if new in sys.stdlib_module_names:
        raise RenameError(f"{new!r} is a module of Python's standard library: imports would be ambiguous")
    if (root / new).exists():
        raise RenameError(f"{root / new} already exists: remove it or pick another name")
    spec = importlib.util.find_spec(new)
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or [])
        raise RenameError(f"a module named {new!r} is already importable here ({where}): pick another name")


def repository_files(root: Path) -> list[Path]:
    """The repository's files (relative paths): git's view of it when it is a checkout, else a walk."""
    if (root / ".git").exists():
        try:
            listed = subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=root,
                check=True,
                capture_output=True,
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            listed = None
        if listed is not None:
            paths = [Path(p) for p in listed.decode().split("\0") if p]
            return sorted(p for p in paths if (root / p).is_file())  # a deleted tracked file is still listed
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [(Path(folder) / n).relative_to(root) for n in names]
    return sorted(files)


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def plan(root: Path, old: str, new: str) -> dict[Path, tuple[str, int]]:
    """``{file: (new text, number of replacements)}`` for every text file that mentions ``old``."""
    pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])")
    changes = {}
    for rel in repository_files(root):
        if rel.as_posix() in KEEP:
            continue
        text = read_text(root / rel)
        if text is None:
            continue
        replaced, count = pattern.subn(new, text)
        if count:
            changes[rel] = (replaced, count)
    return changes


def git_is_dirty(root: Path) -> bool:
    if not (root / ".git").exists():
        return False
    try:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(status.strip())


def rename(root: Path, new: str, apply: bool, allow_dirty: bool = False) -> int:
    old = current_name(root)
    check_new_name(new, old, root)
    changes = plan(root, old, new)
    moved = sum(1 for p in (root / old).rglob("*") if "__pycache__" not in p.parts)
    verb = "rewrote" if apply else "would rewrite"
    for rel, (_, count) in changes.items():
        print(f"{verb} {count:4d} x {old!r} in {rel.as_posix()}")
    total = sum(count for _, count in changes.values())
    print(f"{verb} {total} occurrences in {len(changes)} files")
    print(f"{'moved' if apply else 'would move'} {old}/ -> {new}/ ({moved} entries)")
    if not apply:
        print("dry run: nothing changed. Run again with --apply to rename.")
        return 0
    if git_is_dirty(root) and not allow_dirty:
        raise RenameError(
            "the git working tree has uncommitted changes: commit or stash them first, so that the rename is one "
            "reviewable change (or pass --allow-dirty)"
        )
    for rel, (text, _) in changes.items():
        (root / rel).write_text(text, encoding="utf-8")
    (root / old).rename(root / new)
    print(
        f"done. Reinstall the package under its new name:\n"
        f"  pip uninstall -y {old} && pip install -e '.[dev]'\n"
        f"then check the fork: make lint && make test"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="rename_package.py")
    parser.add_argument("new_name", help="the new package name, e.g. acme_mtl (lowercase, digits and '_')")
    parser.add_argument("--apply", action="store_true", help="make the changes (default: only print them)")
    parser.add_argument("--allow-dirty", action="store_true", help="rename even with uncommitted git changes")
    args = parser.parse_args(argv)
    try:
        return rename(ROOT, args.new_name, args.apply, args.allow_dirty)
    except RenameError as err:
        print(f"rename_package.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
