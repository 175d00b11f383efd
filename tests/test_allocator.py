"""keep_freed_memory: a process that allocates and frees the same large buffers stops page-faulting on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtl_lightning.allocator import ENV, _glibc, keep_freed_memory

GLIBC = pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")

# Minor page faults per training step of UPGrad on the balancing benchmark's MLP (T = 10, batch 256): its per-task
# gradients on the representation and their stack are new large buffers every step. ``plain`` holds glibc's default
# mmap threshold fixed (left alone, glibc raises it after the first large free in some runs and not in others).
PROBE = """
import resource, sys
sys.path.insert(0, "benchmarks")
import torch
from mtl_lightning.allocator import keep_freed_memory
from mtl_lightning.allocator import _glibc
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    # glibc's default threshold, held fixed: its dynamic raise after a free is what makes unset runs vary
    _glibc().mallopt(-3, 128 * 1024)
import balancing
from mtl_lightning.balancers import UPGrad
args = balancing.parse_args(["--tasks", "10", "--threads", "1"])
args.device, args.model = "cpu", "mlp"
model = balancing.bench_model(10, args)
side = balancing.module_side("UPGrad", "representation", UPGrad, balancing.make_batches(model, args), model, args)
for i in range(5):
    side.step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    side.step(i)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> float:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    return float(out.strip().splitlines()[-1])


@GLIBC
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    plain, kept = faults_per_step("plain"), faults_per_step("keep")
    # plain: about a thousand faults a step (freed pages go back to the OS); kept: the same pages are reused
    assert plain > 500, plain
    assert kept < plain / 20, (kept, plain)


@GLIBC
@pytest.mark.parametrize("value", ["0", "false", "no"])
def test_the_environment_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert keep_freed_memory() is False


@GLIBC
def test_it_is_done_by_default():
    assert keep_freed_memory() is True
