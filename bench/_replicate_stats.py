"""Statistics of bench/replicate.py: paired t intervals and tests, Holm's correction, Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Paired:
    """Mean of paired differences over seeds, its 95% t interval, the two-sided paired t-test
    p-value (raw and Holm-corrected), and how many seeds the difference was positive in."""

    mean: float
    low: float
    high: float
    p: float
    n: int
    wins: int
    p_holm: float = math.nan


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """a − b over paired seeds. With n < 2 or zero spread the interval and p are degenerate
    (NaN p when every difference is equal, as scipy reports)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths; got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    wins = sum(x > 0 for x in d)
    if n < 2:
        return Paired(mean, math.nan, math.nan, math.nan, n, wins)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else (1.0 if mean == 0 else 0.0)
    return Paired(mean, mean - half, mean + half, p, n, wins)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order; NaN stays NaN."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def mean_ci(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval over seeds (NaN half-width for one seed)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
