"""Small, pure statistics helpers for studies: summaries over seeds and paired comparisons.

Everything here takes plain sequences (or seed -> value mappings) of floats and returns plain
dicts, so the report code and the tests can use it without any study machinery.

Conventions
-----------
* NaN values are treated as missing and dropped before anything is computed.
* Standard deviations are sample standard deviations (``ddof=1``).
* Confidence intervals are two-sided Student-t intervals for the mean.
* With one value there is no spread to estimate: ``std`` and the CI bounds are NaN, never 0,
  so a single seed can never look like a precise result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = ["summarize", "paired_test", "holm", "holm_levels", "format_p", "sign_test_interval"]

IDENTICAL = "none (identical values)"
SIGN_TEST = "sign test (zero variance of differences)"

_ZERO_TOL = 1e-12  # relative tolerance under which paired differences count as exactly equal


def _clean(values: Sequence[float]) -> np.ndarray:
    """Values as a 1-D float array with NaNs (missing values) removed."""
    arr = np.asarray(list(values), dtype=float).ravel()
    return arr[~np.isnan(arr)]


def _t_interval(mean: float, std: float, n: int, confidence: float) -> tuple[float, float]:
    """Student-t interval ``mean ± t_{(1+c)/2, n-1} · std/√n``; NaN bounds when ``n < 2``.

    Computed by hand rather than with ``scipy.stats.t.interval`` so that zero spread gives the
    degenerate interval ``(mean, mean)`` instead of NaN (scipy rejects ``scale=0``).
    """
    if n < 2:
        return math.nan, math.nan
    half = float(_st.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and a Student-t confidence interval of ``values`` (e.g. one per seed).

    Returns ``{"n", "mean", "std", "ci_low", "ci_high"}``.

    * ``n == 0``: mean, std and CI are NaN.
    * ``n == 1``: mean is the value; std and CI are NaN (spread cannot be estimated from one
      seed; we do not pretend it is 0).
    * all values equal (``n >= 2``): std is 0 and the CI is ``(mean, mean)``.
    """
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n >= 2 else math.nan
    lo, hi = _t_interval(mean, std, n, confidence)
    return {"n": n, "mean": mean, "std": std, "ci_low": lo, "ci_high": hi}


def format_p(p: float) -> str:
    """``p`` as it appears in verdicts: ``p=0.012``, ``p=0.41``, ``p<0.001`` or ``p=n/a``."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p=n/a"
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.2g}"


def _pair(a: Sequence[float] | Mapping[Any, float],
          b: Sequence[float] | Mapping[Any, float]) -> tuple[np.ndarray, np.ndarray]:
    """Align ``a`` and ``b`` by seed; drop pairs where either side is missing (NaN).

    Mappings are paired on their common keys (seeds), in sorted key order; sequences must have
    equal length and are paired by position.
    """
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("paired_test: pass two mappings (seed -> value) or two sequences")
    if isinstance(a, Mapping):
        keys = sorted(set(a) & set(b), key=lambda k: (str(type(k)), k))
        xa = np.array([a[k] for k in keys], dtype=float)
        xb = np.array([b[k] for k in keys], dtype=float)
    else:
        xa = np.asarray(list(a), dtype=float).ravel()
        xb = np.asarray(list(b), dtype=float).ravel()
        if xa.shape != xb.shape:
            raise ValueError(f"paired_test: sequences differ in length ({xa.size} vs {xb.size})")
    keep = ~(np.isnan(xa) | np.isnan(xb))
    return xa[keep], xb[keep]


def paired_test(a: Sequence[float] | Mapping[Any, float],
                b: Sequence[float] | Mapping[Any, float],
                alpha: float = 0.05,
                name_a: str = "A",
                name_b: str = "B") -> dict[str, Any]:
    """Compare ``a`` with ``b`` paired by seed (``a[i]`` and ``b[i]`` share a seed).

    Returns ``{"n", "mean_diff", "ci_low", "ci_high", "p_value", "test", "significant",
    "verdict"}`` where the difference is ``a - b`` and the CI is a ``1 - alpha`` Student-t
    interval of the per-seed differences.

    * ``n >= 2``: two-sided paired t-test (``scipy.stats.ttest_rel``). The verdict reads
      ``"A > B (p=0.012)"`` / ``"A < B (p=0.003)"`` when ``p < alpha``, else
      ``"within noise (p=0.41)"``.
    * ``n < 2``: no test; ``p_value`` is NaN, ``significant`` False and the verdict says
      ``"not testable: 1 seed"`` (or ``0 seeds``).
    * zero variance of the differences (up to float round-off): if ``a`` equals ``b`` on every
      seed, the verdict is ``"identical"`` (p = 1). If every seed differs by the same non-zero
      amount the t statistic is infinite, so we fall back to an exact two-sided sign test
      (``scipy.stats.binomtest``), which with few seeds honestly stays non-significant
      (3 seeds: p = 0.25), with the interval that agrees with it (:func:`sign_test_interval`).

    ``a`` and ``b`` may also be mappings ``seed -> value``; they are then paired on common seeds.
    """
    xa, xb = _pair(a, b)
    d = xa - xb
    n = int(d.size)
    out: dict[str, Any] = {"n": n, "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                           "p_value": math.nan, "test": "none", "significant": False}
    if n == 0:
        out["verdict"] = "not testable: 0 seeds"
        return out
    s = summarize(d, confidence=1.0 - alpha)
    out.update(mean_diff=s["mean"], ci_low=s["ci_low"], ci_high=s["ci_high"])
    if n < 2:
        out["verdict"] = "not testable: 1 seed"
        return out

    # Differences below float round-off of the values count as zero (0.1 + 0.2 vs 0.3).
    tol = _ZERO_TOL * max(float(np.max(np.abs(np.concatenate([xa, xb])))), 1e-300)
    if float(np.ptp(d)) <= tol:
        if float(np.max(np.abs(d))) <= tol:
            out.update(p_value=1.0, test=IDENTICAL, verdict="identical")
            return out
        k = int((d > 0).sum())
        p = float(_st.binomtest(k, n, 0.5).pvalue)
        lo, hi = sign_test_interval(out["mean_diff"], n, alpha)
        out.update(p_value=p, test=SIGN_TEST, ci_low=lo, ci_high=hi)
    else:
        p = float(_st.ttest_rel(xa, xb).pvalue)
        out.update(p_value=p, test="paired t-test")

    significant = bool(p < alpha)
    out["significant"] = significant
    if significant:
        rel = ">" if out["mean_diff"] > 0 else "<"
        out["verdict"] = f"{name_a} {rel} {name_b} ({format_p(p)})"
    else:
        out["verdict"] = f"within noise ({format_p(p)})"
    return out


def sign_test_interval(value: float, n: int, alpha: float) -> tuple[float, float]:
    """The 1 − alpha interval of the median of `n` differences that all equal `value`, by order
    statistics (the interval the sign test inverts): [value, value] covers with probability
    1 − 2·0.5^n, so it is the interval where that reaches 1 − alpha, and the whole line where it
    does not (3 seeds: 75% at most). It excludes 0 exactly when the sign test's p = 2·0.5^n < alpha."""
    return (value, value) if 2 * 0.5 ** n < alpha else (-math.inf, math.inf)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given; NaNs stay NaN, not counted).

    Use it when a report makes many comparisons at once: an adjusted ``p < alpha`` controls the
    family-wise error rate at ``alpha``.
    """
    p = np.asarray(list(p_values), dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def holm_levels(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """The level Holm's procedure holds each test to: ``alpha / k`` for the factor ``k`` by which its
    Holm-adjusted p exceeds its own (Bonferroni's ``alpha / m`` for the smallest p, up to ``alpha`` for
    the last of a family all rejected), so that ``p < level`` exactly when the Holm-adjusted p is below
    ``alpha``. An interval at confidence ``1 − level`` then excludes 0 exactly when Holm's verdict
    finds a difference (the report prints those). NaN where p is NaN."""
    p = np.asarray(list(p_values), dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0  # the uncapped Holm value: a capped one (1) would hide the factor
    for rank, i in enumerate(order):
        step = len(order) - rank
        running = max(running, step * p[i])
        out[i] = alpha * p[i] / running if running > 0 else alpha / step
    return out.tolist()
