"""The verdict of every "paper vs this run" row, each decided by one rule.

One small vocabulary (:class:`Verdict`) for the whole report, so a reader learns it once:
"reproduces" only when this run's evidence earns it — an interval that excludes zero in
the paper's direction, on a baseline that could have moved. Measurements the paper never
made are "new"; facts that hold by construction are "sanity check"; a baseline at its
floor or ceiling is "no headroom"; a statistic that does not exist is "undefined".

Each rule takes the numbers the experiments saved and returns a :class:`Judgement` (the
verdict and why), never reading more than it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Sequence

ALPHA = 0.05
FLOOR, CEILING = 0.0, 1.0


class Verdict(str, Enum):
    REPRODUCES = "reproduces"
    WEAKER = "same direction, weaker"
    NOT_REPRODUCED = "not reproduced"
    NO_HEADROOM = "no headroom"
    SANITY_CHECK = "sanity check"
    NEW = "new"
    UNDEFINED = "undefined"
    NOT_RUN = "not run"  # nothing was measured: not a verdict on the finding


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    why: str


def _j(verdict: Verdict, why: str) -> Judgement:
    return Judgement(verdict, why)


def _ci(d: Mapping[str, Any]) -> tuple[float | None, float | None]:
    lo, hi = d.get("ci") or (None, None)
    return lo, hi


def directional(d: Mapping[str, Any] | None, *, positive: bool = True, paper_low: float | None = None) -> Judgement:
    """A claimed rise (``positive``) or fall of a paired delta.

    No headroom when the baseline already sits where the claim would push it; reproduces
    when the interval excludes 0 in the claimed direction and the effect is at least the
    lower end of the paper's interval (``paper_low``, as a magnitude) — weaker when it is
    smaller; not reproduced otherwise.
    """
    if not d or d.get("delta") is None:
        return _j(Verdict.NOT_RUN, "not measured")
    pre = d.get("pre")
    if pre is not None and ((positive and pre >= CEILING) or (not positive and pre <= FLOOR)):
        return _j(Verdict.NO_HEADROOM, f"baseline at {'ceiling' if positive else 'floor'} ({100 * pre:.0f}%): it cannot {'rise' if positive else 'fall'}")
    lo, hi = _ci(d)
    if lo is None or hi is None:
        return _j(Verdict.UNDEFINED, d.get("undefined") or "no interval")
    method = d.get("method", "interval")
    if not (lo > 0 if positive else hi < 0):
        return _j(Verdict.NOT_REPRODUCED, f"{method} interval [{100 * lo:+.1f}, {100 * hi:+.1f}] pp does not exclude 0 in the paper's direction")
    if paper_low is not None and abs(d["delta"]) < paper_low:
        return _j(Verdict.WEAKER, f"excludes 0, but {100 * abs(d['delta']):.1f} pp is below the paper's lower bound {100 * paper_low:.0f} pp")
    return _j(Verdict.REPRODUCES, f"{method} interval excludes 0 in the paper's direction")


def stays_zero(d: Mapping[str, Any] | None) -> Judgement:
    """A claim that an intervention never moves a rate (format never spills into B).

    Any prompt that gains breaks "never"; with the rate at its floor in both conditions the
    claim could not have failed for want of the behaviour itself, so it earns nothing.
    """
    if not d or d.get("delta") is None:
        return _j(Verdict.NOT_RUN, "not measured")
    if d.get("n_improved", 0) > 0:
        return _j(Verdict.NOT_REPRODUCED, f"{d['n_improved']} of {d['n']} prompts gained")
    if (d.get("pre") or 0) <= FLOOR and (d.get("post") or 0) <= FLOOR:
        return _j(Verdict.NO_HEADROOM, "0% with and without the intervention: the model never shows the behaviour, so the claim cannot fail")
    return _j(Verdict.REPRODUCES, "no prompt gained, from a baseline above 0%")


def new_measurement(d: Mapping[str, Any] | None) -> Judgement:
    """A measurement the paper did not make: reported, never "reproduced"."""
    if not d or d.get("delta") is None:
        return _j(Verdict.NOT_RUN, "not measured")
    return _j(Verdict.NEW, "the paper did not measure it")


def by_construction(holds: bool | None, *, what: str) -> Judgement:
    """A fact the code guarantees (a masked decoder row is zero): it checks the code, not the paper."""
    if holds is None:
        return _j(Verdict.NOT_RUN, "not measured")
    if holds:
        return _j(Verdict.SANITY_CHECK, f"true by construction ({what})")
    return _j(Verdict.NOT_REPRODUCED, f"should hold by construction ({what}) and does not: a bug")


def pooled_sign(test: Mapping[str, Any] | None, *, positive: bool) -> Judgement:
    """A claimed sign of a pooled mean (interference, sweep gains): needs its test's p, not the sign alone."""
    if not test:
        return _j(Verdict.NOT_RUN, "not measured")
    mean, p = test.get("mean_delta"), test.get("p")
    if p is None or mean is None:
        return _j(Verdict.UNDEFINED, test.get("undefined") or "no test of the sign")
    same = mean > 0 if positive else mean < 0
    if same and p < ALPHA:
        return _j(Verdict.REPRODUCES, f"{test.get('test', 'test')} p = {p:.3g} < {ALPHA}")
    return _j(Verdict.NOT_REPRODUCED, f"mean {'in' if same else 'against'} the paper's direction, p = {p:.3g}")


def feature_count(need: int | None, single: Mapping[str, Any] | None, standard_best: Mapping[str, Any] | None) -> Judgement:
    """"The standard crosscoder needs many features for the single A-exclusive feature's gain."

    Undefined unless there is a single-feature gain to match (its interval above 0) and
    some |S| of the standard crosscoder matched it; reproduces when that |S| is above 1.
    """
    if not single or not standard_best:
        return _j(Verdict.NOT_RUN, "not measured")
    lo, _ = _ci(single)
    if lo is None or lo <= 0:
        return _j(Verdict.UNDEFINED, "no A-exclusive single-feature gain (interval above 0) to match")
    if need is None:
        return _j(Verdict.UNDEFINED, "no |S| of the standard crosscoder matched the gain: the count is not measured")
    if need > 1:
        return _j(Verdict.REPRODUCES, f"{need} features needed")
    return _j(Verdict.NOT_REPRODUCED, "one standard feature matched it")


def null_correlation(boot: Mapping[str, Any] | None, *, max_width: float = 1.0) -> Judgement:
    """"r ≈ 0": the interval must contain 0 and be narrow enough to say so."""
    if not boot:
        return _j(Verdict.UNDEFINED, "no interval across prompts")
    lo, hi = _ci(boot)
    if lo is None or hi is None:
        return _j(Verdict.UNDEFINED, boot.get("undefined") or "no interval")
    if not lo <= 0 <= hi:
        return _j(Verdict.NOT_REPRODUCED, f"interval [{lo:+.2f}, {hi:+.2f}] excludes 0")
    if hi - lo > max_width:
        return _j(Verdict.UNDEFINED, f"interval [{lo:+.2f}, {hi:+.2f}] contains 0 but is too wide to tell")
    return _j(Verdict.REPRODUCES, f"interval [{lo:+.2f}, {hi:+.2f}] contains 0")


def interval_direction(boot: Mapping[str, Any] | None, *, positive: bool = True) -> Judgement:
    """A claimed sign of a quantity with an interval across prompts (standard CC spills more than the DFC)."""
    if not boot:
        return _j(Verdict.UNDEFINED, "no interval across prompts")
    lo, hi = _ci(boot)
    if lo is None or hi is None:
        return _j(Verdict.UNDEFINED, boot.get("undefined") or "no interval")
    if lo > 0 if positive else hi < 0:
        return _j(Verdict.REPRODUCES, f"interval [{100 * lo:+.1f}, {100 * hi:+.1f}] pp excludes 0 in the paper's direction")
    return _j(Verdict.NOT_REPRODUCED, f"interval [{100 * lo:+.1f}, {100 * hi:+.1f}] pp does not exclude 0 in the paper's direction")


def template_detectors(share: float | None, base: float | None, *, prompt_end_markers: Sequence[str] | None) -> Judgement:
    """"Top features fire on template tokens": beyond twice the base rate, on markers that do not end every prompt.

    A marker every ranked tool prompt ends with (``</user>``) sits at the very token the
    ranking reads, so a feature that fires there marks where the prompt ends, not the
    call template; such a share does not count. ``prompt_end_markers`` is None when the run
    did not record which markers end the prompts.
    """
    if share is None or base is None:
        return _j(Verdict.NOT_RUN, "not measured")
    if prompt_end_markers is None:
        return _j(Verdict.UNDEFINED, "the share may count the marker every prompt ends with (not recorded)")
    if share > 2 * base:
        return _j(Verdict.REPRODUCES, f"{100 * share:.0f}% of top activations on template tokens against a base rate of {100 * base:.0f}%"
                  + (f", not counting {', '.join(prompt_end_markers)} (ends every prompt)" if prompt_end_markers else ""))
    return _j(Verdict.NOT_REPRODUCED, f"{100 * share:.0f}% is not above twice the base rate {100 * base:.0f}%")


def separation(ari: float | None, control_ari: float | None, *, margin: float = 0.05) -> Judgement:
    """Decoder geometry: the DFC's partition is recovered better than a random matched partition."""
    if ari is None or control_ari is None:
        return _j(Verdict.NOT_RUN, "not measured")
    if ari > control_ari + margin:
        return _j(Verdict.REPRODUCES, f"ARI {ari:.2f} above the control's {control_ari:.2f} by more than {margin}")
    return _j(Verdict.NOT_REPRODUCED, f"ARI {ari:.2f} within {margin} of the control's {control_ari:.2f}")
