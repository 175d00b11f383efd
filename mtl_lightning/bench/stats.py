"""Intervals and tests for a benchmark's per-seed values: how sure a Δm% difference is.

Welch's t-test (unequal variances), not a bootstrap: with the 3 to 5 seeds a benchmark affords, a bootstrap's
resamples take a handful of distinct values and its p-values are coarse, while Welch's test is exact under normal
per-seed noise and does not assume the two variants vary alike. Both come from SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The t-interval of the mean at ``level`` (Student's t with n - 1 degrees of freedom); None below 2 values."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean; None below 2 values a side.

    Two samples without spread (every seed equal on both sides) give 1.0 when their means agree, 0.0 otherwise.
    """
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
