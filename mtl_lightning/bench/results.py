"""The raw results CSV: one row per (run, seed, task, metric), appended as each run ends so a benchmark can resume."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mtl_lightning.bench.plan import RunSpec
from mtl_lightning.bench.runner import RunResult
from mtl_lightning.bench.suite import SuiteError


@dataclass(frozen=True)
class Row:
    """One test value of one run. ``metric`` is the logged key (``test/<task>/<name>``)."""

    variant: str
    run: str
    seed: int
    task: str
    metric: str
    value: float
    wall_time_s: float
    checkpoint: str


COLUMNS = [f.name for f in fields(Row)]


def rows_of(spec: RunSpec, result: RunResult) -> list[Row]:
    """Every test value the run logged for the tasks it stands for (a baseline: its own task only)."""
    rows = []
    for task in spec.job.tasks:
        prefix = f"test/{task}/"
        for key in sorted(k for k in result.metrics if k.startswith(prefix)):
            rows.append(
                Row(
                    spec.job.variant,
                    spec.job.run,
                    spec.seed,
                    task,
                    key,
                    result.metrics[key],
                    round(result.wall_time_s, 3),
                    result.checkpoint,
                )
            )
    return rows


def read_rows(path: Path) -> list[Row]:
    """The rows of a results CSV (none when the file does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise SuiteError(
                f"{path} is not a results file of this tool: its columns are {reader.fieldnames}, expected "
                f"{COLUMNS}; choose another --out folder"
            )
        return [
            Row(
                r["variant"],
                r["run"],
                int(r["seed"]),
                r["task"],
                r["metric"],
                float(r["value"]),
                float(r["wall_time_s"]),
                r["checkpoint"],
            )
            for r in reader
        ]


def append_rows(path: Path, rows: list[Row]) -> None:
    """Append rows (with the header when the file is new); one write per run, so a crash loses at most that run."""
    new = not path.is_file() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def done_runs(rows: list[Row]) -> set[tuple[str, int]]:
    """The (run, seed) pairs the CSV already holds."""
    return {(r.run, r.seed) for r in rows}
