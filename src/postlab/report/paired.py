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
    squares, with Satterthwaite degrees of freedom; t-test and CI, held to the exact t-tests over
    the seeds' and over the examples' mean differences.

Corpus metrics that are not means of per-example values (chrF, macro-F1, perplexity) enter through
their leave-one-out (jackknife) pseudo-values, which average to the metric and carry each example's
influence on it; the estimate itself is the mean over seeds of the real metric differences.

With one seed there is no training noise to estimate: the test is per example only (McNemar's score
test for accuracy-like 0/1 metrics, a t-test of the per-example differences otherwise) and says it
ignores training noise. Runs without per-example statistics fall back to a paired t-test over seeds
(postlab.report.stats). Every test's interval comes from the same statistic as its p-value
(`interval_at`), at any level: the CI excludes 0 exactly when p < alpha.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st

from ..metrics import MetricSpec, PerExample
from .stats import IDENTICAL, SIGN_TEST, format_p, paired_test, sign_test_interval

CROSSED = "seed x example (crossed random effects)"
MCNEMAR = "McNemar (score test), 1 seed (ignores training noise)"
ONE_SEED_T = "t-test of per-example differences, 1 seed (ignores training noise)"
SEED_T = "paired t-test over seeds (no per-example data)"

POOL_ALPHA = 0.25  # a seed or example term whose F-test has p >= this is pooled into the residual
# Below this many dev examples no term is pooled: a preliminary F-test on 1-4 example degrees of
# freedom decides badly (docs/statistics.md, "Few dev examples").
MIN_EXAMPLES_TO_POOL = 6


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

    1. With MIN_EXAMPLES_TO_POOL or more examples, a seed or example term whose F-test against the
       residual has p >= POOL_ALPHA is taken to be 0 and its sum of squares pooled into the
       residual's. With fewer, both terms are kept and the residual's (negative) share is left out:
       a slight overestimate of the variance, never a negative one.
    2. Var(mean) = Σ c·MS / (S·n) over the kept terms (c = +1 for seed and example, 1 − kept for
       the residual), with Satterthwaite degrees of freedom; t-test of the mean.
    3. The result is also held to the paired t-tests of the per-seed mean differences (df S − 1,
       variance MS_s / (S·n)), exact for these dev examples, and of the per-example mean differences
       (df n − 1, variance MS_e / (S·n)), exact for these trained models: p is the largest of the
       three p-values and the interval the widest. Satterthwaite's df built on 1-2 seed or example
       degrees of freedom is too optimistic; the guards keep the false-positive rate at alpha
       (docs/statistics.md).
    """
    mean, ms_s, ms_e, ms_r = (np.asarray(x, dtype=float) for x in (mean, ms_s, ms_e, ms_r))
    df_s, df_e, df_r = S - 1, n - 1, (S - 1) * (n - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if n >= MIN_EXAMPLES_TO_POOL:
            keep_s = np.where(ms_r > 0, st.f.sf(ms_s / ms_r, df_s, df_r) < POOL_ALPHA, ms_s > 0)
            keep_e = np.where(ms_r > 0, st.f.sf(ms_e / ms_r, df_e, df_r) < POOL_ALPHA, ms_e > 0)
            c_r = 1 - keep_s.astype(float) - keep_e.astype(float)
        else:
            keep_s = keep_e = np.ones(np.shape(mean), dtype=bool)
            c_r = np.zeros(np.shape(mean))
        pooled_df = df_r + np.where(keep_s, 0, df_s) + np.where(keep_e, 0, df_e)
        pooled = (ms_r * df_r + np.where(keep_s, 0, ms_s * df_s) + np.where(keep_e, 0, ms_e * df_e)) / pooled_df
        terms = [(ms_s, df_s, keep_s.astype(float)), (ms_e, df_e, keep_e.astype(float)), (pooled, pooled_df, c_r)]
        var = sum(c * ms for ms, _, c in terms) / (S * n)
        fallback = var <= 0  # (both kept, residual above them: cannot happen after pooling; kept for safety)
        var = np.where(fallback, pooled / (S * n), var)
        den = sum((c * ms / (S * n)) ** 2 / d for ms, d, c in terms)
        df = np.where(fallback, pooled_df, np.where(den > 0, var ** 2 / den, np.inf))
        se = np.sqrt(var)
        se_seeds, se_examples = np.sqrt(ms_s / (S * n)), np.sqrt(ms_e / (S * n))
        p_crossed, p_seeds, p_examples = (_t_p(mean, x, d) for x, d in ((se, df), (se_seeds, df_s),
                                                                             (se_examples, df_e)))
    pairs = ((se, df), (se_seeds, df_s), (se_examples, df_e))
    half = np.max([st.t.ppf(1 - alpha / 2, d) * x for x, d in pairs], axis=0)
    half90 = np.max([st.t.ppf(1 - alpha, d) * x for x, d in pairs], axis=0)
    out = {"mean_diff": mean, "se": se, "df": df, "p_value": np.maximum(p_crossed, np.maximum(p_seeds, p_examples)),
           "p_crossed": p_crossed, "p_seeds": p_seeds, "p_examples": p_examples,
           "ci_low": mean - half, "ci_high": mean + half, "equivalence_bound": np.abs(mean) + half90,
           "se_seeds": se_seeds, "df_seeds": float(df_s), "se_examples": se_examples, "df_examples": float(df_e),
           "comp_seed": np.maximum(0.0, (ms_s - ms_r) / n), "comp_example": np.maximum(0.0, (ms_e - ms_r) / S),
           "comp_residual": ms_r}
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}


def _t_p(mean, se, df):
    """Two-sided p of a t-test of `mean` with standard error `se` (0 where se is 0 and mean is not)."""
    return np.where(se > 0, 2 * st.t.sf(np.abs(mean) / se, df), np.where(mean == 0, 1.0, 0.0))


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


# --------------------------------------------------------------------------------------------
# Intervals: each from the statistic its test uses, at any level
# --------------------------------------------------------------------------------------------

def interval_at(res: dict, alpha: float) -> dict[str, float]:
    """ci_low, ci_high (level 1 − alpha) and equivalence_bound (the far end of the 1 − 2·alpha
    interval: the largest |A − B| two one-sided tests at alpha do not rule out) of a comparison's
    result, from the statistic its test used, so that the CI excludes 0 exactly when its p < alpha.
    The report calls it again at the level Holm's procedure held each comparison to."""
    test, mean = res.get("test"), res.get("mean_diff", math.nan)
    if test == CROSSED:  # the widest of the crossed test's interval and its two guards'
        pairs = [(res["se"], res["df"]), (res["se_seeds"], res["df_seeds"]), (res["se_examples"], res["df_examples"])]
        return {"ci_low": mean - max(_half(se, df, alpha) for se, df in pairs),
                "ci_high": mean + max(_half(se, df, alpha) for se, df in pairs),
                "equivalence_bound": abs(mean) + max(_half(se, df, 2 * alpha) for se, df in pairs)}
    if test in (ONE_SEED_T, SEED_T):
        half, half90 = _half(res["se"], res["df"], alpha), _half(res["se"], res["df"], 2 * alpha)
        return {"ci_low": mean - half, "ci_high": mean + half, "equivalence_bound": abs(mean) + half90}
    if test == MCNEMAR:
        wins, losses = res["discordant"]
        lo, hi = tango_interval(wins, losses, res["n_examples"], alpha)
        lo90, hi90 = tango_interval(wins, losses, res["n_examples"], 2 * alpha)
        return {"ci_low": lo, "ci_high": hi, "equivalence_bound": max(abs(lo90), abs(hi90))}
    if test == SIGN_TEST:  # every seed differs by the same amount: the sign test's order statistics
        lo, hi = sign_test_interval(mean, res["n"], alpha)
        lo90, hi90 = sign_test_interval(mean, res["n"], 2 * alpha)
        return {"ci_low": lo, "ci_high": hi, "equivalence_bound": max(abs(lo90), abs(hi90))}
    if test == IDENTICAL:  # equal on every seed: no spread to bound a difference with
        return {"ci_low": 0.0, "ci_high": 0.0, "equivalence_bound": math.nan}
    return {"ci_low": math.nan, "ci_high": math.nan, "equivalence_bound": math.nan}


def _half(se: float, df: float, alpha: float) -> float:
    """Half-width of the two-sided 1 − alpha t-interval (normal where df is infinite)."""
    if not (se >= 0 and math.isfinite(se)):
        return math.nan
    q = st.t.ppf(1 - alpha / 2, df) if math.isfinite(df) else st.norm.ppf(1 - alpha / 2)
    return float(q * se)


def _tango_z(wins: int, losses: int, n: int, d0: float) -> float:
    """Tango's score statistic for the paired difference of proportions δ = P(A right, B wrong) −
    P(A wrong, B right) = d0, with the restricted maximum-likelihood estimate of P(A wrong, B right)
    (Tango 1998). At d0 = 0 it is McNemar's (wins − losses) / sqrt(wins + losses)."""
    a, b = 2 * n, -wins - losses + (2 * n - wins + losses) * d0
    c = -losses * d0 * (1 - d0)
    p_loss = (math.sqrt(max(b * b - 4 * a * c, 0.0)) - b) / (2 * a)
    num, var = wins - losses - n * d0, n * (2 * p_loss + d0 * (1 - d0))
    return num / math.sqrt(var) if var > 0 else (0.0 if num == 0 else math.copysign(math.inf, num))


def tango_interval(wins: int, losses: int, n: int, alpha: float) -> tuple[float, float]:
    """The 1 − alpha interval of the paired difference of proportions that inverts Tango's score test
    (the δ0 it does not reject): it holds 0 exactly when McNemar's score test gives p >= alpha."""
    from scipy.optimize import brentq

    z, est, edge = float(st.norm.ppf(1 - alpha / 2)), (wins - losses) / n, 1 - 1e-12
    lo = (brentq(lambda d: _tango_z(wins, losses, n, d) - z, -edge, est, xtol=1e-12)
          if _tango_z(wins, losses, n, -edge) > z else -1.0)
    hi = (brentq(lambda d: _tango_z(wins, losses, n, d) + z, est, edge, xtol=1e-12)
          if _tango_z(wins, losses, n, edge) < -z else 1.0)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------

def compare_arms(a: dict[int, PerExample], b: dict[int, PerExample], metric: str, alpha: float = 0.05,
                 name_a: str = "A", name_b: str = "B") -> dict:
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
    if _is_binary_ratio(x, spec) and _is_binary_ratio(y, spec):
        # McNemar's score test (no continuity correction): it holds its level where the exact
        # conditional test is conservative (docs/statistics.md), and Tango's interval inverts it
        wins, losses = int(((x[:, 0] == 1) & (y[:, 0] == 0)).sum()), int(((x[:, 0] == 0) & (y[:, 0] == 1)).sum())
        z = _tango_z(wins, losses, n, 0.0)
        out.update(test=MCNEMAR, discordant=(wins, losses), p_value=float(2 * st.norm.sf(abs(z))))
    else:
        d = pseudo_values(x, spec) - pseudo_values(y, spec)
        se = float(d.std(ddof=1) / math.sqrt(n))
        out.update(test=ONE_SEED_T, se=se, df=n - 1, p_value=float(_t_p(mean, se, n - 1)))
    out.update(interval_at(out, alpha))
    return _verdict(out, name_a, name_b, alpha)


def compare_seed_values(a: dict, b: dict, alpha: float = 0.05, name_a: str = "A", name_b: str = "B") -> dict:
    """The fallback without per-example statistics: a paired t-test over seeds (postlab.report.stats;
    a sign test where every seed differs by the same amount), with its interval and equivalence bound
    from the same statistic (interval_at)."""
    res = paired_test(a, b, alpha=alpha, name_a=name_a, name_b=name_b)
    res.update(n_examples=0, se=math.nan, df=math.nan, equivalence_bound=math.nan)
    if res["test"] == "paired t-test":
        seeds = sorted(set(a) & set(b))
        d = np.array([a[s] - b[s] for s in seeds], dtype=float)
        d = d[~np.isnan(d)]
        res.update(test=SEED_T, se=float(d.std(ddof=1) / math.sqrt(d.size)), df=d.size - 1)
    res.update(interval_at(res, alpha))
    if not res["significant"] and res["test"] != IDENTICAL and math.isfinite(res["equivalence_bound"]):
        res["verdict"] = f"no difference larger than {res['equivalence_bound']:.3g} ({format_p(res['p_value'])})"
    return res


def detectable_effect(comps: Components, seeds: int, examples: int, alpha: float = 0.05, power: float = 0.8,
                      sims: int = 20_000, rng_seed: int = 0) -> float:
    """The smallest true difference that this module's test (two-sided, level alpha) finds with
    probability `power`, with `seeds` seeds and `examples` dev examples, if the differences have
    variance components `comps`.

    With 2+ seeds it is found by simulating the test itself (crossed_from_mean_squares) from its
    sufficient statistics under the normal model (mean ~ N(δ, Var), each mean square ~ its expected
    value · χ²_df / df) and bisecting on δ: the test's pooling and its guards make the textbook
    (t_{1−α/2} + t_{power})·SE formula optimistic. With one seed the test is per example and cannot
    tell a recipe effect from training noise: where the components have any (σu² > 0) nothing is
    detectable (inf; `one_seed_false_positive_rate` says how often such a test is fooled), else
    (t_{1−α/2} + t_{power})·sqrt((σv² + σw²)/n) with n − 1 df."""
    S, n = seeds, examples
    if S < 1 or n < 2:
        return math.nan
    if S == 1:
        var = (comps.example + comps.residual) / n
        if comps.seed > 0:
            return math.inf
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


def one_seed_false_positive_rate(comps: Components, examples: int, alpha: float = 0.05) -> float:
    """How often a 1-seed test (per example: it takes the two trained models as fixed) finds a
    difference between two recipes that do not differ, when retraining moves their difference with
    variance σu² (comps.seed): P(|N(0, σu² + s²)| > t_{1−α/2, n−1}·s), s² = (σv² + σw²)/n."""
    s2 = (comps.example + comps.residual) / examples
    if s2 <= 0:
        return 1.0 if comps.seed > 0 else 0.0
    t = float(st.t.ppf(1 - alpha / 2, examples - 1))
    return float(2 * st.norm.sf(t * math.sqrt(s2) / math.sqrt(comps.seed + s2)))


def pooled_components(estimates: list[Components]) -> Components | None:
    """One set of components from several comparisons of the same metric: the median of each."""
    if not estimates:
        return None
    return Components(float(np.median([c.seed for c in estimates])), float(np.median([c.example for c in estimates])),
                      float(np.median([c.residual for c in estimates])), max(c.n_seeds for c in estimates),
                      max(c.n_examples for c in estimates))
