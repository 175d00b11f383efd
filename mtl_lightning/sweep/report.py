"""A study's outputs in its folder: ``trials.csv``, ``pareto.csv``, ``compare.csv``, ``pareto.png`` and the figure in TensorBoard.

The figure shows every complete trial (grey) and the Pareto set (the best trial for one objective), each objective
against each other one (one panel per pair), with the compare runs (e.g. PCGrad, UPGrad) as named points: where a
gradient method lands against the front that static weights trace.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_lightning.sweep.runner import DIR, ERROR, VALUES
from mtl_lightning.sweep.spec import Objective

TRIALS_CSV = "trials.csv"
PARETO_CSV = "pareto.csv"
FIGURE = "pareto.png"
COMPARE_CSV = "compare.csv"  # the compare runs' objective values
TENSORBOARD = "summary"  # the sweep's own TensorBoard folder, beside the trials' (tensorboard --logdir DIR)


def _flat_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config values as CSV columns: a weights dict becomes one column per task (``key[task]``)."""
    row: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            row.update({f"{key}[{k}]": v for k, v in value.items()})
        else:
            row[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    return row


def trial_rows(trials: Sequence[Any], objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """One row per trial: number, state, objective values, the config values, wall time, folder and error."""
    rows = []
    for t in trials:
        values = t.values if t.values is not None else [None] * len(objectives)
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        row.update({o.name: v for o, v in zip(objectives, values, strict=True)})
        row.update(_flat_values(t.user_attrs.get(VALUES, {})))
        row["wall_time_s"] = t.user_attrs.get("mtl_sweep.wall_time_s")
        row["dir"] = t.user_attrs.get(DIR)
        row["error"] = t.user_attrs.get(ERROR)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["number"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_trials(study: Any) -> list[Any]:
    """The Pareto set (several objectives) or the best trial (one); empty before a trial completes."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if len(study.directions) > 1 else [study.best_trial]


def figure(study: Any, objectives: Sequence[Objective], compare: Mapping[str, Mapping[str, float]]) -> Any:
    """The matplotlib figure described in the module docstring (objective history for a single objective)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed; the file and TensorBoard are the outputs
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = {t.number for t in best_trials(study)}
    pairs = list(itertools.combinations(range(len(objectives)), 2)) or [(-1, 0)]
    cols = min(len(pairs), 3)
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4 * rows), squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs, strict=False):

        def x_of(t: Any, i: int = i) -> float:
            return float(t.number) if i < 0 else float(t.values[i])

        others = [t for t in done if t.number not in best]
        front = sorted((t for t in done if t.number in best), key=x_of)
        ax.scatter([x_of(t) for t in others], [t.values[j] for t in others], c="0.7", s=16, label="trials")
        # A front of two objectives is a curve; a panel of more is a projection, where a line would mislead.
        style = "o-" if len(objectives) <= 2 else "o"
        ax.plot([x_of(t) for t in front], [t.values[j] for t in front], style, c="C0", ms=5, label="Pareto set")
        for k, (name, values) in enumerate(compare.items()):
            if i >= 0 and all(o.name in values for o in objectives):
                xv, yv = values[objectives[i].name], values[objectives[j].name]
                ax.scatter([xv], [yv], marker="*", s=140, c=f"C{k + 1}", label=name, zorder=3)
        ax.set_xlabel("trial" if i < 0 else _axis_label(objectives[i]))
        ax.set_ylabel(_axis_label(objectives[j]))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{study.study_name}: {len(done)} complete trials, {len(best)} on the front")
    fig.tight_layout()
    return fig


def _axis_label(objective: Objective) -> str:
    return f"{objective.name} ({'↑' if objective.direction == 'maximize' else '↓'})"


def write_report(
    study: Any, directory: Path, objectives: Sequence[Objective], compare: Mapping[str, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """Write the outputs of the module docstring; the Pareto rows."""
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    write_csv(directory / TRIALS_CSV, trial_rows(trials, objectives))
    pareto = trial_rows(best_trials(study), objectives)
    write_csv(directory / PARETO_CSV, pareto)
    if compare:
        write_csv(directory / COMPARE_CSV, [{"run": name, **values} for name, values in compare.items()])
    fig = figure(study, objectives, compare)
    fig.savefig(directory / FIGURE, dpi=110)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory / TENSORBOARD)) as writer:
        writer.add_figure("sweep/pareto", fig, global_step=len(trials), close=False)
    plt.close(fig)
    return pareto
