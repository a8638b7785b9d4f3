"""Comparing two arms of a study on every dev example of every seed, and the power to do so.

Two arms (e.g. FFT and LoRA) trained with the same seeds are evaluated on the same dev examples, so
their difference has two sources of noise: *training* noise (another seed gives another model) and
*example* noise (another dev set of the same size gives another score). A test over seeds alone
(one number per seed) ignores the second; a test over examples alone ignores the first. Here both
count, as random effects of a crossed seed x example design (docs/statistics.md has the derivation,
assumptions and a worked example):

    D[s, i] = δ + u_s + v_i + w_si      per-example difference A − B for seed s, example i

    u: seed (training noise of the difference), v: example (A and B differ more on some examples),
    w: residual. Var(mean D) = σu²/S + σv²/n + σw²/(S·n), estimated from the two-way ANOVA mean
    squares (components below 0 are set to 0), with Satterthwaite degrees of freedom; t-test and CI.

Corpus metrics that are not means of per-example values (chrF, macro-F1, perplexity) enter through
their leave-one-out (jackknife) pseudo-values, which average to the metric and carry each example's
influence on it; the estimate itself is the mean over seeds of the real metric differences.

With one seed there is no training noise to estimate: the test is per example only (exact McNemar
for accuracy-like 0/1 metrics, a paired bootstrap otherwise) and says it ignores training noise.
Runs without per-example statistics fall back to a paired t-test over seeds (postlab.report.stats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

from ..metrics import MetricSpec, PerExample
from .stats import format_p, paired_test

CROSSED = "seed x example (crossed random effects)"
MCNEMAR = "exact McNemar, 1 seed (ignores training noise)"
BOOTSTRAP = "paired bootstrap over examples, 1 seed (ignores training noise)"


POOL_ALPHA = 0.25  # a seed or example term whose F-test has p >= this is pooled into the residual


@dataclass
class Components:
    """Variance components of a per-example difference: seed, example, residual (metric units²)."""

    seed: float
    example: float
    residual: float
    n_seeds: int = 0  # how many seeds and examples they were estimated from (0: a stated default)
    n_examples: int = 0

    def variance_of_mean(self, seeds: int, examples: int) -> float:
        return self.seed / seeds + self.example / examples + self.residual / (seeds * examples)


def mean_squares(D: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-way ANOVA of per-example differences D[..., S, n]: grand mean and the seed, example and
    residual mean squares (any leading dimensions are independent data sets)."""
    S, n = D.shape[-2:]
    m = D.mean((-2, -1))
    row, col = D.mean(-1), D.mean(-2)
    ms_s = n * ((row - m[..., None]) ** 2).sum(-1) / (S - 1)
    ms_e = S * ((col - m[..., None]) ** 2).sum(-1) / (n - 1)
    resid = D - row[..., :, None] - col[..., None, :] + m[..., None, None]
    ms_r = (resid ** 2).sum((-2, -1)) / ((S - 1) * (n - 1))
    return m, ms_s, ms_e, ms_r


def crossed_from_mean_squares(mean, ms_s, ms_e, ms_r, S: int, n: int, alpha: float = 0.05) -> dict:
    """The crossed test from its sufficient statistics (arrays broadcast; scalars give floats).

    1. A seed or example term whose F-test against the residual has p >= POOL_ALPHA is taken to
       be 0 and its sum of squares pooled into the residual's.
    2. Var(mean) = Σ c·MS / (S·n) over the kept terms (c = +1 for seed and example, 1 − kept for
       the residual), with Satterthwaite degrees of freedom; t-test of the mean.
    3. The result is also held to the paired t-test of the per-seed mean differences (df S − 1,
       variance MS_s / (S·n)), exact for these dev examples: p is the larger of the two p-values and
       the interval the wider one. Where training noise dominates, Satterthwaite's df from 3 seeds
       is too optimistic, and this keeps the false-positive rate at alpha (docs/statistics.md).
    """
    mean, ms_s, ms_e, ms_r = (np.asarray(x, dtype=float) for x in (mean, ms_s, ms_e, ms_r))
    df_s, df_e, df_r = S - 1, n - 1, (S - 1) * (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep_s = np.where(ms_r > 0, st.f.sf(ms_s / ms_r, df_s, df_r) < POOL_ALPHA, ms_s > 0)
        keep_e = np.where(ms_r > 0, st.f.sf(ms_e / ms_r, df_e, df_r) < POOL_ALPHA, ms_e > 0)
        pooled_df = df_r + np.where(keep_s, 0, df_s) + np.where(keep_e, 0, df_e)
        pooled = (ms_r * df_r + np.where(keep_s, 0, ms_s * df_s) + np.where(keep_e, 0, ms_e * df_e)) / pooled_df
        c_r = 1 - keep_s.astype(float) - keep_e.astype(float)
        terms = [(ms_s, df_s, keep_s.astype(float)), (ms_e, df_e, keep_e.astype(float)), (pooled, pooled_df, c_r)]
        var = sum(c * ms for ms, _, c in terms) / (S * n)
        fallback = var <= 0  # (both kept, residual above them: cannot happen after pooling; kept for safety)
        var = np.where(fallback, pooled / (S * n), var)
        den = sum((c * ms / (S * n)) ** 2 / d for ms, d, c in terms)
        df = np.where(fallback, pooled_df, np.where(den > 0, var ** 2 / den, np.inf))
        se = np.sqrt(var)
        p_crossed = np.where(se > 0, 2 * st.t.sf(np.abs(mean) / se, df), np.where(mean == 0, 1.0, 0.0))
        se_seed = np.sqrt(ms_s / (S * n))
        p_seed = np.where(se_seed > 0, 2 * st.t.sf(np.abs(mean) / se_seed, df_s), np.where(mean == 0, 1.0, 0.0))
    half = np.maximum(st.t.ppf(1 - alpha / 2, df) * se, st.t.ppf(1 - alpha / 2, df_s) * se_seed)
    half90 = np.maximum(st.t.ppf(1 - alpha, df) * se, st.t.ppf(1 - alpha, df_s) * se_seed)
    out = {"mean_diff": mean, "se": se, "df": df, "p_value": np.maximum(p_crossed, p_seed),
           "p_crossed": p_crossed, "p_seeds": p_seed, "ci_low": mean - half, "ci_high": mean + half,
           "equivalence_bound": np.abs(mean) + half90,
           "comp_seed": np.maximum(0.0, (ms_s - ms_r) / n), "comp_example": np.maximum(0.0, (ms_e - ms_r) / S),
           "comp_residual": ms_r}
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}


def crossed_test(D: np.ndarray, mean: float | None = None, alpha: float = 0.05) -> dict:
    """The crossed seed x example test of per-example differences D[S, n] (S, n >= 2); `mean`
    (default: the mean of D) is the estimate tested. See crossed_from_mean_squares."""
    D = np.asarray(D, dtype=float)
    m, ms_s, ms_e, ms_r = mean_squares(D)
    out = crossed_from_mean_squares(m if mean is None else mean, ms_s, ms_e, ms_r, *D.shape, alpha=alpha)
    out["test"] = CROSSED
    return out


def pseudo_values(stats: np.ndarray, spec: MetricSpec) -> np.ndarray:
    """Jackknife pseudo-values n·f(Σ) − (n−1)·f(Σ − s_i) of a sum metric, one per example."""
    n = stats.shape[0]
    total = stats.sum(0)
    full = spec.value(total)
    loo = spec.value(total[None, :] - stats)
    return n * full - (n - 1) * loo


def _is_binary_ratio(stats: np.ndarray, spec: MetricSpec) -> bool:
    return (spec.aggregate == "ratio" and stats.shape[1] == 2 and bool(np.all(stats[:, 1] == 1))
            and bool(np.all((stats[:, 0] == 0) | (stats[:, 0] == 1))))


def _verdict(out: dict, name_a: str, name_b: str, alpha: float) -> dict:
    p = out["p_value"]
    out["significant"] = bool(p < alpha) if not math.isnan(p) else False
    if out["significant"]:
        out["verdict"] = f"{name_a} {'>' if out['mean_diff'] > 0 else '<'} {name_b} ({format_p(p)})"
    elif math.isnan(p):
        out.setdefault("verdict", "not testable")
    else:
        bound = out.get("equivalence_bound", math.nan)
        out["verdict"] = (f"no difference larger than {bound:.3g} ({format_p(p)})" if math.isfinite(bound)
                          else f"within noise ({format_p(p)})")
    return out


def _interval(mean: float, se: float, df: float, alpha: float) -> dict:
    """CI at 1 − alpha and the equivalence bound: the largest |effect| not ruled out by two one-sided
    tests at alpha, i.e. the far end of the 1 − 2·alpha interval."""
    if not (se >= 0 and math.isfinite(se)):
        return {"se": se, "ci_low": math.nan, "ci_high": math.nan, "equivalence_bound": math.nan}
    t = float(st.t.ppf(1 - alpha / 2, df)) if math.isfinite(df) else float(st.norm.ppf(1 - alpha / 2))
    t1 = float(st.t.ppf(1 - alpha, df)) if math.isfinite(df) else float(st.norm.ppf(1 - alpha))
    return {"se": se, "ci_low": mean - t * se, "ci_high": mean + t * se,
            "equivalence_bound": max(abs(mean - t1 * se), abs(mean + t1 * se))}


def compare_arms(a: dict[int, PerExample], b: dict[int, PerExample], metric: str, alpha: float = 0.05,
                 name_a: str = "A", name_b: str = "B", n_boot: int = 10_000, seed: int = 0) -> dict:
    """Compare arm A with arm B on `metric` from per-example statistics, paired on seed (keys) and
    on example id. Returns n (seeds), n_examples, mean_diff (A − B, mean over seeds of the metric's
    differences), se, df, ci_low, ci_high, p_value, equivalence_bound, test, significant, verdict
    and the variance components (comp_seed, comp_example, comp_residual) where estimated."""
    seeds = sorted(set(a) & set(b))
    out: dict = {"n": len(seeds), "n_examples": 0, "mean_diff": math.nan, "se": math.nan, "df": math.nan,
                 "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "equivalence_bound": math.nan,
                 "test": "none", "significant": False}
    if not seeds:
        out["verdict"] = "not testable: no common seeds"
        return out
    ids = [i for i in a[seeds[0]].ids if all(i in set(x[s].ids) for s in seeds for x in (a, b))]
    if len(ids) < 2:
        out["verdict"] = "not testable: fewer than 2 common dev examples"
        return out
    spec = a[seeds[0]].specs[metric]
    A = [a[s].aligned(ids).stats[metric] for s in seeds]
    B = [b[s].aligned(ids).stats[metric] for s in seeds]
    diffs = [float(spec.value(x.sum(0)) - spec.value(y.sum(0))) for x, y in zip(A, B)]
    mean = float(np.mean(diffs))
    out.update(n_examples=len(ids), mean_diff=mean)
    if len(seeds) >= 2:
        D = np.stack([pseudo_values(x, spec) - pseudo_values(y, spec) for x, y in zip(A, B)])
        out.update(crossed_test(D, mean, alpha))
        return _verdict(out, name_a, name_b, alpha)
    x, y = A[0], B[0]
    n = len(ids)
    d = pseudo_values(x, spec) - pseudo_values(y, spec)
    se = float(d.std(ddof=1) / math.sqrt(n))
    if _is_binary_ratio(x, spec) and _is_binary_ratio(y, spec):
        wins, losses = int(((x[:, 0] == 1) & (y[:, 0] == 0)).sum()), int(((x[:, 0] == 0) & (y[:, 0] == 1)).sum())
        p = float(st.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
        out.update(df=n - 1, test=MCNEMAR, p_value=p, discordant=(wins, losses), **_interval(mean, se, n - 1, alpha))
        return _verdict(out, name_a, name_b, alpha)
    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, n_boot, 500):  # resample weights in chunks: [chunk, n] at a time
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(500, n_boot - start)).astype(float)
        boot.append(spec.value(counts @ x) - spec.value(counts @ y))
    boot = np.concatenate(boot)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    lo90, hi90 = np.quantile(boot, [alpha, 1 - alpha])
    p = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    out.update(df=math.inf, test=BOOTSTRAP, se=float(boot.std(ddof=1)), ci_low=float(lo), ci_high=float(hi),
               p_value=p, equivalence_bound=float(max(abs(lo90), abs(hi90))))
    return _verdict(out, name_a, name_b, alpha)


def compare_seed_values(a: dict, b: dict, alpha: float = 0.05, name_a: str = "A", name_b: str = "B") -> dict:
    """The fallback without per-example statistics: a paired t-test over seeds (postlab.report.stats), with
    the same equivalence bound as compare_arms."""
    res = paired_test(a, b, alpha=alpha, name_a=name_a, name_b=name_b)
    res.update(n_examples=0, se=math.nan, df=math.nan, equivalence_bound=math.nan)
    if res["n"] >= 2 and res["test"] == "paired t-test":
        seeds = sorted(set(a) & set(b))
        d = np.array([a[s] - b[s] for s in seeds], dtype=float)
        d = d[~np.isnan(d)]
        se = float(d.std(ddof=1) / math.sqrt(d.size))
        res.update(df=d.size - 1, test="paired t-test over seeds (no per-example data)",
                   **{k: v for k, v in _interval(res["mean_diff"], se, d.size - 1, alpha).items()
                      if k in ("se", "equivalence_bound")})
        if not res["significant"]:
            res["verdict"] = f"no difference larger than {res['equivalence_bound']:.3g} ({format_p(res['p_value'])})"
    return res


def detectable_effect(comps: Components, seeds: int, examples: int, alpha: float = 0.05, power: float = 0.8,
                      sims: int = 20_000, rng_seed: int = 0) -> float:
    """The smallest true difference that this module's test (two-sided, level alpha) finds with
    probability `power`, with `seeds` seeds and `examples` dev examples, if the differences have
    variance components `comps`.

    With 2+ seeds it is found by simulating the test itself (crossed_from_mean_squares) from its
    sufficient statistics under the normal model (mean ~ N(δ, Var), each mean square ~ its expected
    value · χ²_df / df) and bisecting on δ: the test's pooling and its seed-level guard make the
    textbook (t_{1−α/2} + t_{power})·SE formula optimistic. With one seed the test is per example
    (seed noise ignored): (t_{1−α/2} + t_{power})·sqrt((σv² + σw²)/n) with n − 1 df."""
    S, n = seeds, examples
    if S < 1 or n < 2:
        return math.nan
    if S == 1:
        var = (comps.example + comps.residual) / n
        return float((st.t.ppf(1 - alpha / 2, n - 1) + st.t.ppf(power, n - 1)) * math.sqrt(var)) if var > 0 else 0.0
    var = comps.variance_of_mean(S, n)
    if var <= 0:
        return 0.0
    rng = np.random.default_rng(rng_seed)
    df_s, df_e, df_r = S - 1, n - 1, (S - 1) * (n - 1)
    z = rng.standard_normal(sims)
    ms_s = (n * comps.seed + comps.residual) * rng.chisquare(df_s, sims) / df_s
    ms_e = (S * comps.example + comps.residual) * rng.chisquare(df_e, sims) / df_e
    ms_r = comps.residual * rng.chisquare(df_r, sims) / df_r if comps.residual > 0 else np.zeros(sims)
    se = math.sqrt(var)

    def found(delta: float) -> float:
        res = crossed_from_mean_squares(delta + se * z, ms_s, ms_e, ms_r, S, n, alpha)
        return float((res["p_value"] < alpha).mean())

    lo, hi = 0.0, se
    while found(hi) < power:
        lo, hi = hi, hi * 2
        if hi > 1e6 * se:
            return math.inf
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if found(mid) < power else (lo, mid)
        if hi - lo < 1e-4 * se:
            break
    return float(hi)


def pooled_components(estimates: list[Components]) -> Components | None:
    """One set of components from several comparisons of the same metric: the median of each."""
    if not estimates:
        return None
    return Components(float(np.median([c.seed for c in estimates])), float(np.median([c.example for c in estimates])),
                      float(np.median([c.residual for c in estimates])), max(c.n_seeds for c in estimates),
                      max(c.n_examples for c in estimates))
