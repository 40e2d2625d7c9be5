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
    const = stats.bootstrap_ci([0.5] * 8)  # every resample is the sample itself: [0.5, 0.5] would read as exact
    assert const["ci"] == [None, None] and "constant" in const["undefined"] and const["mean"] == 0.5
    c = stats.paired_bootstrap_ci([1, 1, 1], [0, 0, 0])
    assert c["ci"] == [None, None] and c["mean"] == 1.0


def test_delta_summary_counts_and_constant_deltas():
    res = stats.delta_summary([1, 1, 0, 1], [0, 1, 0, 0])
    assert res["n"] == 4 and res["delta"] == pytest.approx(0.5)
    assert (res["n_improved"], res["n_worsened"]) == (2, 0)
    assert res["method"] == "newcombe" and res["test"] == "exact McNemar"
    assert res["p"] == pytest.approx(0.5)  # 2 gained, 0 lost: two-sided exact binomial 2 * (1/2)^2
    same = stats.delta_summary([1, 0, 1], [1, 0, 1])
    assert same["delta"] == 0.0 and same["p"] == 1.0


def test_non_finite_is_an_error():
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci([1.0, float("nan")])


# --------------------------------------------------------------------------- degenerate cases


def test_constant_sample_has_no_t_whatever_its_rounding():
    # six copies of -0.025: the computed sd is ~4e-18 (rounding), so t would be -1.6e16; and an
    # exactly constant nonzero sample would give t = -inf, p = 0. Neither is a statistic.
    for sample in ([-0.025] * 6, [0.3 - 0.275] * 3 + [0.325 - 0.3] * 3, [1.0] * 5):
        res = stats.one_sample_t(sample)
        assert res["t"] is None and res["p"] is None and res["ci"] == [None, None]
        assert "constant" in res["undefined"] and res["mean"] == pytest.approx(sample[0])
    assert stats.one_sample_t([2.0])["undefined"].startswith("n = 1")
    assert stats.one_sample_t([1.0, 1.0 + 1e-6])["undefined"] is None  # a real spread, however small, is kept


def test_welch_with_no_spread_in_either_group_is_undefined():
    res = stats.welch_t([0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert res["t"] is None and res["p"] is None and "constant" in res["undefined"]
    assert stats.welch_t([0.1], [0.2, 0.3])["undefined"].startswith("n = 1 and 2")
    # one constant group and one with spread is a defined test: t = (0 - 2) / sqrt(0 + 1/3)
    assert stats.welch_t([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])["t"] == pytest.approx(-2 / math.sqrt(1 / 3))


def test_pearson_of_constant_input_is_undefined_not_nan():
    for x, y, which in (([1, 1, 1, 1], [1, 2, 3, 4], "x"), ([1, 2, 3, 4], [0.05] * 4, "y")):
        res = stats.pearson(x, y)
        assert res["r"] is None and res["p"] is None and res["ci"] == [None, None]
        assert res["undefined"].startswith(which)
    assert "at least 3" in stats.pearson([1, 2], [2, 1])["undefined"]
    assert stats.pearson([1, 2, 3], [1, 3, 2])["ci"] == [None, None]  # r exists at n = 3, its Fisher interval does not


def test_all_same_paired_outcome_gets_newcombe_not_a_zero_width_interval():
    # 40 prompts, none succeeds before or after: Wilson upper of 0/40 = z^2 / (n + z^2) = 3.8415 / 43.8415,
    # phi = 0 (empty margin), so Newcombe's interval is [-0.0876, +0.0876], and McNemar has no discordant pair.
    res = stats.delta_summary([0] * 40, [0] * 40)
    z2 = 1.959963984540054**2
    assert res["ci"] == pytest.approx([-z2 / (40 + z2), z2 / (40 + z2)])
    assert res["p"] == 1.0 and "t_ci" not in res and "bootstrap_ci" not in res
    # every prompt gained: 1 - Wilson lower of 40/40 = Wilson upper of 0/40 = z^2 / (n + z^2) and phi = 0,
    # so the lower limit is 1 - sqrt(2) * z^2 / (n + z^2); the upper is 1
    up = stats.delta_summary([1] * 40, [0] * 40)
    assert up["delta"] == 1.0 and up["ci"][1] == 1.0
    assert up["ci"][0] == pytest.approx(1 - math.sqrt(2) * z2 / (40 + z2))
    assert up["p"] == pytest.approx(2 * 0.5**40)


def test_continuous_deltas_keep_t_and_bootstrap_and_say_when_undefined():
    res = stats.delta_summary([0.5, -1.0, 2.0], [0.5, -1.0, 2.0])  # overall scores, nothing moved
    assert res["method"] == "paired t" and res["ci"] == [None, None] and res["p"] is None and "constant" in res["undefined"]
    moved = stats.delta_summary([0.5, 1.0, 2.0], [-1.0, -1.0, 2.0])
    assert moved["method"] == "paired t" and moved["bootstrap_ci"][0] is not None and moved["t"] is not None


def test_nothing_returned_is_nan_or_inf():
    import json

    out = [stats.one_sample_t([3.0] * 4), stats.pearson([1, 1, 1], [1, 2, 3]), stats.welch_t([1, 1], [1, 1]),
           stats.bootstrap_ci([0.0] * 3), stats.delta_summary([0.2] * 3, [0.2] * 3), stats.delta_summary([0] * 3, [0] * 3)]
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- paired binary, shared implementation


def test_newcombe_matches_published_values():
    from guardrail.stats import paired_gain

    def table(both: int, only_after: int, only_before: int, neither: int) -> tuple[list[int], list[int]]:
        before = [1] * both + [0] * only_after + [1] * only_before + [0] * neither
        after = [1] * both + [1] * only_after + [0] * only_before + [0] * neither
        return before, after

    # Newcombe (1998), example (a): 36 both, 12 / 2 discordant, 0 neither: +0.2000 [0.0569, 0.3404]
    g = paired_gain(*table(36, 12, 2, 0))
    assert g.gain == pytest.approx(0.2) and (round(g.low, 4), round(g.high, 4)) == (0.0569, 0.3404)
    # Fagerland, Lydersen & Laake (2017), Cavo et al. 2012 table [[59, 6], [16, 80]]: -0.0621 [-0.1186, -0.0046]
    g = paired_gain(*table(59, 6, 16, 80))
    assert (round(g.gain, 4), round(g.low, 4), round(g.high, 4)) == (-0.0621, -0.1186, -0.0046)


def test_eval_and_audit_share_one_newcombe():
    import guardrail.audit.stats as audit_stats
    import guardrail.stats as lib

    assert audit_stats.paired_gain is lib.paired_gain and stats.paired_gain is lib.paired_gain


def test_exact_mcnemar_is_the_binomial_of_discordant_pairs():
    from guardrail.stats import mcnemar

    before = [0] * 7 + [1] * 1 + [1] * 5 + [0] * 27  # 7 gained, 1 lost, 32 concordant
    after = [1] * 7 + [0] * 1 + [1] * 5 + [0] * 27
    res = mcnemar(before, after)
    assert (res.n_discordant, res.gained, res.lost) == (8, 7, 1)
    assert res.p == pytest.approx(2 * (1 + 8) / 2**8)  # 2 * P(X >= 7 | 8, 1/2) = 2 * 9/256
    assert mcnemar(before, after, "greater").p == pytest.approx(9 / 256)
    assert mcnemar([1, 0], [1, 0]).p == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5], [1])


# --------------------------------------------------------------------------- prompts shared by variants


def test_clean_label_permutation_by_hand():
    # 6 prompts, clean fails on all; variant 1 succeeds on all, variant 2 on the first five.
    # Only "every prompt's real clean is drawn as clean" (prompt 6 may draw either 0) reaches the
    # observed mean: exact p = (1/3)^5 * (2/3) = 2/729 = 0.00274; Monte Carlo within its error.
    res = stats.clean_label_permutation([0] * 6, [[1] * 6, [1] * 5 + [0]], n_perm=20000)
    assert res["mean_delta"] == pytest.approx(11 / 12)
    assert res["p"] == pytest.approx(2 / 729, abs=0.0015)
    none = stats.clean_label_permutation([1, 0, 1], [[1, 0, 1], [1, 0, 1]])
    assert none["mean_delta"] == 0.0 and none["p"] == 1.0  # nothing moved: no evidence at all


def test_sign_flip_permutation_by_hand():
    # 8 prompts all +1: only the identity flip reaches the mean, exact one-sided p = 1/256
    res = stats.sign_flip_permutation([[1.0] * 8], alternative="greater", n_perm=20000)
    assert res["p"] == pytest.approx(1 / 256, abs=0.0015)
    # two comparisons on the same prompts flip together: per-prompt means (0, 0, 0, 0) -> p = 1
    assert stats.sign_flip_permutation([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])["p"] == 1.0


def test_prompt_bootstrap_counts_undefined_resamples():
    x = np.array([0.0, 1.0])
    res = stats.prompt_bootstrap(lambda idx: float(x[idx].mean()), 2, n_boot=200)
    assert res["estimate"] == 0.5 and res["ci"] == [0.0, 1.0] and res["n_undefined"] == 0
    flat = stats.prompt_bootstrap(lambda idx: 0.0, 5, n_boot=50)  # nothing moves it: [0, 0] would read as exact
    assert flat["ci"] == [None, None] and "every resample" in flat["undefined"]
    never = stats.prompt_bootstrap(lambda idx: None, 5, n_boot=50)
    assert never["ci"] == [None, None] and "undefined on the prompts" in never["undefined"]
