"""docs/fork.md, done step by step in a copy of the repository: rename the package, create the files of the doc's
code blocks, train with the doc's command.

The steps come from the doc itself, so the two cannot drift apart: a block after ``<!-- file: PATH -->`` is written
to PATH, one after ``<!-- append: PATH -->`` is appended to PATH, and the commands of a block after ``<!-- run -->``
are run in the copy (``python`` is this interpreter; a ``fit`` gets flags that make it a few batches long). The
copy is not pip-installed: it is put first on ``PYTHONPATH``, and the template's old package name is made
unimportable there, so that a leftover import of it fails instead of loading this checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DOC = REPO / "docs" / "fork.md"
OLD_NAME = "mtl_lightning"
STEP = re.compile(r"<!--\s*(file|append|run):?\s*(\S*)\s*-->\s*\n```[\w-]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
# A few batches instead of the experiment's epochs; every step logged, so the balancer's telemetry is written.
SHORT_FIT = [
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


def doc_steps() -> list[tuple[str, str, str]]:
    """``(action, path, body)`` of every marked code block of the doc, in order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in STEP.finditer(DOC.read_text(encoding="utf-8"))]


def doc_commands(body: str) -> list[list[str]]:
    """The commands of a ``run`` block, one per line (backslash continuations joined, comments dropped)."""
    lines = body.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def tracked_files() -> list[Path]:
    """The repository's files as git sees them (tracked, and untracked but not ignored); never .venv or runs."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout, cannot list the repository's files: {err}")
    return [Path(p) for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def text_files(root: Path) -> dict[str, str]:
    texts = {}
    for p in root.rglob("*"):
        if p.is_file() and "__pycache__" not in p.parts and "runs" not in p.relative_to(root).parts:
            with contextlib.suppress(UnicodeDecodeError):  # binary files cannot mention the name
                texts[p.relative_to(root).as_posix()] = p.read_text(encoding="utf-8")
    return texts


@pytest.fixture(scope="module")
def fork(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The repository copied to a temp folder, with every step of docs/fork.md done in it."""
    copy = tmp_path_factory.mktemp("fork") / "repo"
    for rel in tracked_files():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, copy / rel)
    blocked = tmp_path_factory.mktemp("blocked")
    (blocked / OLD_NAME).mkdir()
    (blocked / OLD_NAME / "__init__.py").write_text(f"raise ImportError('the fork still imports {OLD_NAME}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(blocked)])}
    created, runs, new_name = [], [], None
    for action, path, body in doc_steps():
        if action == "file":
            target = copy / path
            assert not target.exists(), f"docs/fork.md would overwrite {path}, a file of the template"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body, encoding="utf-8")
            created.append(path)
        elif action == "append":
            target = copy / path
            assert target.is_file(), f"docs/fork.md appends to {path}, which does not exist at that step"
            target.write_text(target.read_text(encoding="utf-8") + body, encoding="utf-8")
        else:
            for argv in doc_commands(body):
                assert argv[0] == "python", f"a run block of docs/fork.md has a command the test cannot run: {argv}"
                argv = [sys.executable, *argv[1:]]
                rename = any(a.endswith("rename_package.py") for a in argv)
                if rename:
                    new_name = argv[2]
                before = snapshot(copy) if rename and "--apply" not in argv else None
                if "fit" in argv:
                    argv += SHORT_FIT
                proc = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                if before is not None:
                    assert snapshot(copy) == before, "the dry run of rename_package.py changed files"
                runs.append((argv, proc))
    assert new_name is not None, "docs/fork.md no longer runs scripts/rename_package.py"
    return {"root": copy, "env": env, "created": created, "runs": runs, "name": new_name}


def test_doc_has_every_kind_of_step() -> None:
    steps = doc_steps()
    created = [path for action, path, _ in steps if action == "file"]
    for part in ("encoders/", "data/", "balancers/", "kinds/", "configs/model/", "configs/data/", "configs/balancer/"):
        assert any(part in path for path in created), f"docs/fork.md creates no file under {part}"
    assert any(action == "append" for action, _, _ in steps), "docs/fork.md adds no task"
    commands = [argv for action, _, body in steps if action == "run" for argv in doc_commands(body)]
    assert any("fit" in argv for argv in commands), "docs/fork.md never trains"


@pytest.mark.integration  # the `fork` fixture: a copy of the repository, the doc's commands in subprocesses
def test_rename_moves_the_package_and_leaves_no_old_name(fork: dict) -> None:
    root, name = fork["root"], fork["name"]
    assert (root / name / "__init__.py").is_file()
    assert not (root / OLD_NAME).exists()
    leftovers = {
        path: text.count(OLD_NAME)
        for path, text in text_files(root).items()
        if OLD_NAME in text and path != "docs/fork.md"  # the doc tells how the old name was replaced
    }
    assert not leftovers, f"{OLD_NAME!r} is still mentioned in {leftovers}"
    pyproject = (root / "pyproject.toml").read_text()
    assert f'name = "{name}"' in pyproject
    assert f'"{name}.cli:console_main"' in pyproject
    configs = "".join(p.read_text() for p in (root / "configs").rglob("*.yaml"))
    assert f"class_path: {name}." in configs


@pytest.mark.integration
def test_doc_files_pass_the_linters(fork: dict) -> None:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed next to this interpreter")
    python_files = [p for p in fork["created"] if p.endswith(".py")]
    for args in (["check"], ["format", "--check", "--diff"]):
        proc = subprocess.run([str(ruff), *args, *python_files], cwd=fork["root"], capture_output=True, text=True)
        assert proc.returncode == 0, f"ruff {' '.join(args)} on the doc's files:\n{proc.stdout}{proc.stderr}"


@pytest.mark.integration
def test_training_with_the_doc_command_covers_the_new_task(fork: dict) -> None:
    root = fork["root"]
    run_dir = root / "runs" / "sensors" / "version_0"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["init_args"]["encoder"]["class_path"] == f"{fork['name']}.encoders.tiny_conv.TinyConvEncoder"
    assert config["model"]["init_args"]["balancer"]["class_path"].endswith("initial_loss.InitialLossWeighting")
    tasks = ["anomaly", "activity", "energy", "fault", "load"]
    assert [t["name"] for t in config["data"]["init_args"]["tasks"]] == tasks

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [t["name"] for t in checkpoint["hyper_parameters"]["tasks"]] == tasks
    assert checkpoint["state_dict"]["heads.fault.net.0.weight"].shape == (1, 32)  # a linear head on 32 channels
    assert checkpoint["state_dict"]["balancer.seen"].tolist() == [True] * 5  # the balancer's buffers are saved
    kinds = [t["kind"] for t in checkpoint["hyper_parameters"]["tasks"]]
    assert kinds[-1] == f"{fork['name']}.kinds.share.ShareKind"  # the fork's own kind, by dotted path

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/fault/loss",
        "val/fault/loss",
        "val/fault/auroc",
        "val/activity/accuracy",
        "val/energy/mae",
        "val/load/mae",
        "val/load/rmse",
    ):
        assert tag in tags, f"{tag} was not logged; logged: {sorted(tags)}"
    assert {f"train/balance/weight/{t}" for t in tasks} <= tags
    initial = [events.Scalars(f"train/balance/initial_loss/{t}")[-1].value for t in tasks]
    assert all(v > 0 for v in initial)
    assert initial != [1.0] * 5  # set from the first losses, not left at their starting value


@pytest.mark.slow
@pytest.mark.integration
def test_the_forks_config_tests_cover_the_new_files(fork: dict) -> None:
    """The fork's own test suite runs the new YAML files (every config, every balancer) with their partners."""
    tests = ["tests/test_cli.py", "tests/test_balancer_cli.py", "-k", "tiny_conv or sensors or initial_loss"]
    tests += ["-m", "not gpu"]  # with the slow twins: every new config through all four subcommands
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"],
        cwd=fork["root"],
        env=fork["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 5, proc.stdout[-2000:]
