"""Each verdict of the "paper vs this run" table is decided by one rule; each rule, its cases."""

from __future__ import annotations

from guardrail.eval.verdicts import (
    Verdict, by_construction, directional, feature_count, interval_direction, new_measurement, null_correlation, separation,
    stays_zero, pooled_sign, template_detectors,
)


def _d(delta: float, lo: float | None, hi: float | None, pre: float = 0.2, improved: int = 0, n: int = 40) -> dict:
    return {"n": n, "pre": pre, "post": pre + delta, "delta": delta, "ci": [lo, hi], "method": "newcombe", "p": 0.01,
            "n_improved": improved, "undefined": None if lo is not None else "constant sample"}


def test_directional_rise():
    assert directional(_d(0.3, 0.1, 0.5)).verdict is Verdict.REPRODUCES
    assert directional(_d(0.05, -0.05, 0.15)).verdict is Verdict.NOT_REPRODUCED  # interval spans 0
    assert directional(_d(-0.1, -0.2, -0.01)).verdict is Verdict.NOT_REPRODUCED  # opposite
    assert directional(_d(0.0, None, None)).verdict is Verdict.UNDEFINED
    assert directional(None).verdict is Verdict.NOT_RUN


def test_directional_below_the_papers_interval_is_weaker():
    assert directional(_d(0.125, 0.025, 0.25), paper_low=0.48).verdict is Verdict.WEAKER
    assert directional(_d(0.65, 0.48, 0.82), paper_low=0.48).verdict is Verdict.REPRODUCES


def test_directional_at_ceiling_or_floor_has_no_headroom():
    assert directional(_d(0.0, -0.08, 0.0, pre=1.0)).verdict is Verdict.NO_HEADROOM
    assert directional(_d(0.0, 0.0, 0.08, pre=0.0), positive=False).verdict is Verdict.NO_HEADROOM
    assert directional(_d(-0.2, -0.3, -0.1, pre=0.5), positive=False).verdict is Verdict.REPRODUCES


def test_stays_zero_with_b_at_zero_in_both_conditions_has_no_headroom():
    # the committed quick-organism page: B format 0% clean and 0% spliced, printed "reproduces"
    assert stays_zero(_d(0.0, -0.0876, 0.0876, pre=0.0)).verdict is Verdict.NO_HEADROOM
    assert stays_zero(_d(0.0, -0.05, 0.05, pre=0.3)).verdict is Verdict.REPRODUCES
    assert stays_zero(_d(0.025, -0.02, 0.13, pre=0.0, improved=1)).verdict is Verdict.NOT_REPRODUCED


def test_measurements_the_paper_never_made_are_new():
    # single-model splice of A, the artifact-only threat on B: not "reproduces" however large
    assert new_measurement(_d(0.45, 0.29, 0.61)).verdict is Verdict.NEW
    assert new_measurement(None).verdict is Verdict.NOT_RUN


def test_b_exclusive_control_is_a_sanity_check():
    assert by_construction(True, what="masked decoder").verdict is Verdict.SANITY_CHECK
    failed = by_construction(False, what="masked decoder")
    assert failed.verdict is Verdict.NOT_REPRODUCED and "bug" in failed.why
    assert by_construction(None, what="masked decoder").verdict is Verdict.NOT_RUN


def test_a_sign_without_a_test_is_never_reproduces():
    # interference: mean over cells -13.3 pp, worse in 2 of 6 cells, no test → not "reproduces"
    assert pooled_sign({"mean_delta": -0.133, "p": None, "undefined": "no test of the sign"}, positive=False).verdict is Verdict.UNDEFINED
    assert pooled_sign({"mean_delta": -0.133, "p": 0.21}, positive=False).verdict is Verdict.NOT_REPRODUCED
    assert pooled_sign({"mean_delta": -0.133, "p": 0.004}, positive=False).verdict is Verdict.REPRODUCES
    assert pooled_sign({"mean_delta": 0.133, "p": 0.004}, positive=False).verdict is Verdict.NOT_REPRODUCED
    assert pooled_sign(None, positive=True).verdict is Verdict.NOT_RUN


def test_feature_count_needs_a_gain_and_a_match():
    gain, best = _d(0.3, 0.1, 0.5), {"delta": 0.35}
    assert feature_count(8, gain, best).verdict is Verdict.REPRODUCES
    assert feature_count(1, gain, best).verdict is Verdict.NOT_REPRODUCED
    assert feature_count(None, gain, best).verdict is Verdict.UNDEFINED  # no |S| matched: the count was not measured
    assert feature_count(None, _d(-0.025, -0.08, 0.03), best).verdict is Verdict.UNDEFINED  # nothing to match
    assert feature_count(None, None, None).verdict is Verdict.NOT_RUN


def test_null_correlation_needs_a_narrow_interval_around_zero():
    assert null_correlation({"ci": [-0.21, 0.36]}).verdict is Verdict.REPRODUCES  # the paper's own interval
    assert null_correlation({"ci": [-0.80, 0.82]}).verdict is Verdict.UNDEFINED
    assert null_correlation({"ci": [0.1, 0.6]}).verdict is Verdict.NOT_REPRODUCED
    assert null_correlation({"ci": [None, None], "undefined": "y is constant: r = 0/0"}).verdict is Verdict.UNDEFINED  # not "differs"


def test_interval_direction_of_a_difference_across_prompts():
    assert interval_direction({"ci": [0.01, 0.06]}).verdict is Verdict.REPRODUCES
    assert interval_direction({"ci": [-0.02, 0.06]}).verdict is Verdict.NOT_REPRODUCED
    assert interval_direction({"ci": [None, None], "undefined": "every resample gives +0"}).verdict is Verdict.UNDEFINED


def test_template_share_must_not_count_the_marker_every_prompt_ends_with():
    assert template_detectors(1.0, 0.12, prompt_end_markers=None).verdict is Verdict.UNDEFINED  # old runs counted </user>
    assert template_detectors(0.9, 0.12, prompt_end_markers=["</user>"]).verdict is Verdict.REPRODUCES
    assert template_detectors(0.2, 0.12, prompt_end_markers=["</user>"]).verdict is Verdict.NOT_REPRODUCED
    assert template_detectors(None, 0.12, prompt_end_markers=[]).verdict is Verdict.NOT_RUN


def test_geometry_separation_against_its_control():
    assert separation(0.4, 0.0).verdict is Verdict.REPRODUCES
    assert separation(0.01, 0.0).verdict is Verdict.NOT_REPRODUCED
    assert separation(None, 0.0).verdict is Verdict.NOT_RUN
