"""Every error a user can cause reaches the terminal as one line ``mtl: error: ...`` and exit code 2 (console.py).

The catalogue runs bad command lines through :func:`mtl_lightning.console.run` in this process, from an empty
working directory that must stay empty: most fail while parsing, the rest before or at the first training step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO

from mtl_lightning import console
from mtl_lightning.callbacks.run_folder import FAILED
from mtl_lightning.cli import main
from mtl_lightning.errors import ConfigError, exception_chain

# Small runs for the cases that get as far as the Trainer, writing (if anything) under {tmp}/runs.
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
RUNS = ["--trainer.logger.init_args.save_dir", "{tmp}/runs", "--trainer.default_root_dir", "{tmp}/runs"]
# Config files the cases name, written into {tmp}/inputs (not the working directory).
FILES = {
    "empty.yaml": "",
    "syntax.yaml": "trainer:\n  max_epochs: 1\n  foo: [1\n",
    "list.yaml": "- 1\n- 2\n",
    "typo_trainer.yaml": "trainer:\n  max_epoch: 1\n",
    "typo_model.yaml": "model:\n  init_args:\n    encoder:\n      init_args:\n        hiddn: [3]\n",
    "typo_group.yaml": "traner:\n  max_epochs: 1\n",
    "model_tasks.yaml": "model:\n  init_args:\n    tasks:\n      - {name: purchase, kind: binary}\n",
}
QUICK = str(CONFIGS / "quickstart.yaml")
EARLY_STOPPING_BOGUS_MODE = ["--trainer.callbacks.monitor", "val/loss", "--trainer.callbacks.mode", "bogus"]
MISSING_CSV = ["--data.init_args.path", "{tmp}/missing.csv"]
IN = "{tmp}/inputs"
TABULAR = str(CONFIGS / "data" / "tabular_example.yaml")
CUSTOMERS = (REPO / "mtl_lightning" / "data" / "examples" / "customers.csv").read_text().splitlines()

# (arguments of `mtl`, what the line must name). "{tmp}" is the test's tmp_path.
CATALOGUE = [
    # Unknown keys: a did-you-mean over the keys of the parser that refused them, and where to see them all.
    pytest.param(
        ["fit", "--model.init_args.hiden", "3"],
        ["unknown option 'model.init_args.hiden'", "encoder", "mtl fit --model.help mtl_lightning.MultiTaskModule"],
        id="unknown-model-key",
    ),
    pytest.param(
        ["fit", "--trainer.maxepochs", "3"],
        ["'trainer.maxepochs'", "did you mean 'trainer.max_epochs'"],
        id="unknown-trainer-key",
    ),
    pytest.param(["fit", "--hello", "3"], ["'hello'", "trainer", "mtl fit --help"], id="unknown-top-level-key"),
    pytest.param(["fit", "--print_confg"], ["'print_confg'", "'print_config'"], id="misspelt-flag"),
    pytest.param(
        ["fit", "--config", QUICK, "--config", f"{IN}/typo_trainer.yaml"],
        ["'trainer.max_epoch'", f"(in {IN}/typo_trainer.yaml)", "did you mean 'trainer.max_epochs'"],
        id="unknown-key-in-yaml",
    ),
    pytest.param(
        ["fit", "--config", QUICK, "--config", f"{IN}/typo_model.yaml"],
        ["'model.init_args.encoder.init_args.hiddn'", "typo_model.yaml", "'model.init_args.encoder.init_args.hidden'"],
        id="unknown-nested-key-in-yaml",
    ),
    pytest.param(
        ["fit", "--config", QUICK, "--config", f"{IN}/typo_group.yaml"],
        ["'traner.max_epochs'", "typo_group.yaml", "did you mean 'trainer.max_epochs'"],
        id="misspelt-group-in-yaml",
    ),
    # A class_path naming no class: the classes the module has, close matches first.
    pytest.param(
        ["fit", "--model.init_args.encoder.class_path", "mtl_lightning.encoders.MLPEncodr"],
        ["model.init_args.encoder.class_path", "no class MLPEncodr", "did you mean mtl_lightning.encoders.MLPEncoder"],
        id="misspelt-encoder-class",
    ),
    pytest.param(
        ["fit", "--model.init_args.optimizer.class_path", "torch.optim.Adamm"],
        ["model.init_args.optimizer.class_path", "Adamm", "torch.optim.Adam", "AdamW"],
        id="misspelt-optimizer-class",
    ),
    pytest.param(
        ["fit", "--trainer.callbacks+", "lightning.pytorch.callbacks.EarlyStoping"],
        ["trainer.callbacks", "EarlyStoping", "lightning.pytorch.callbacks.EarlyStopping"],
        id="misspelt-callback-class",
    ),
    pytest.param(
        ["fit", "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBordLogger"],
        ["trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger"],
        id="misspelt-logger-class",
    ),
    pytest.param(
        ["fit", "--model.init_args.encoder.class_path", "mtl_lightning.encoderz.MLPEncoder"],
        ["no module named mtl_lightning.encoderz", "did you mean mtl_lightning.encoders"],
        id="misspelt-module",
    ),
    pytest.param(["fit", "--model.class_path", "nope"], ["model.class_path", "'nope'"], id="class-path-not-dotted"),
    # Values of the wrong type: the key, the value and the types expected.
    pytest.param(
        ["fit", "--trainer.max_epochs", "abc"],
        ["trainer.max_epochs: expected an integer or null, got 'abc'"],
        id="max-epochs-not-an-int",
    ),
    pytest.param(
        ["fit", "--data.init_args.batch_size", "x"],
        ["data.init_args.batch_size: expected an integer, got 'x'"],
        id="batch-size-not-an-int",
    ),
    pytest.param(
        ["fit", "--model.init_args.encoder.init_args.dropout", "high"],
        ["model.init_args.encoder.init_args.dropout: expected a number, got 'high'"],
        id="dropout-not-a-number",
    ),
    pytest.param(
        ["fit", "--trainer.precision", "17"],
        ["trainer.precision: expected one of", "'bf16-mixed'", "got '17'"],
        id="precision-not-a-choice",
    ),
    pytest.param(
        ["fit", "--seed_everything", "x"], ["seed_everything: expected", "an integer", "got 'x'"], id="seed-not-an-int"
    ),
    pytest.param(
        ["fit", "--data.init_args.tasks", "3"],
        ["data.init_args.tasks: expected a list", "got '3'"],
        id="tasks-not-a-list",
    ),
    pytest.param(["fit", "--trainer.max_epochs"], ["--trainer.max_epochs needs a value"], id="option-without-value"),
    # Config files: missing, not a file, empty, not a mapping, not YAML (the file and the line).
    pytest.param(["fit", "--config", f"{IN}/empty.yaml"], [f"config file {IN}/empty.yaml is empty"], id="empty-yaml"),
    pytest.param(
        ["fit", "--config", f"{IN}/syntax.yaml"],
        [f"config file {IN}/syntax.yaml is not valid YAML at line 4", "line 3"],
        id="yaml-syntax-error",
    ),
    pytest.param(
        ["fit", "--model", f"{IN}/syntax.yaml"], [f"{IN}/syntax.yaml is not valid YAML", "line 4"], id="yaml-group-file"
    ),
    pytest.param(
        ["fit", "--config", f"{IN}/list.yaml"], [f"{IN}/list.yaml does not hold a mapping"], id="yaml-not-a-mapping"
    ),
    pytest.param(
        ["fit", "--config", "{tmp}/missing.yaml"],
        ["config: file {tmp}/missing.yaml does not exist"],
        id="config-missing",
    ),
    pytest.param(
        ["fit", "--trainer", "missing.yaml"],
        ["trainer: file missing.yaml does not exist", "current directory"],
        id="relative-path",
    ),
    pytest.param(["fit", "--config", IN], [f"file {IN} is not a file"], id="config-is-a-directory"),
    pytest.param(
        ["fit", "--trainer", "{tmp}/missing.yaml"],
        ["trainer: file {tmp}/missing.yaml does not exist"],
        id="group-missing",
    ),
    pytest.param(
        ["fit", "--trainer.callbacks+", "{tmp}/missing.yaml"],
        ["trainer.callbacks: file {tmp}/missing.yaml does not exist"],
        id="callback-file-missing",
    ),
    # The command line's shape.
    pytest.param(["fitt"], ["unknown command 'fitt'", "did you mean fit"], id="misspelt-command"),
    pytest.param(
        ["--trainer.max_epochs", "3", "fit"], ["options go after the command: mtl fit"], id="option-before-command"
    ),
    pytest.param(["fit", "foo"], ["unexpected argument 'foo'"], id="stray-positional"),
    # Lightning's own checks of the Trainer's and callbacks' arguments (MisconfigurationException, ValueError).
    pytest.param(["fit", "--trainer.max_epochs", "-5"], ["Trainer:", "max_epochs", "-5"], id="negative-max-epochs"),
    pytest.param(["fit", "--trainer.devices", "0"], ["Trainer:", "devices='0'"], id="zero-devices"),
    pytest.param(["fit", "--trainer.limit_train_batches", "-1"], ["limit_train_batches"], id="negative-limit"),
    pytest.param(
        ["fit", "--trainer.accelerator", "gpux"], ["Trainer:", "accelerator='gpux'"], id="unknown-accelerator"
    ),
    pytest.param(
        ["fit", "--trainer.callbacks+", "lightning.pytorch.callbacks.EarlyStopping", *EARLY_STOPPING_BOGUS_MODE],
        ["EarlyStopping:", "bogus"],
        id="callback-refuses-argument",
    ),
    # Our own errors (ConfigError), from the parser, from a data module's setup inside the Trainer.
    pytest.param(
        ["fit", "--data.init_args.tasks", "[{name: a, kind: nope}]"], ["task 'a': unknown kind 'nope'"], id="task-kind"
    ),
    pytest.param(
        ["fit", "--data", str(CONFIGS / "data" / "tabular_example.yaml"), *MISSING_CSV, *TINY, *RUNS],
        ["{tmp}/missing.csv", "does not exist"],
        id="data-file-missing-in-setup",
    ),
    # Errors at the start of the run or at its first step.
    pytest.param(
        ["fit", "--model.init_args.optimizer.init_args.lr", "-1", *TINY, *RUNS],
        ["AdamW: Invalid learning rate: -1.0"],
        id="optimizer-refuses-lr",
    ),
    pytest.param(
        ["fit", "--model.init_args.optimizer.init_args.lr", "1e30", *TINY, *RUNS],
        ["the loss of task(s)", "nan", "gradient_clip_val"],
        id="nan-loss",
    ),
    pytest.param(
        ["validate", "--ckpt_path", "{tmp}/missing.ckpt", *RUNS],
        ["{tmp}/missing.ckpt"],
        id="checkpoint-missing",
    ),
    # Runs that would silently drop or replace what the user gave, and checkpoints that do not load
    # (tests/test_trustworthy_runs.py tests each mechanism; here: one line, exit 2, nothing written).
    pytest.param(
        ["export", "--format", "onnx"],
        ["mtl export: the following arguments are required: --ckpt_path"],
        id="export-usage",
    ),
    pytest.param(["compress", "report", "--nope"], ["mtl compress report:", "--ckpt_path"], id="compress-usage"),
    pytest.param(["predict", *RUNS], ["mtl predict needs trained weights", "--ckpt_path"], id="predict-untrained"),
    pytest.param(["test", *RUNS], ["mtl test needs trained weights"], id="test-untrained"),
    pytest.param(
        ["validate", "--ckpt_path", f"{IN}/empty.ckpt", *RUNS], ["empty.ckpt is empty (0 bytes)"], id="ckpt-empty"
    ),
    pytest.param(
        ["test", "--ckpt_path", f"{IN}/truncated.ckpt", *RUNS],
        ["truncated.ckpt is truncated or not a checkpoint", "--ckpt_path", "good.ckpt"],
        id="ckpt-truncated",
    ),
    pytest.param(
        ["predict", "--ckpt_path", f"{IN}/random.ckpt", *RUNS],
        ["random.ckpt is not a PyTorch checkpoint"],
        id="ckpt-random",
    ),
    pytest.param(["test", "--ckpt_path", IN, *RUNS], [f"{IN} is a directory, not a checkpoint"], id="ckpt-directory"),
    pytest.param(
        ["fit", "--ckpt_path", "last", *RUNS],
        ["--ckpt_path last: no run under {tmp}/runs/quickstart"],
        id="no-run-to-resume",
    ),
    pytest.param(
        ["test", "--ckpt_path", f"{IN}/good.ckpt", "--data.init_args.tasks", "[{name: purchase, kind: binary}]", *RUNS],
        ["checkpoint was trained for tasks [purchase", "but the data declares [purchase (binary, 1 outputs)]"],
        id="ckpt-other-tasks",
    ),
    pytest.param(
        ["test", "--ckpt_path", f"{IN}/good.ckpt", "--model.init_args.encoder.init_args.hidden", "[8]", *RUNS],
        ["--model.init_args.encoder.init_args.hidden [8] (the checkpoint has [16])", "drop the option"],
        id="ckpt-incompatible-option",
    ),
    pytest.param(
        ["fit", "--config", QUICK, "--config", f"{IN}/model_tasks.yaml", *RUNS],
        ["model.init_args.tasks [purchase (binary, 1 outputs)] differ from data.init_args.tasks"],
        id="model-tasks-differ",
    ),
    pytest.param(
        ["fit", "--data", TABULAR, "--data.init_args.path", f"{IN}/text_in_numbers.csv", *TINY, *RUNS],
        ["feature column 'age' is mostly numbers", "'abc'"],
        id="text-in-numeric-column",
    ),
    pytest.param(
        ["fit", "--data", TABULAR, "--data.init_args.path", f"{IN}/no_churn_labels.csv", *TINY, *RUNS],
        ["task 'churned' has no labels in the 'train' split"],
        id="task-without-labels",
    ),
    pytest.param(
        ["fit", "--data", TABULAR, "--data.init_args.path", f"{IN}/three_rows.csv", *TINY, *RUNS],
        ["split is empty"],
        id="table-too-small",
    ),
]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the quickstart's tasks with a small encoder (hidden [16]), trained for a few steps."""
    root = tmp_path_factory.mktemp("good")
    args = [
        "fit",
        "--model.init_args.encoder.init_args.hidden",
        "[16]",
        *TINY,
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = main([*args, "--trainer.logger.init_args.save_dir", str(root), "--trainer.default_root_dir", str(root)])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def _customers(rows: int, cell: Callable[[int, int, str], str] = lambda row, col, value: value) -> str:
    """The example customers table, its first ``rows`` rows, each cell through ``cell(row, column, value)``."""
    lines = [CUSTOMERS[0]]
    for row, line in enumerate(CUSTOMERS[1 : rows + 1]):
        lines.append(",".join(cell(row, col, value) for col, value in enumerate(line.split(","))))
    return "\n".join(lines) + "\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good_checkpoint: Path) -> Path:
    """An empty working directory (tmp/cwd) with the cases' files beside it (tmp/inputs)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, text in FILES.items():
        (inputs / name).write_text(text, encoding="utf-8")
    good = good_checkpoint.read_bytes()
    for name, content in {
        "good.ckpt": good,
        "truncated.ckpt": good[: len(good) // 2],
        "empty.ckpt": b"",
        "random.ckpt": b"\x00" + os.urandom(4095),  # not 0x80: that first byte reads as a (damaged) pickle
    }.items():
        (inputs / name).write_bytes(content)
    age, churned = CUSTOMERS[0].split(",").index("age"), CUSTOMERS[0].split(",").index("churned")
    (inputs / "text_in_numbers.csv").write_text(
        _customers(300, lambda row, col, value: "abc" if col == age and row in (3, 9) else value)
    )
    (inputs / "no_churn_labels.csv").write_text(
        _customers(300, lambda row, col, value: "" if col == churned else value)
    )
    (inputs / "three_rows.csv").write_text(_customers(3))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    return cwd


def _filled(items: list[str], tmp: Path) -> list[str]:
    return [item.replace("{tmp}", str(tmp)) for item in items]


@pytest.mark.parametrize(("args", "named"), CATALOGUE)
def test_user_error_is_one_line_and_exit_code_2(
    args: list[str], named: list[str], workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = workdir.parent
    inputs = sorted((tmp / "inputs").iterdir())
    code = console.run(_filled(args, tmp))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mtl: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    for text in _filled(named, tmp):
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not list(workdir.iterdir()), "the failed command left files in the working directory"
    assert not list((tmp / "runs").rglob("*.ckpt")), "the failed command left a checkpoint behind"
    # A run folder is left only by a run that trained some steps (nan-loss), and then marked as failed.
    for version in (tmp / "runs").glob("*/version_*"):
        assert (version / FAILED).read_text().startswith("FloatingPointError"), f"{version} left unmarked"
    assert sorted((tmp / "inputs").iterdir()) == inputs, "the failed command wrote beside its inputs"


def test_debug_variable_keeps_the_exception_and_its_chain(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(Exception) as caught:
        console.run(["fit", "--model.init_args.encoder.class_path", "mtl_lightning.encoders.MLPEncodr"])
    # The whole chain, down to the error that started it, is there for Python to print.
    assert any(isinstance(e, AttributeError) for e in exception_chain(caught.value))
    assert "mtl: error:" not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_debug_variable_off(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(console.DEBUG_ENV, value)
    assert not console.debug()


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--help"], "usage: mtl "),
        (["fit", "--help"], "--trainer.max_epochs"),
        (["fit", "--print_config"], "trainer:"),
        (["--version"], "mtl_lightning "),
    ],
)
def test_help_and_print_config_still_exit_0(
    args: list[str], shown: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert console.run(args) == 0
    captured = capsys.readouterr()
    assert shown in captured.out
    assert "mtl: error:" not in captured.err
    assert not list(workdir.iterdir())


def test_no_arguments_keep_the_short_usage_and_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert console.run([]) == 2
    assert "mtl: error: give a command" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mtl_lightning import cli

    def broken(args: object = None) -> None:
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(cli, "main", broken)
    with pytest.raises(KeyError, match="a bug"):
        console.run(["fit"])
    assert "mtl: error:" not in capsys.readouterr().err


def test_error_line_finds_our_error_in_a_chain_and_none_for_bugs() -> None:
    try:
        try:
            raise ConfigError("num_samples must be >= 1, got 0")
        except ConfigError as ours:
            raise RuntimeError("wrapped by the Trainer") from ours
    except RuntimeError as wrapped:
        assert console.error_line(wrapped) == "num_samples must be >= 1, got 0"
    assert console.error_line(FloatingPointError("the loss of task(s) ['a'] became [nan]")) is not None
    assert console.error_line(ConfigError("first line\n  second line")) == "first line; second line"
    for bug in (KeyError("x"), RuntimeError("x"), ValueError("x"), TypeError("x"), AttributeError("x")):
        assert console.error_line(bug) is None


def test_console_main_exits_with_run_s_code(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    from mtl_lightning import cli

    monkeypatch.setattr(sys, "argv", ["mtl", "fit", "--trainer.maxepochs", "3"])
    with pytest.raises(SystemExit) as exit_:
        cli.console_main()
    assert exit_.value.code == 2


def _mtl_script() -> str:
    script = Path(sys.executable).with_name("mtl")
    found = str(script) if script.exists() else shutil.which("mtl")
    if found is None:
        pytest.skip("the mtl console script is not installed")
    return found


@pytest.mark.integration  # the installed console script, in a subprocess
@pytest.mark.parametrize("debug", [False, True], ids=["one-line", "MTL_DEBUG"])
def test_console_script(debug: bool, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != console.DEBUG_ENV}
    if debug:
        env[console.DEBUG_ENV] = "1"
    proc = subprocess.run(
        [_mtl_script(), "fit", "--model.init_args.encoder.class_path", "mtl_lightning.encoders.MLPEncodr"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mtl: error:")]
    if debug:  # the traceback, the whole chain down to the AttributeError, for a bug report
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" in proc.stderr and "AttributeError" in proc.stderr and not lines
    else:
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and "mtl_lightning.encoders.MLPEncoder" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    assert not list(tmp_path.iterdir())
