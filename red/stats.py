"""Statistics for comparing training methods over seeds: Student-t 95% intervals and paired differences.

Pure functions on plain lists of floats (NaN / None values are dropped and not counted).
"""

from __future__ import annotations

import math

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)


def t975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 30, else the Cornish-Fisher expansion around z = 1.95996 (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def _clean(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and not math.isnan(float(x))]


def mean_ci95(xs) -> dict:
    """{"mean", "ci95": [lo, hi], "n"}: mean ± t_{0.975, n-1} · s / sqrt(n) with the sample std s (ddof 1).

    n = 1: ci95 is [nan, nan] (no spread can be estimated from one value); n = 0: everything nan."""
    v = _clean(xs)
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    m = sum(v) / n
    if n == 1:
        return {"mean": m, "ci95": [float("nan"), float("nan")], "n": 1}
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = t975(n - 1) * s / math.sqrt(n)
    return {"mean": m, "ci95": [m - h, m + h], "n": n}


def paired_diff(a: dict, b: dict) -> dict:
    """Paired difference a - b over the keys (seeds) both have a value for:
    {"diff_mean", "ci95": [lo, hi], "n"} with the Student-t interval of the per-seed differences."""
    keys = [k for k in a if k in b and _clean([a[k]]) and _clean([b[k]])]
    d = mean_ci95([float(a[k]) - float(b[k]) for k in sorted(keys)])
    return {"diff_mean": d["mean"], "ci95": d["ci95"], "n": d["n"]}
