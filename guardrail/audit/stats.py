"""Confidence bounds for a paired binary gain (guarded vs clean on the same prompts).

The interval is :func:`guardrail.stats.paired_gain` (Newcombe 1998, method 10), the one
implementation the eval harness uses too: unlike a paired t interval it does not collapse
to [0, 0] when no prompt changed, so "nothing moved on 40 prompts" is not mistaken for
"proved safe".
"""

from __future__ import annotations

from guardrail.stats import PairedGain, paired_gain, wilson

__all__ = ["PairedGain", "paired_gain", "smallest_decisive_upper", "wilson"]


def smallest_decisive_upper(n: int, confidence: float = 0.95) -> float:
    """Upper bound of the gain when nothing changed and nothing succeeded: the test's floor.

    If even this best case exceeds the threshold, the sample cannot certify the artifact.
    """
    return paired_gain([False] * n, [False] * n, confidence).high
