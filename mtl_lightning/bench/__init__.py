"""Benchmarks of multi-task variants against single-task baselines over seeds, summarised by Δm%.

``python -m mtl_lightning.bench configs/bench/quickstart.yaml``: a suite file (:mod:`~mtl_lightning.bench.suite`)
names the base config, the tasks and their primary metrics, how the single-task baselines are made, the multi-task
variants and the seeds; every run trains and tests through the ``mtl`` CLI (:mod:`~mtl_lightning.bench.runner`), each
run's test metrics go to a CSV (:mod:`~mtl_lightning.bench.results`) and the summary table with Δm% to Markdown
(:mod:`~mtl_lightning.bench.delta`).
"""

from mtl_lightning.bench.delta import delta_m, summarise
from mtl_lightning.bench.plan import Job, Plan, RunSpec, make_plan
from mtl_lightning.bench.suite import SINGLE_TASK, Suite, SuiteError, load_suite

__all__ = [
    "SINGLE_TASK",
    "Job",
    "Plan",
    "RunSpec",
    "Suite",
    "SuiteError",
    "delta_m",
    "load_suite",
    "make_plan",
    "summarise",
]
