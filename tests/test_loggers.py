"""The logger presets (configs/logger/): MLflow's local store, W&B offline, CSV and TensorBoard, with no network.

Each preset is checked through ``mtl fit``: the per-task names reach the tracker's store unchanged, the resolved
config is logged, ``--ckpt_path last`` continues the run, and the conflict heatmap reaches every logger that takes
images.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from conftest import CONFIGS, QUICKSTART, SMALL_DATA, run_cli

from mtl_lightning import trackers
from mtl_lightning.callbacks.conflict_heatmap import TAG, GradientConflictHeatmap
from mtl_lightning.errors import ConfigError
from mtl_lightning.resume import resolve_last

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, WandbLogger  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

LOGGERS = CONFIGS / "logger"
# A short quickstart: 4 training and 2 validation batches per epoch, every step logged.
SHORT = [
    *SMALL_DATA,
    "--trainer.limit_train_batches",
    "4",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]
# Names the quickstart logs (its tasks: purchase binary, segment multiclass, spend regression).
NAMES = {"train/loss", "train/purchase/loss", "val/loss", "val/purchase/accuracy", "val/segment/f1", "val/spend/mae"}


@pytest.fixture(autouse=True)
def _offline_trackers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """No network, W&B's own folders inside tmp_path, and the environment as it was afterwards."""
    # The CLI and WandbLogger set these two in os.environ: setenv then delenv makes monkeypatch restore them.
    for name in (trackers.MLFLOW_FILE_STORE_OPT_IN, "WANDB_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    yield
    if wandb.run is not None:  # Lightning never finishes a W&B run; the next fit would join this one
        wandb.finish()


def fit(root: Path, preset: str, *extra: str) -> Any:
    """``mtl fit`` of the short quickstart with ``configs/logger/<preset>.yaml``, writing under ``root``."""
    cli = run_cli(
        ["fit", "--config", str(QUICKSTART), "--trainer.logger", str(LOGGERS / f"{preset}.yaml"), *SHORT, *extra], root
    )
    if wandb.run is not None:
        wandb.finish()  # what the end of an `mtl fit` process does (atexit): writes the run's last records
    return cli


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline run's ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, chunk, records = path.read_bytes(), 7, b"", []  # 7: the ":W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_history(run_dir: Path) -> dict[tuple[str, ...], list[Any]]:
    """Every logged value by key: ``("val/loss",)``, or ``(tag, "caption")`` for a part of an image."""
    values: dict[tuple[str, ...], list[Any]] = {}
    for record in wandb_records(run_dir):
        for item in record.history.item:
            values.setdefault(tuple(item.nested_key) or (item.key,), []).append(json.loads(item.value_json))
    return values


def wandb_history_keys(run_dir: Path) -> set[str]:
    return {key[0] for key in wandb_history(run_dir)}


def wandb_config(run_dir: Path) -> dict[str, Any]:
    return {u.key: json.loads(u.value_json) for r in wandb_records(run_dir) for u in r.config.update}


def test_mlflow_preset_logs_per_task_names_and_the_config_to_a_local_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = fit(tmp_path, "mlflow")
    logger = cli.trainer.logger
    assert isinstance(logger, MLFlowLogger)
    store = tmp_path / "runs" / "mlflow"
    assert logger.save_dir == str(store)  # the preset's save_dir, inside default_root_dir
    client = MlflowClient(f"file:{store}")
    run = client.get_run(logger.run_id)
    assert set(run.data.metrics) >= NAMES, sorted(run.data.metrics)
    assert run.data.metrics["val/loss"] == pytest.approx(float(cli.trainer.callback_metrics["val/loss"]))
    # The resolved config: an artifact, the same file as the one beside the run's checkpoints.
    folder = store / logger.experiment_id / logger.run_id
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    artifact = Path(client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path / "dl")))
    assert artifact.read_text() == (folder / "config.yaml").read_text()
    assert yaml.safe_load(artifact.read_text())["trainer"]["logger"]["class_path"].endswith("MLFlowLogger")
    assert not (store / "config.yaml").exists()  # not at the store's root, where every run would collide
    assert f"MLflow: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store}\n" in capsys.readouterr().out


def test_wandb_preset_runs_offline_with_per_task_names_and_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = fit(tmp_path, "wandb")
    logger = cli.trainer.logger
    assert isinstance(logger, WandbLogger)
    (run_dir,) = (tmp_path / "runs" / "wandb" / "wandb").glob(f"offline-run-*-{logger.version}")
    assert wandb_history_keys(run_dir) >= NAMES
    config = wandb_config(run_dir)["config"]
    assert config["trainer"]["logger"]["init_args"]["offline"] is True
    assert config["data"]["init_args"]["num_samples"] == 1500
    assert (run_dir / "files" / "config.yaml").is_file()  # the file too, uploaded by `wandb sync`
    folder = tmp_path / "runs" / "wandb" / "quickstart" / str(logger.version)
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert f"W&B (offline): wandb sync {run_dir}\n" in capsys.readouterr().out


def test_csv_preset_writes_metrics_csv_and_config_in_its_run_folder(tmp_path: Path) -> None:
    cli = fit(tmp_path, "csv")
    folder = tmp_path / "runs" / "csv" / "quickstart" / "version_0"
    assert cli.trainer.log_dir == str(folder)
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(header) >= NAMES
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == 15


def _heatmap_loggers(root: Path) -> str:
    """The mlflow, wandb and csv presets as one list of loggers, writing under ``root``."""
    loggers = [yaml.safe_load((LOGGERS / f"{p}.yaml").read_text()) for p in ("mlflow", "wandb", "csv")]
    for logger in loggers:
        logger["init_args"]["save_dir"] = str(root / logger["init_args"]["save_dir"])
    return json.dumps(loggers)


def test_conflict_heatmap_reaches_every_logger_that_takes_images(tmp_path: Path) -> None:
    cli = run_cli(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            *SHORT,
            "--trainer.max_epochs",
            "1",
            f"--trainer.logger={_heatmap_loggers(tmp_path)}",
            "--model.balancer",
            str(CONFIGS / "balancer" / "pcgrad.yaml"),
            "--trainer.callbacks+",
            str(CONFIGS / "callbacks" / "conflict_heatmap.yaml"),
            "--trainer.callbacks.every_n_steps",
            "1",
        ],
        tmp_path,
    )
    mlf, _, csv = cli.trainer.loggers
    wandb.finish()
    images = [a.path for a in mlf.experiment.list_artifacts(mlf.run_id, "images")]
    assert len(images) == 2 * 4  # a png and its compressed preview for each of the 4 steps
    assert {p.split("+step+")[1].split("+")[0] for p in images} == {"1", "2", "3", "4"}
    order = mlf.experiment.download_artifacts(mlf.run_id, f"{TAG}/tasks.txt", str(tmp_path / "dl"))
    assert Path(order).read_text().endswith("purchase, segment, spend")
    (run_dir,) = (tmp_path / "runs" / "wandb" / "wandb").glob("offline-run-*")
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 4
    history = wandb_history(run_dir)
    assert history[(TAG, "captions")] == [["rows and columns, top to bottom: purchase, segment, spend"]] * 4
    assert history[(TAG, "width")] == [72] * 4  # 3 tasks x 24 pixels
    assert isinstance(csv, CSVLogger)  # skipped quietly: nothing to assert but that the run ended
    assert cli.trainer.state.finished


@pytest.mark.integration  # two fits per preset: ~40 s on 2 CPU cores
@pytest.mark.parametrize("preset", ["tensorboard", "csv", "mlflow", "wandb"])
def test_ckpt_path_last_continues_the_run_of_each_preset(preset: str, tmp_path: Path) -> None:
    first = fit(tmp_path, preset, "--trainer.max_epochs", "1")
    folder = Path(first.trainer.checkpoint_callback.dirpath).parent
    fit(tmp_path, preset, "--trainer.max_epochs", "1")  # a second run beside it: its own folder and config
    resumed = fit(tmp_path, preset, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 8  # epoch 1 was not redone
    # The newest run with a last.ckpt is the second one: the resume continues it, in its folder.
    second = Path(resumed.trainer.checkpoint_callback.dirpath).parent
    assert second != folder and second.parent == folder.parent
    assert {p.name for p in second.glob("config*.yaml")} == {"config.yaml", "config.resume1.yaml"}
    assert resumed.trainer.logger.version == second.name or f"version_{resumed.trainer.logger.version}" == second.name
    if preset == "mlflow":
        client = resumed.trainer.logger.experiment
        run = resumed.trainer.logger.run_id
        assert [m.step for m in client.get_metric_history(run, "val/loss")] == [3, 7]  # one run, both epochs
        assert {a.path for a in client.list_artifacts(run)} >= {"config.yaml", "config.resume1.yaml"}


def _last(folder: Path) -> None:
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")


def test_resolve_last_pins_the_run_id_of_mlflow_and_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trackers.MLFLOW_FILE_STORE_OPT_IN, "true")
    store = tmp_path / "mlflow"
    client = MlflowClient(f"file:{store}")
    experiment = client.create_experiment("exp")
    old, new = (client.create_run(experiment).info.run_id for _ in range(2))
    _last(store / experiment / old)
    _last(store / experiment / new)
    mlflow_args: dict[str, Any] = {"experiment_name": "exp", "save_dir": str(store)}
    trainer = {"logger": {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": mlflow_args}}
    assert resolve_last(trainer, "last") == store / experiment / new
    assert mlflow_args["run_id"] == new
    assert resolve_last(trainer, "last") is None  # a given run id: Lightning's own lookup

    _last(tmp_path / "wb" / "proj" / "abc123")
    wandb_args: dict[str, Any] = {"project": "proj", "save_dir": str(tmp_path / "wb")}
    trainer = {"logger": [{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": wandb_args}]}
    assert resolve_last(trainer, "last") == tmp_path / "wb" / "proj" / "abc123"
    assert wandb_args["id"] == "abc123"


def test_resolve_last_without_a_run_is_refused_for_mlflow_and_wandb(tmp_path: Path) -> None:
    mlflow_logger = {"class_path": "MLFlowLogger", "init_args": {"save_dir": str(tmp_path / "none")}}
    with pytest.raises(ConfigError, match=r"no run under .*none/ has a checkpoints/last\.ckpt"):
        resolve_last({"logger": mlflow_logger}, "last")
    assert not (tmp_path / "none").exists()  # no empty store created by looking
    wandb_logger = {"class_path": "WandbLogger", "init_args": {"save_dir": str(tmp_path), "project": "p"}}
    with pytest.raises(ConfigError, match=r"no run under .*/p/ has"):
        resolve_last({"logger": wandb_logger}, "last")


def test_heatmap_goes_to_mlflow_as_images_and_skips_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trackers.MLFLOW_FILE_STORE_OPT_IN, "true")
    mlf = MLFlowLogger(experiment_name="heat", save_dir=str(tmp_path / "mlflow"))
    csv = CSVLogger(save_dir=str(tmp_path), name="csv")
    telemetry = SimpleNamespace(last_cosine=torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), task_names=["ta", "tb"])
    trainer = SimpleNamespace(is_global_zero=True, global_step=5, loggers=[csv, mlf])
    GradientConflictHeatmap(every_n_steps=1).on_train_batch_end(
        trainer, SimpleNamespace(balancer=telemetry), None, None, 0
    )  # type: ignore[arg-type]
    pngs = [a.path for a in mlf.experiment.list_artifacts(mlf.run_id, "images") if a.path.endswith(".png")]
    assert len(pngs) == 1 and "+step+5+" in pngs[0]
    from PIL import Image

    local = mlf.experiment.download_artifacts(mlf.run_id, pngs[0], str(tmp_path / "dl"))
    assert Image.open(local).size == (48, 48)  # 2 tasks x 24 pixels
    assert not any((tmp_path / "csv").rglob("*.png"))


def test_viewer_hints_name_each_trackers_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trackers.MLFLOW_FILE_STORE_OPT_IN, "true")
    mlf = MLFlowLogger(experiment_name="x", save_dir=str(tmp_path / "mlflow"))
    assert trackers.viewer_hint(mlf, None) == (
        f"MLflow: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {tmp_path / 'mlflow'}"
    )
    csv = CSVLogger(save_dir=str(tmp_path), name="c")
    assert trackers.viewer_hint(csv, csv.log_dir) == f"CSV: {tmp_path / 'c' / 'version_0' / 'metrics.csv'}"


def test_the_file_store_opt_in_is_set_only_for_a_local_mlflow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    def opted_in(args: dict[str, Any]) -> str | None:
        monkeypatch.delenv(trackers.MLFLOW_FILE_STORE_OPT_IN, raising=False)
        trackers.allow_local_mlflow_store({"logger": {"class_path": "MLFlowLogger", "init_args": args}})
        return os.environ.get(trackers.MLFLOW_FILE_STORE_OPT_IN)

    assert opted_in({"save_dir": "runs/mlflow"}) == "true"
    assert opted_in({"tracking_uri": "file:/tmp/store"}) == "true"
    assert opted_in({"tracking_uri": "http://localhost:5000"}) is None
    assert opted_in({"tracking_uri": "sqlite:///runs/mlflow.db"}) is None
    monkeypatch.setenv(trackers.MLFLOW_FILE_STORE_OPT_IN, "false")  # the user's own choice is kept
    trackers.allow_local_mlflow_store({"logger": {"class_path": "MLFlowLogger", "init_args": {}}})
    assert os.environ[trackers.MLFLOW_FILE_STORE_OPT_IN] == "false"


def test_bench_names_each_run_in_the_logger_it_is_given(tmp_path: Path) -> None:
    from mtl_lightning.bench.plan import Job, RunSpec, run_logger

    job, out = Job("pcgrad", "pcgrad", ("a",), ()), tmp_path / "quick"
    default = {"save_dir": str(out / "runs"), "name": "pcgrad", "version": "seed_1"}
    assert run_logger(RunSpec(job, 1, out)) == {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": default,
    }
    preset = {p: yaml.safe_load((LOGGERS / f"{p}.yaml").read_text()) for p in ("mlflow", "wandb", "csv")}
    mlf = run_logger(RunSpec(job, 1, out, preset["mlflow"]))["init_args"]
    assert (mlf["experiment_name"], mlf["run_name"], mlf["save_dir"]) == ("quick", "pcgrad/seed_1", str(out / "mlflow"))
    assert mlf["tags"] == {"mtl_bench.run": "pcgrad", "mtl_bench.variant": "pcgrad", "mtl_bench.seed": "1"}
    server = {**preset["mlflow"], "init_args": {**preset["mlflow"]["init_args"], "tracking_uri": "http://h:5000"}}
    assert run_logger(RunSpec(job, 1, out, server))["init_args"]["save_dir"] == "runs/mlflow"  # unused with a server
    wdb = run_logger(RunSpec(job, 1, out, preset["wandb"]))["init_args"]
    assert (wdb["project"], wdb["name"], wdb["group"], wdb["offline"]) == ("quick", "pcgrad/seed_1", "pcgrad", True)
    assert run_logger(RunSpec(job, 1, out, preset["csv"]))["init_args"] == default


@pytest.mark.integration  # a benchmark suite of four short runs per tracker: ~30 s on 2 CPU cores
@pytest.mark.parametrize("preset", ["mlflow", "wandb"])
def test_bench_runs_a_suite_with_each_tracker(preset: str, tmp_path: Path) -> None:
    from mtl_lightning.bench import __main__ as bench_main

    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: tiny\nconfig: {QUICKSTART}\nseeds: [0]\nvariants:\n  equal: []\n")
    out = tmp_path / "tiny"
    tiny = [*SMALL_DATA, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    assert (
        bench_main.main([str(suite), "--out", str(out), "--logger", str(LOGGERS / f"{preset}.yaml"), "--", *tiny]) == 0
    )
    assert "| equal | 1 |" in (out / "results.md").read_text()
    runs = ["single_task/purchase", "single_task/segment", "single_task/spend", "equal"]
    if preset == "mlflow":
        client = MlflowClient(f"file:{out / 'mlflow'}")
        found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert sorted(r.info.run_name for r in found) == sorted(f"{r}/seed_0" for r in runs)
        equal = next(r for r in found if r.data.tags["mtl_bench.run"] == "equal")
        assert {"val/loss", "test/loss", "test/spend/mae"} <= set(equal.data.metrics)
    else:
        folders = sorted((out / "wandb" / "wandb").glob("offline-run-*"))
        assert len(folders) == 4  # one W&B run per bench run, not one for the whole process
        assert all("test/loss" in wandb_history_keys(f) for f in folders)
