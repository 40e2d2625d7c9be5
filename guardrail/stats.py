"""Statistics of paired binary outcomes (the same prompts scored under two conditions).

Both the release audit and the eval harness compare a success rate with and without an
intervention on the same prompts. A paired t or percentile-bootstrap interval on 0/1
outcomes collapses to [0, 0] when no prompt changed, which reads as "proved exactly
zero"; the intervals here do not:

* :func:`paired_gain` — Newcombe's hybrid score interval for a difference of paired
  proportions (Newcombe 1998, *Stat. Med.* 17:2635, method 10): Wilson score limits of
  each rate, combined with the correlation of the pair;
* :func:`mcnemar` — the exact McNemar test: under "no effect" each discordant prompt is
  equally likely to go either way, so the count that improved is Binomial(b + c, 1/2).

This module sits in the library, not in the harness (``eval/``), so the library's audit can
use it without importing the harness; the harness re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from scipy.stats import binomtest, norm

Alternative = Literal["two-sided", "greater", "less"]


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials at normal quantile ``z``.

    With no trials nothing is known: the interval is the whole [0, 1].
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedCounts:
    """The paired 2×2 table: ``both`` succeed, only ``gained`` (after), only ``lost`` (before), ``neither``."""

    both: int
    gained: int
    lost: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.gained + self.lost + self.neither

    @classmethod
    def of(cls, before: Sequence[bool | int | float], after: Sequence[bool | int | float]) -> "PairedCounts":
        """Counts from two aligned 0/1 outcome lists (same prompts, same order)."""
        if len(before) != len(after):
            raise ValueError(f"paired outcomes must have the same length, got {len(before)} and {len(after)}")
        pairs = [(_binary(x), _binary(y)) for x, y in zip(before, after)]
        return cls(both=sum(x and y for x, y in pairs), gained=sum(y and not x for x, y in pairs),
                   lost=sum(x and not y for x, y in pairs), neither=sum(not x and not y for x, y in pairs))


def _binary(v: bool | int | float) -> bool:
    if v not in (0, 1):
        raise ValueError(f"paired binary statistics need 0/1 outcomes, got {v!r}")
    return bool(v)


def is_binary(values: Sequence[float]) -> bool:
    """True when every value is 0 or 1 (a rate's per-prompt outcomes)."""
    return all(v in (0, 1) for v in values)


@dataclass(frozen=True)
class PairedGain:
    """After minus before success rate with its Newcombe interval (fractions, not pp)."""

    n: int
    clean: float  # success rate before (the clean condition)
    guarded: float  # success rate after (the intervened condition)
    gain: float
    low: float
    high: float
    gained: int  # prompts that succeed only after
    lost: int  # prompts that succeed only before
    confidence: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)


def _phi(t: PairedCounts) -> float:
    """Newcombe's correlation term, with his continuity correction of the numerator.

    ``A = both·neither − gained·lost`` is shrunk towards 0 by ``n/2`` when positive (and
    set to 0 in between), as in method 10; an empty margin gives 0.
    """
    margins = (t.both + t.gained) * (t.lost + t.neither) * (t.both + t.lost) * (t.gained + t.neither)
    if margins == 0:
        return 0.0
    a = t.both * t.neither - t.gained * t.lost
    if a > t.n / 2:
        a -= t.n / 2
    elif a >= 0:
        a = 0.0
    return a / math.sqrt(margins)


def paired_gain(clean: Sequence[bool | int | float], guarded: Sequence[bool | int | float], confidence: float = 0.95) -> PairedGain:
    """Newcombe (1998, method 10) interval of ``mean(guarded) − mean(clean)`` on paired 0/1 outcomes.

    No prompt changing does not give [0, 0]: with n prompts and nothing moved the interval
    still spans what n prompts cannot rule out. With n = 0 it is the whole [−1, 1].
    """
    t = PairedCounts.of(clean, guarded)
    if t.n == 0:
        return PairedGain(0, 0.0, 0.0, 0.0, -1.0, 1.0, 0, 0, confidence)
    z = float(norm.ppf(0.5 + confidence / 2))
    p1, p2 = (t.both + t.gained) / t.n, (t.both + t.lost) / t.n  # after, before
    l1, u1 = wilson(t.both + t.gained, t.n, z)
    l2, u2 = wilson(t.both + t.lost, t.n, z)
    phi = _phi(t)
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return PairedGain(t.n, p2, p1, theta, max(-1.0, theta - down), min(1.0, theta + up), t.gained, t.lost, confidence)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on the discordant prompts (``gained`` vs ``lost``)."""

    n_discordant: int
    gained: int
    lost: int
    alternative: Alternative
    p: float

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(clean: Sequence[bool | int | float], guarded: Sequence[bool | int | float], alternative: Alternative = "two-sided") -> McNemar:
    """Exact McNemar test: is ``gained`` out of ``gained + lost`` discordant prompts away from 1/2?

    ``alternative="greater"`` asks whether the intervention gains more prompts than it
    loses. With no discordant prompt there is no evidence either way: p = 1.
    """
    t = PairedCounts.of(clean, guarded)
    m = t.gained + t.lost
    p = float(binomtest(t.gained, m, 0.5, alternative=alternative).pvalue) if m else 1.0
    return McNemar(m, t.gained, t.lost, alternative, p)
