"""Smoke tests of the balancing benchmark's operator counts and real models, and of the GPU script's dry run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """benchmarks/balancing.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("balancing_benchmark", REPO / "benchmarks" / "balancing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def tiny_args(bench: ModuleType, *extra: str):
    return bench.parse_args(["--features", "6", "--hidden", "8", "--batch-size", "8", *extra])


def tiny_side(bench: ModuleType, balancer: type, num_tasks: int, *extra: str):
    args = tiny_args(bench, *extra)
    model = bench.bench_model(num_tasks, args)
    side = bench.module_side(balancer.__name__, "loss", balancer, bench.make_batches(model, args), model, args)
    for i in range(2):  # warm-up, as the benchmark does before counting
        side.step(i)
    return side


def test_equal_weighting_counts_one_host_sync_per_step_the_finite_check(bench: ModuleType) -> None:
    from mtl_lightning.balancers import EqualWeighting

    side = tiny_side(bench, EqualWeighting, 2)
    counts = bench.count_ops(side.step, 2, 2, torch.device("cpu"))
    assert counts.ops > 0 and counts.ops == int(counts.ops)
    # check_finite's .tolist() is the one read a step makes; AdamW's reads of its CPU step counters are no syncs.
    assert counts.syncs == 1 and counts.host_reads == 1
    side.module.check_finite = False
    assert bench.count_ops(side.step, 4, 1, torch.device("cpu")).syncs == 0


def test_operator_count_grows_with_the_number_of_tasks(bench: ModuleType) -> None:
    from mtl_lightning.balancers import EqualWeighting

    small, large = (
        bench.count_ops(tiny_side(bench, EqualWeighting, t).step, 2, 1, torch.device("cpu")) for t in (2, 4)
    )
    assert large.ops > small.ops  # per-task heads, losses and masks are operators of their own


def test_the_report_has_ratios_with_quartiles_and_counts(bench: ModuleType, capsys: pytest.CaptureFixture) -> None:
    argv = ["--tasks", "2", "--methods", "PCGrad", "--repeats", "3", "--min-time", "0", "--min-steps", "1"]
    argv += ["--features", "6", "--hidden", "8", "--batch-size", "8", "--op-steps", "1", "--no-parameter-mode"]
    table = bench.main([*argv, "--markdown", "--threads", str(torch.get_num_threads())])
    row = table["PCGrad"][2]
    assert row["q1"] <= row["ratio"] <= row["q3"] and row["ops"] > table["EqualWeighting"][2]["ops"] > 0
    out = capsys.readouterr().out
    assert "| method | mode | T=2 ms | T=2 x EW | T=2 IQR |" in out and "| method | T | ops/step | syncs/step |" in out


@pytest.mark.parametrize("name", ["multimnist", "census"])
def test_the_real_models_take_a_step_from_their_experiment_configs(bench: ModuleType, name: str) -> None:
    from mtl_lightning.balancers import UPGrad

    args = bench.parse_args(["--model", name, "--batch-size", "8"])
    model = bench.bench_model(0, args)
    assert args.tasks == [2] and len(model.tasks) == 2  # the configs' two tasks, whatever --tasks says
    make = (lambda: UPGrad(mode="parameter")) if model.gradient_mode == "parameter" else UPGrad
    side = bench.module_side("UPGrad", model.gradient_mode, make, bench.make_batches(model, args), model, args)
    side.step(0)
    assert model.gradient_mode == ("parameter" if name == "census" else "representation")  # MMoE: no shared z


@pytest.mark.integration
def test_the_gpu_script_dry_run_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_issue17.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    # The parts table only: the outputs' tails quoted below it hold tables of their own.
    lines = summary.splitlines()
    start = lines.index("| part | what | exit | seconds | output |")
    table = list(itertools.takewhile(lambda line: line.startswith("| "), lines[start:]))
    rows = [line.split(" | ") for line in table[2:]]
    ran = {r[0].strip("| "): r[2] for r in rows if r[2] != "-"}
    # gpu_throughput.py exits 1 when a cell fails, and the fused one does (below).
    assert ran == {"b": "0", "c": "0", "a": "1"}, summary
    assert "skipped: CUDA only" in summary
    cells = {r["variant"]: r for r in json.loads((tmp_path / "throughput.json").read_text())}
    assert {v for v, r in cells.items() if r["status"] == "ok"} == {"foreach", "bf16_true", "wide"}
    # Lightning's mixed-precision plugin refuses clipping with an optimizer that unscales itself (fused AdamW).
    assert cells["fused"]["status"] == "failed" and "does not allow for gradient clipping" in cells["fused"]["reason"]
    assert (tmp_path / "balancing_resnet18.csv").is_file() and "ops/step" in (
        tmp_path / "balancing_resnet18.txt"
    ).read_text()
