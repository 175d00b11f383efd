"""``mtl --version`` and the commands that are not Lightning runs (``mtl export``, ``mtl compress``)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import types

import pytest
from conftest import REPO

import mtl_lightning
from mtl_lightning import cli
from mtl_lightning.errors import ConfigError


def test_version_comes_from_the_package_metadata() -> None:
    assert mtl_lightning.__version__ == importlib.metadata.version("mtl_lightning")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", mtl_lightning.__version__)


def test_version_flag_prints_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtl_lightning {mtl_lightning.__version__}"


@pytest.mark.integration  # `python -m mtl_lightning --version` in a subprocess
def test_python_dash_m_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_lightning", "--version"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mtl_lightning {mtl_lightning.__version__}"


def test_commands_get_their_arguments_and_give_the_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("fake_compress_cli")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_compress_cli", fake)
    monkeypatch.setitem(cli.COMMANDS, "compress", "fake_compress_cli")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", "--ckpt_path", "x.ckpt"])
    assert exit_.value.code == 3 and seen == [["--ckpt_path", "x.ckpt"]]


def test_missing_command_module_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "compress", "mtl_lightning.no_such_module.cli")
    with pytest.raises(ConfigError, match=r"`mtl compress` is not available.*mtl_lightning\.no_such_module\.cli"):
        cli.main(["compress"])


def test_export_is_dispatched(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", "--help"])
    assert exit_.value.code == 0
    assert "usage: mtl export" in capsys.readouterr().out
