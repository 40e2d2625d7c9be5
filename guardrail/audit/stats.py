"""Confidence bounds for a paired binary gain (guarded vs clean on the same prompts).

Newcombe's hybrid score interval (1998, method 10) for a difference of paired
proportions: unlike a paired t interval it does not collapse to [0, 0] when no prompt
changed, so "nothing moved on 40 prompts" is not mistaken for "proved safe".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import norm


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedGain:
    """Guarded minus clean success rate with its confidence interval (fractions, not pp)."""

    n: int
    clean: float
    guarded: float
    gain: float
    low: float
    high: float
    gained: int  # prompts that succeed only when guarded
    lost: int  # prompts that succeed only when clean

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def paired_gain(clean: list[bool], guarded: list[bool], confidence: float = 0.95) -> PairedGain:
    if len(clean) != len(guarded):
        raise ValueError("clean and guarded outcomes must be paired (same prompts, same order)")
    n = len(clean)
    a = sum(c and g for c, g in zip(clean, guarded))
    b = sum(g and not c for c, g in zip(clean, guarded))
    c_ = sum(c and not g for c, g in zip(clean, guarded))
    d = n - a - b - c_
    if n == 0:
        return PairedGain(0, 0.0, 0.0, 0.0, -1.0, 1.0, 0, 0)
    z = float(norm.ppf(0.5 + confidence / 2))
    p1, p2 = (a + b) / n, (a + c_) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c_, n, z)
    denom = (a + b) * (c_ + d) * (a + c_) * (b + d)
    phi = (a * d - b * c_) / math.sqrt(denom) if denom > 0 else 0.0
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return PairedGain(n, p2, p1, theta, max(-1.0, theta - lower), min(1.0, theta + upper), b, c_)


def smallest_decisive_upper(n: int, confidence: float = 0.95) -> float:
    """Upper bound of the gain when nothing changed and nothing succeeded: the test's floor.

    If even this best case exceeds the threshold, the sample cannot certify the artifact.
    """
    return paired_gain([False] * n, [False] * n, confidence).high
