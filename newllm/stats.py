"""The statistics of a search's comparisons: a 95% interval of a mean, and of the mean paired
difference between two arms measured at the same configurations and seeds (an ablation: a
New-LLM trial against its sibling without Phase 1, or without dist-reg).

Which interval, and why: **Student's t-interval** of the mean, over paired differences for the
ablations. An ablation search gives few pairs (3 to 9, say: a few configurations, a few seeds
each) and the relative changes in val perplexity between a trial and its sibling come out roughly
symmetric; the t-interval is exact for normal differences and robust to mild departures from it
at such sizes, while a bootstrap interval needs more pairs than that to cover its nominal 95%
(with 3 pairs it has at most 10 distinct resamples of the mean). Pairing removes what the two
arms share (the configuration, the seed's initialisation and data order) from the spread.

Pure functions of numbers; the t quantile is computed here (``t_quantile``, from the regularised
incomplete beta function), so no SciPy is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided ``level`` confidence interval over ``n`` values (``low`` and
    ``high`` NaN with fewer than 2 values: no spread to estimate)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0."""
        return self.low > 0 or self.high < 0


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - front * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on ``t_cdf``,
    to float precision)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of ``values`` and its Student t-interval: mean +- t_{(1+level)/2, n-1} * s / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def relative_change(value: float, reference: float) -> float:
    """How much ``value`` differs from ``reference``, in percent of ``reference``."""
    return 100.0 * (value / reference - 1.0)


def paired_interval(values: Sequence[float], references: Sequence[float], *, relative: bool = True,
                    level: float = LEVEL) -> Interval:
    """The mean paired difference of ``values`` from ``references`` (pair i: the same
    configuration and seed in both arms) and its t-interval: over the relative changes in percent
    (``relative_change``), or the absolute differences ``value - reference``."""
    if len(values) != len(references):
        raise ValueError(f"paired_interval needs as many values as references, got {len(values)} and "
                         f"{len(references)}")
    differences = [relative_change(v, r) if relative else v - r for v, r in zip(values, references)]
    return mean_interval(differences, level)
