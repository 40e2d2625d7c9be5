"""Confidence bounds for a paired binary gain (guarded vs clean on the same prompts).

The interval is :func:`guardrail.stats.paired_gain` (Newcombe 1998, method 10), the one
implementation the eval harness uses too: unlike a paired t interval it does not collapse
to [0, 0] when no prompt changed, so "nothing moved on 40 prompts" is not mistaken for
"proved safe". The audit's power (:func:`minimum_detectable_gain`) is read off the same
interval, so the number it reports is the one its gate would act on.
"""

from __future__ import annotations

from guardrail.stats import PairedGain, paired_gain, wilson

__all__ = ["PairedGain", "minimum_detectable_gain", "paired_gain", "prompts_to_certify", "smallest_decisive_upper", "wilson"]


def smallest_decisive_upper(n: int, confidence: float = 0.95) -> float:
    """Upper bound of the gain when nothing changed and nothing succeeded: the test's floor.

    If even this best case exceeds the threshold, the sample cannot certify the artifact.
    """
    return paired_gain([False] * n, [False] * n, confidence).high


def prompts_to_certify(limit: float, confidence: float = 0.95, start: int = 10) -> int | None:
    """The first sample size (from ``start``, in steps of 10) whose floor is within ``limit``;
    None when none under 100 000 is."""
    return next((m for m in range(start, 100_000, 10) if smallest_decisive_upper(m, confidence) <= limit), None)


def _lower_bound(n: int, solved: int, gained: int, confidence: float) -> float:
    """Newcombe lower bound when B solves ``solved`` prompts and the threat adds ``gained``, losing none."""
    before = [True] * solved + [False] * (n - solved)
    after = [True] * (solved + gained) + [False] * (n - solved - gained)
    return paired_gain(before, after, confidence).low


def minimum_detectable_gain(n: int, baseline: float, limit: float, confidence: float = 0.95) -> float | None:
    """Smallest gain (a fraction) that ``n`` prompts would prove to exceed ``limit``.

    With ``s = round(baseline · n)`` prompts that B already solves, a threat that newly solves
    ``k`` prompts and loses none has the Newcombe lower bound ``L(s, k)``; the audit FAILS an
    artifact on proof when ``L > limit``, so

        MDE = min { k / n : L(s, k) > limit },   k = 0 … n − s,

    found by bisection (``L`` grows with ``k``). These are the expected counts of a gain of
    ``k / n``: an artifact with that true gain is proven leaky in about half of the audits,
    and any lost prompt raises the bar. ``None`` when not even ``k = n − s`` would do.
    """
    if n <= 0:
        return None
    solved = min(n, max(0, round(baseline * n)))
    lo, hi = 0, n - solved
    if _lower_bound(n, solved, hi, confidence) <= limit:
        return None
    while lo < hi:  # invariant: L(hi) > limit
        mid = (lo + hi) // 2
        if _lower_bound(n, solved, mid, confidence) > limit:
            hi = mid
        else:
            lo = mid + 1
    return hi / n
