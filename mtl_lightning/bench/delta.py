"""Δm%: the mean relative change of a multi-task model against single-task models, and the benchmark's summary table.

    Δm% = 100/T · Σ_t (-1)^{h_t} (M_mt,t - M_st,t) / |M_st,t|,    h_t = 1 if higher is better for M_t, else 0

So **lower Δm% is better, and a negative Δm% means better than single-task**: the multi-task "performance drop"
of the Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023) papers, whose tables this one can
be read next to. Maninis et al. (CVPR 2019) and Vandenhende et al. (TPAMI 2021) report the same quantity with the
opposite sign (higher is better there: their Δm% = -ours).
The denominator is |M_st,t| rather than M_st,t so that a negative baseline (an R² below 0) does not flip the
direction of the change; for the usual positive metrics the two agree.

Over seeds: the baseline of task t is the mean of its single-task runs over the seeds, M_st,t; Δm% is computed for
each seed of a variant against those means, then reported as mean ± sample standard deviation over the seeds. The
single-task row's own Δm% (mean 0) shows how much the baselines vary from seed to seed.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mtl_lightning.bench.resolve import Primary
from mtl_lightning.bench.results import Row
from mtl_lightning.bench.suite import SINGLE_TASK


def delta_m(multi: Mapping[str, float], single: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Δm% of one multi-task result against the single-task results (negative: better); see the module docstring."""
    tasks = list(single)
    if not tasks or set(multi) != set(tasks) or set(higher_is_better) != set(tasks):
        raise ValueError(
            f"Δm% needs the same tasks everywhere: multi-task {sorted(multi)}, single-task {sorted(single)}, "
            f"directions {sorted(higher_is_better)}"
        )
    total = 0.0
    for task in tasks:
        if single[task] == 0:
            raise ValueError(f"Δm% is undefined: the single-task value of {task!r} is 0 (a relative change of it)")
        sign = -1.0 if higher_is_better[task] else 1.0
        total += sign * (multi[task] - single[task]) / abs(single[task])
    return 100.0 * total / len(tasks)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (NaN for one value) and count."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = list(values)
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))

    def text(self, digits: int, sign: bool = False) -> str:
        mean = f"{self.mean:+.{digits}f}" if sign else f"{self.mean:.{digits}f}"
        return mean if math.isnan(self.std) else f"{mean} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Line:
    """One row of the summary: a variant's per-task metrics, Δm% and time per seed (None where nothing ran)."""

    variant: str
    seeds: int
    metrics: dict[str, Stat | None]
    delta: Stat | None
    time_s: Stat | None
    deltas: tuple[float, ...] = ()  # Δm% of each seed, for the interval and the tests


def summarise(rows: Iterable[Row], primaries: Mapping[str, Primary], variants: Sequence[str]) -> list[Line]:
    """The summary lines, single-task first, from the raw rows; ``variants``: the multi-task variants in order."""
    tasks = list(primaries)
    keys = {p.key for p in primaries.values()}
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))  # variant, task, seed
    times: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))  # variant, seed, run
    for row in rows:
        if row.task in primaries and row.metric == primaries[row.task].key and row.metric in keys:
            values[row.variant][row.task][row.seed] = row.value
            times[row.variant][row.seed][row.run] = row.wall_time_s
    single = {t: statistics.fmean(values[SINGLE_TASK][t].values()) for t in tasks if values[SINGLE_TASK][t]}
    directions = {t: primaries[t].higher_is_better for t in tasks}
    lines = []
    for variant in [SINGLE_TASK, *variants]:
        per_task = values.get(variant, {})
        seeds = sorted(set.intersection(*(set(per_task.get(t, {})) for t in tasks)))  # seeds with every task
        metrics = {t: Stat.of(list(per_task[t].values())) if per_task.get(t) else None for t in tasks}
        deltas: list[float] = []
        if seeds and len(single) == len(tasks):
            deltas = [delta_m({t: per_task[t][s] for t in tasks}, single, directions) for s in seeds]
        # A baseline seed costs its T runs together; a variant seed, its one run.
        seed_times = [sum(times[variant][s].values()) for s in seeds]
        time_s = Stat.of(seed_times) if seed_times else None
        lines.append(Line(variant, len(seeds), metrics, Stat.of(deltas) if deltas else None, time_s, tuple(deltas)))
    return lines


def reference_variant(variants: Sequence[str]) -> str | None:
    """The equal-weighting variant the others are tested against: one named ``equal``, ``ew`` or ``equal_weighting``."""
    return next((v for v in variants if v.lower() in ("equal", "ew", "equal_weighting")), None)


def markdown(lines: Sequence[Line], primaries: Mapping[str, Primary]) -> str:
    """The summary as a Markdown table (also what the command prints).

    Beside each Δm% (mean ± sample std over seeds): its 95 % t-interval, and the p-values of Welch's t-test of its
    per-seed Δm% against equal weighting's (:func:`reference_variant`) and against the single-task row's
    (:mod:`mtl_lightning.bench.stats`). "—" where a side has fewer than two seeds.
    """
    from mtl_lightning.bench.stats import mean_interval, welch_p

    by_name = {line.variant: line for line in lines}
    reference = by_name.get(reference_variant([line.variant for line in lines]) or "")
    header = ["variant", "seeds", *(p.label for p in primaries.values()), "Δm% ↓", "Δm% 95% CI"]
    header += ["p vs EW", "p vs STL", "time/seed (s)"]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]

    def p_text(line: Line, other: Line | None) -> str:
        p = welch_p(line.deltas, other.deltas) if other is not None and other is not line else None
        return "—" if p is None else f"{p:.3f}"

    for line in lines:
        cells = [line.variant, str(line.seeds)]
        cells += [m.text(4) if m else "—" for m in line.metrics.values()]
        cells.append(line.delta.text(2, sign=True) if line.delta else "—")
        interval = mean_interval(line.deltas)
        cells.append(f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else "—")
        cells += [p_text(line, reference), p_text(line, by_name.get(SINGLE_TASK))]
        cells.append(f"{line.time_s.mean:.1f}" if line.time_s else "—")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
