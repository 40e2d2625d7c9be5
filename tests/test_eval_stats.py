"""Statistics of the eval harness against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from guardrail.eval import stats


def test_sign_test_45_of_47_matches_exact_binomial_tail():
    # P(X >= 45 | n = 47, p = 1/2) = (C(47,45) + C(47,46) + C(47,47)) / 2^47 = 1129 / 2^47
    res = stats.sign_test(n_pos=45, n_neg=2)
    assert res["p"] == pytest.approx(1129 / 2**47, rel=1e-12)
    assert res["p"] == pytest.approx(8.022e-12, rel=1e-3)
    assert res["n"] == 47


def test_sign_test_drops_ties_and_two_sided_doubles():
    res = stats.sign_test([0.3, 0.1, 0.0, -0.2, 0.5, 0.0])
    assert (res["n_pos"], res["n_neg"], res["n_ties"], res["n"]) == (3, 1, 2, 6)
    # one-sided: P(X >= 3 | n = 4) = (4 + 1) / 16
    assert res["p"] == pytest.approx(5 / 16)
    two = stats.sign_test(n_pos=3, n_neg=1, alternative="two-sided")
    assert two["p"] == pytest.approx(10 / 16)


def test_fisher_ci_for_r_008_at_n_47():
    # z = atanh(0.08) = 0.0801713, se = 1/sqrt(44) = 0.150756, 1.959964*se = 0.2954757
    lo, hi = stats.fisher_ci(0.08, 47)
    assert lo == pytest.approx(math.tanh(0.0801713 - 0.2954757), abs=1e-6)
    assert hi == pytest.approx(math.tanh(0.0801713 + 0.2954757), abs=1e-6)
    assert round(lo, 2) == -0.21 and round(hi, 2) == 0.36  # the paper's [-0.21, +0.36]


def test_pearson_perfect_and_known():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats.pearson(x, [2 * v + 1 for v in x])["r"] == pytest.approx(1.0)
    # r of (1,2,3,4) vs (1,3,2,4): cov = 4/3... computed: sum dx*dy = 4, sum dx^2 = sum dy^2 = 5 -> r = 0.8
    res = stats.pearson([1, 2, 3, 4], [1, 3, 2, 4])
    assert res["r"] == pytest.approx(0.8)
    assert res["n"] == 4
    assert stats.pearson([1, 1, 1, 1], [1, 2, 3, 4])["r"] is None


def test_one_sample_t_by_hand():
    # values 1,2,3,4,5: mean 3, sd sqrt(2.5), se = sqrt(0.5), t(popmean=1) = 2/sqrt(0.5) = 2.828427
    res = stats.one_sample_t([1, 2, 3, 4, 5], popmean=1.0)
    assert res["t"] == pytest.approx(2 / math.sqrt(0.5))
    assert res["df"] == 4
    # t_{0.975, 4} = 2.776445: CI = 3 ± 2.776445 * sqrt(0.5)
    assert res["ci"][0] == pytest.approx(3 - 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert res["ci"][1] == pytest.approx(3 + 2.776445 * math.sqrt(0.5), abs=1e-5)
    assert res["p"] == pytest.approx(0.047421, abs=1e-5)


def test_paired_t_is_one_sample_t_on_differences():
    post, pre = [1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 1]
    a = stats.paired_t(post, pre)
    b = stats.one_sample_t(np.subtract(post, pre))
    assert a["t"] == pytest.approx(b["t"]) and a["p"] == pytest.approx(b["p"])
    # d = 1,0,0,1,1,0: mean .5, sd sqrt(.3), t = .5 / sqrt(.3/6) = 2.236068
    assert a["t"] == pytest.approx(0.5 / math.sqrt(0.3 / 6))
    with pytest.raises(ValueError):
        stats.paired_t([1, 2], [1])


def test_welch_t_by_hand():
    # x: mean 2.5, var 5/3; y: mean 6, var 10. se^2 = 5/12 + 2 = 29/12
    res = stats.welch_t([1, 2, 3, 4], [2, 4, 6, 8, 10])
    assert res["t"] == pytest.approx(-3.5 / math.sqrt(29 / 12))
    df = (29 / 12) ** 2 / ((5 / 12) ** 2 / 3 + 2**2 / 4)
    assert res["df"] == pytest.approx(df)


def test_bootstrap_is_reproducible_and_brackets_the_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    a = stats.bootstrap_ci(values, seed=3)
    b = stats.bootstrap_ci(values, seed=3)
    assert a == b
    assert a["ci"][0] <= 0.7 <= a["ci"][1]
    assert stats.bootstrap_ci([0.5] * 8)["ci"] == [0.5, 0.5]  # no spread, no interval
    c = stats.paired_bootstrap_ci([1, 1, 1], [0, 0, 0])
    assert c["ci"] == [1.0, 1.0] and c["mean"] == 1.0


def test_delta_summary_counts_and_constant_deltas():
    res = stats.delta_summary([1, 1, 0, 1], [0, 1, 0, 0])
    assert res["n"] == 4 and res["delta"] == pytest.approx(0.5)
    assert (res["n_improved"], res["n_worsened"]) == (2, 0)
    same = stats.delta_summary([1, 0, 1], [1, 0, 1])
    assert same["delta"] == 0.0 and same["p"] == 1.0


def test_non_finite_is_an_error():
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci([1.0, float("nan")])
