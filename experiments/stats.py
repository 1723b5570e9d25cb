"""Statistics over seeds: the mean and a 95% Student-t interval, and merging per-seed summaries.

A figure run at several seeds reports, for every measured number, the mean over the seeds and the
interval mean ± t_{0.975, n-1} · s / √n (s: the sample standard deviation, n: the seeds that produced the
number). The t quantile is computed here (scipy is not a dependency): the Student-t CDF through the
regularized incomplete beta function (a continued fraction), inverted by bisection.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

INTERVAL = "95% t"  # what the summaries' `<key>_ci95` intervals are (the summary's "interval" value)
CI_SUFFIX = "_ci95"


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (t_quantile(0.975, 2) = 4.3027)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # bracket: the df=1 tail needs hi in the hundreds for p = 0.999
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); needs two values."""
    if len(xs) < 2:
        raise ValueError("a sample standard deviation needs at least two values")
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_interval(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(low, high) of the Student-t interval mean ± t_{(1+level)/2, n-1} · s/√n; needs n >= 2."""
    n = len(xs)
    if n < 2:
        raise ValueError(f"an interval needs at least two values, got {n}")
    m = mean(xs)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std(xs) / math.sqrt(n)
    return m - half, m + half


# --------------------------------------------------------------------------------------------- summaries


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge(summaries: Sequence[Any]) -> Any:
    """One summary from the per-seed summaries of a figure (same structure; seed order).

    Dicts merge key by key and lists of equal length element by element. A number becomes the mean over
    the seeds that have a finite one (None where none has); when they differ, `<key>_ci95` = {"low", "high"} beside it
    (the 95% t interval over those seeds; a number equal in every seed, such as a knob or a fixed run
    length, gets none). A bool is True only if it is in every seed; any other value, or lists of different
    lengths, are kept when all seeds agree and become the list of per-seed values otherwise. One summary
    merges to itself."""
    if len(summaries) == 1:
        return summaries[0]
    merged, _ = _merge(list(summaries))
    return merged


def _merge(vals: list[Any]) -> tuple[Any, dict | None]:
    """(merged value, its interval or None)."""
    if all(isinstance(v, dict) for v in vals):
        out: dict = {}
        for key in vals[0]:
            if not all(key in v for v in vals):
                out[key] = [v.get(key) for v in vals]
                continue
            out[key], ci = _merge([v[key] for v in vals])
            if ci is not None:
                out[f"{key}{CI_SUFFIX}"] = ci
        return out, None
    if all(isinstance(v, list) for v in vals) and len({len(v) for v in vals}) == 1:
        return [_merge(list(items))[0] for items in zip(*vals)], None
    if all(isinstance(v, bool) for v in vals):
        return all(vals), None
    if all(v is None or _is_number(v) for v in vals):
        xs = [float(v) for v in vals if v is not None and math.isfinite(v)]  # NaN / inf: no value, like None
        if not xs:
            return None, None
        if len(set(xs)) == 1:  # a knob or a length every seed shares: kept exactly (an int stays an int)
            return next(v for v in vals if v is not None and math.isfinite(v)), None
        if len(xs) < 2:
            return xs[0], None
        low, high = t_interval(xs)
        return mean(xs), {"low": low, "high": high}
    return (vals[0] if all(v == vals[0] for v in vals) else list(vals)), None


def error(row: dict, key: str) -> tuple[float, float]:
    """(below, above) error-bar lengths of `row[key]` from its interval `row[key_ci95]` ((0, 0) without one)."""
    value, ci = row.get(key), row.get(key + CI_SUFFIX)
    if value is None or not ci:
        return 0.0, 0.0
    return max(0.0, value - ci["low"]), max(0.0, ci["high"] - value)
