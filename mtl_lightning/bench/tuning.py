"""The equal-budget tuned protocol: every job of a suite gets the same number of sweep trials before its seeds run.

With ``tune`` in a suite, each job (the single-task baselines included) is tuned on the validation split by an
Optuna study of ``tune.trials`` trials over ``tune.space`` (a sweep space: mtl_lightning/sweep/space.py), every trial
trained at ``tune.seed``; its best configuration is then appended to the job's arguments for the seeded runs, which
are tested as usual. Comparisons of untuned variants favour whichever variant the config's defaults happen to suit
(Xin et al., NeurIPS 2022); an equal budget for each removes that.

The objective of a baseline is its task's primary metric on the validation split; of a multi-task job, its Δm% on
the validation split against the tuned baselines' best validation values (so the baselines are tuned first). The
test split is never looked at before the seeded runs. Studies live in ``<out>/tune/<run>/`` (their trials' runs
with them) and are continued, not restarted, when the benchmark is resumed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mtl_lightning.bench.plan import Job, Plan
from mtl_lightning.bench.suite import SINGLE_TASK, SuiteError


def val_key(test_key: str) -> str:
    """The validation twin of a logged test key (``test/a/acc`` -> ``val/a/acc``)."""
    return "val/" + test_key.split("/", 1)[1]


def _objective(job: Job, plan: Plan, reference: Mapping[str, float]) -> dict[str, Any]:
    if job.variant == SINGLE_TASK:
        (task,) = job.tasks
        return {"metric": val_key(plan.primaries[task].key)}
    return {"delta_m": {val_key(plan.primaries[t].key): reference[t] for t in job.tasks}}


def tune_job(job: Job, plan: Plan, tune: Mapping[str, Any], out: Path, reference: Mapping[str, float]) -> Any:
    """Run (or continue) the study of one job; the finished study."""
    import optuna

    from mtl_lightning.sweep.runner import WorkerJob, run_worker
    from mtl_lightning.sweep.spec import build_spec
    from mtl_lightning.sweep.storage import open_storage

    logged = {val_key(p.key): p.higher_is_better for p in plan.primaries.values()}
    sampler = tune.get("sampler") or {"class_path": "optuna.samplers.TPESampler", "init_args": {"seed": 0}}
    raw = {"space": dict(tune["space"]), "objectives": [_objective(job, plan, reference)], "sampler": sampler}
    spec = build_spec(raw, list(plan.primaries), logged)
    directory = out / "tune" / job.run
    directory.mkdir(parents=True, exist_ok=True)
    storage = str(directory / "study.journal")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=job.run,
        storage=open_storage(storage),
        direction=spec.directions[0],  # type: ignore[arg-type]  # checked: minimize | maximize
        load_if_exists=True,
    )
    left = int(tune["trials"]) - len([t for t in study.trials if t.state.is_finished()])
    if left > 0:
        base = (*job.args, "--seed_everything", str(int(tune.get("seed", 0))))
        worker = WorkerJob(spec, base, directory, storage, job.run, uuid.uuid4().hex, left)
        run_worker(worker)
    return optuna.load_study(study_name=job.run, storage=open_storage(storage))


def tune_plan(plan: Plan, tune: Mapping[str, Any], out: Path, only: list[str] | None = None) -> Plan:
    """The plan with each job's best configuration appended to its arguments (baselines tuned first)."""
    from mtl_lightning.bench.resolve import parse_config
    from mtl_lightning.sweep.runner import METRICS, VALUES
    from mtl_lightning.sweep.space import as_args
    from mtl_lightning.sweep.spec import check_keys

    for job in plan.jobs:  # a key a job's config lacks fails now, with the nearest keys, not in every trial
        check_keys(parse_config(job.args, f"tuning {job.run!r}"), list(tune["space"]), f"tune.space of {job.run!r}")
    reference: dict[str, float] = {}
    order = sorted(plan.jobs, key=lambda j: j.variant != SINGLE_TASK)  # baselines first: their values are Δm%'s base
    tuned: dict[str, Job] = {}
    for job in order:
        if only and job.variant not in only and job.variant != SINGLE_TASK:
            continue
        print(f"mtl-bench: tuning {job.run} ({tune['trials']} trials)", flush=True)
        study = tune_job(job, plan, tune, out, reference)
        done = [t for t in study.trials if t.state.name == "COMPLETE"]
        if not done:
            errors = sorted({str(t.user_attrs.get("mtl_sweep.error")) for t in study.trials})
            raise SuiteError(f"tuning {job.run!r}: no trial completed; their errors: {errors} (see {out / 'tune'})")
        best = study.best_trial
        if job.variant == SINGLE_TASK:
            (task,) = job.tasks
            reference[task] = float(best.user_attrs[METRICS][val_key(plan.primaries[task].key)])
        tuned[job.run] = replace(job, args=(*job.args, *as_args(best.user_attrs[VALUES])))
    jobs = [tuned.get(job.run, job) for job in plan.jobs]
    return Plan(jobs=jobs, primaries=plan.primaries)
