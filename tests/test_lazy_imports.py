"""``import mtl_lightning``, ``mtl --version`` and ``mtl --help`` import no Lightning; the lazy names still resolve.

Each check runs in a fresh interpreter: this test process has long imported Lightning.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import QUICKSTART, REPO

import mtl_lightning
from mtl_lightning import cli

# Top-level packages that take seconds to import, and this package's heavy parts.
HEAVY = ("lightning", "pytorch_lightning", "torchmetrics", "torchjd", "torch", "jsonargparse")
HEAVY_OURS = ("mtl_lightning.module", "mtl_lightning.balancers", "mtl_lightning.lightning_cli", "mtl_lightning.tasks")


def imported_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code`` (SystemExit is caught)."""
    script = (
        "import json, sys\n"
        f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
        f"heavy = {HEAVY!r}\nours = {HEAVY_OURS!r}\n"
        "names = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(ours))\n"
        "print(json.dumps(names), file=sys.__stderr__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import mtl_lightning",
        "import mtl_lightning.cli",
        "from mtl_lightning.cli import main; main(['--version'])",
        "from mtl_lightning.cli import main; main(['-V'])",
        "from mtl_lightning.cli import main; main(['--help'])",
        "from mtl_lightning.cli import main; main(['-h'])",
        "from mtl_lightning.cli import main; main([])",
        "import sys; sys.argv = ['mtl', '--version']; from mtl_lightning.cli import console_main; console_main()",
    ],
)
def test_light_paths_import_nothing_heavy(code: str) -> None:
    assert imported_after(code) == []


def test_python_dash_m_version_imports_no_lightning() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mtl_lightning", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mtl_lightning {mtl_lightning.__version__}"
    # -X importtime writes one line per imported module: "import time: self | cumulative | name".
    modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")]
    assert "mtl_lightning.cli" in modules
    assert not [m for m in modules if m.split(".")[0] in HEAVY]


def test_help_without_a_command_lists_every_command_and_how_to_get_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mtl ")
    for command in ("fit", "validate", "test", "predict", "export", "compress"):
        assert f"\n  {command} " in out
    assert "mtl fit --help" in out and "mtl export --help" in out and "--version" in out


def test_no_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mtl ") and "mtl: error: give a command" in err


def test_command_help_still_comes_from_lightning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer" in out and "--model" in out and "--data" in out


def test_lazy_names_resolve_to_the_classes() -> None:
    from mtl_lightning.lightning_cli import MTLCLI
    from mtl_lightning.module import MultiTaskModule
    from mtl_lightning.tasks import TaskSpec

    assert mtl_lightning.MultiTaskModule is MultiTaskModule
    assert mtl_lightning.TaskSpec is TaskSpec
    assert cli.MTLCLI is MTLCLI
    assert {"MultiTaskModule", "TaskSpec", "__version__"} <= set(dir(mtl_lightning))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        _ = mtl_lightning.NoSuchThing  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        _ = cli.NoSuchThing  # type: ignore[attr-defined]


def test_yaml_class_path_resolves_the_lazy_name_in_a_fresh_process() -> None:
    # jsonargparse imports `mtl_lightning` and takes the attribute: here nothing has touched it before.
    code = (
        "import mtl_lightning\n"
        "assert 'MultiTaskModule' not in vars(mtl_lightning)\n"
        "from lightning.pytorch import LightningDataModule, LightningModule\n"
        "from mtl_lightning.cli import MTLCLI\n"
        f"cli = MTLCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,"
        f" auto_configure_optimizers=False, run=False, args=['--config', {str(QUICKSTART)!r}, '--trainer.logger',"
        " 'false'])\n"
        "from mtl_lightning.module import MultiTaskModule\n"
        "assert type(cli.model) is MultiTaskModule, type(cli.model)\n"
        "print(cli.config.model.class_path)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "mtl_lightning.MultiTaskModule"
