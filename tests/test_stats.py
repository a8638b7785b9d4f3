"""postlab.report.stats against scipy on hand-chosen inputs, plus the n=1 and zero-variance edge cases."""

import math

import numpy as np
import pytest
from scipy import stats as st

from postlab.report.stats import format_p, holm, paired_test, summarize

X = [0.81, 0.79, 0.84, 0.80, 0.83]


def test_summarize_matches_scipy_t_interval():
    s = summarize(X)
    arr = np.array(X)
    lo, hi = st.t.interval(0.95, df=len(X) - 1, loc=arr.mean(), scale=st.sem(arr))
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(arr.mean())
    assert s["std"] == pytest.approx(arr.std(ddof=1))
    assert s["ci_low"] == pytest.approx(lo)
    assert s["ci_high"] == pytest.approx(hi)


def test_summarize_known_numbers_and_confidence():
    # mean 2.5, std sqrt(5/3); t_{0.975,3} = 3.182446...
    s = summarize([1, 2, 3, 4])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))
    s90 = summarize([1, 2, 3, 4], confidence=0.90)
    assert s90["ci_high"] - s90["ci_low"] < s["ci_high"] - s["ci_low"]


def test_summarize_single_value_has_no_spread():
    s = summarize([0.7])
    assert s["n"] == 1 and s["mean"] == 0.7
    assert math.isnan(s["std"]) and math.isnan(s["ci_low"]) and math.isnan(s["ci_high"])


def test_summarize_empty_and_nan_dropped():
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["mean"])
    s = summarize([1.0, float("nan"), 3.0])
    assert s["n"] == 2 and s["mean"] == 2.0


def test_summarize_zero_variance_gives_point_interval():
    s = summarize([0.5, 0.5, 0.5])
    assert s["std"] == 0.0 and s["ci_low"] == 0.5 and s["ci_high"] == 0.5


A = [0.90, 0.88, 0.91, 0.89]
B = [0.85, 0.86, 0.84, 0.86]


def test_paired_test_matches_ttest_rel():
    r = paired_test(A, B, name_a="fft", name_b="lora")
    ref = st.ttest_rel(A, B)
    d = np.subtract(A, B)
    lo, hi = st.t.interval(0.95, df=3, loc=d.mean(), scale=st.sem(d))
    assert r["n"] == 4 and r["test"] == "paired t-test"
    assert r["p_value"] == pytest.approx(ref.pvalue)
    assert r["mean_diff"] == pytest.approx(d.mean())
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    assert r["significant"] is True
    assert r["verdict"] == f"fft > lora ({format_p(ref.pvalue)})"
    flipped = paired_test(B, A, name_a="lora", name_b="fft")
    assert flipped["verdict"].startswith("lora < fft (p=")
    assert flipped["p_value"] == pytest.approx(ref.pvalue)


def test_paired_test_noise_is_within_noise():
    a = [0.80, 0.82, 0.79]
    b = [0.81, 0.80, 0.80]
    r = paired_test(a, b)
    assert r["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    assert r["significant"] is False
    assert r["verdict"] == f"within noise ({format_p(r['p_value'])})"
    assert r["ci_low"] < 0 < r["ci_high"]


def test_paired_test_alpha_parameter():
    a, b = [1.0, 2.0, 3.5], [0.5, 1.0, 2.0]  # p ≈ 0.06
    p = st.ttest_rel(a, b).pvalue
    assert 0.05 < p < 0.1
    assert not paired_test(a, b, alpha=0.05)["significant"]
    assert paired_test(a, b, alpha=0.1)["significant"]


def test_paired_test_pairs_mappings_by_seed():
    a = {2: 0.9, 0: 0.7, 1: 0.8, 5: 0.1}
    b = {0: 0.6, 1: 0.75, 2: 0.7, 7: 0.3}
    r = paired_test(a, b)
    assert r["n"] == 3
    assert r["p_value"] == pytest.approx(st.ttest_rel([0.7, 0.8, 0.9], [0.6, 0.75, 0.7]).pvalue)


def test_paired_test_one_seed_not_testable():
    r = paired_test([0.9], [0.8])
    assert r["n"] == 1 and r["verdict"] == "not testable: 1 seed"
    assert math.isnan(r["p_value"]) and r["significant"] is False
    assert r["mean_diff"] == pytest.approx(0.1)


def test_paired_test_identical_values_no_nan_crash():
    with np.errstate(all="raise"):
        r = paired_test([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])
    assert r["verdict"] == "identical" and r["p_value"] == 1.0 and not r["significant"]
    assert r["mean_diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    # equal up to float round-off still counts as identical
    assert paired_test([0.1 + 0.2, 1.0], [0.3, 1.0])["verdict"] == "identical"


def test_paired_test_constant_difference_uses_sign_test():
    r = paired_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert r["test"].startswith("sign test")
    assert r["p_value"] == pytest.approx(0.25)  # 2 * 0.5**3
    assert r["verdict"] == "within noise (p=0.25)"
    r6 = paired_test(np.arange(6) + 1.0, np.arange(6.0))
    assert r6["p_value"] == pytest.approx(2 * 0.5**6) and r6["significant"]


def test_paired_test_length_mismatch():
    with pytest.raises(ValueError):
        paired_test([1, 2], [1, 2, 3])


def test_format_p():
    assert format_p(0.0123) == "p=0.012"
    assert format_p(0.41) == "p=0.41"
    assert format_p(0.0004) == "p<0.001"
    assert format_p(float("nan")) == "p=n/a"


def test_holm():
    adj = holm([0.01, 0.04, float("nan"), 0.03])
    assert adj[0] == pytest.approx(0.03)
    assert adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)  # monotone
    assert math.isnan(adj[2])
    assert holm([]) == []
