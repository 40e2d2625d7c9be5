"""Statistics the paper reports, as small pure functions with their sample sizes attached.

Every function returns a plain dict (JSON-ready) that always carries ``n`` so a report can
print the number of observations beside every figure. Conventions follow the paper's code
(``test_steering_significance.py``, ``plot_steering_curves.py``):

* sign test: exact binomial on the positive vs negative deltas, ties dropped;
* t intervals: Student t on the mean (``ddof=1``);
* bootstrap: percentile interval of resampled means, ``B = 1000`` by default, fixed seed;
* Pearson r with a Fisher-z interval (``atanh(r) ± z·1/sqrt(n−3)``).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
from scipy import stats as _st

Alternative = Literal["two-sided", "greater", "less"]


def _arr(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError("statistics need finite values; got NaN or Inf")
    return a


def _clean(x: float) -> float | None:
    """JSON-safe float: NaN becomes None."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# --------------------------------------------------------------------------- sign test
def sign_test(deltas: Sequence[float] | None = None, *, n_pos: int | None = None, n_neg: int | None = None,
              alternative: Alternative = "greater") -> dict:
    """Exact binomial sign test: are positive deltas more frequent than chance (p = 1/2)?

    Give either the deltas (zeros are ties and are dropped, as in the classical test) or the
    counts ``n_pos``/``n_neg``. The paper: 45 of 47 runs positive.
    """
    if deltas is not None:
        a = _arr(deltas)
        n_pos, n_neg = int((a > 0).sum()), int((a < 0).sum())
        n_ties = int((a == 0).sum())
    else:
        if n_pos is None or n_neg is None:
            raise ValueError("give deltas, or both n_pos and n_neg")
        if n_pos < 0 or n_neg < 0:
            raise ValueError("counts must be >= 0")
        n_ties = 0
    n = n_pos + n_neg
    p = float(_st.binomtest(n_pos, n, 0.5, alternative=alternative).pvalue) if n else 1.0
    return {"test": "sign", "n": n + n_ties, "n_pos": n_pos, "n_neg": n_neg, "n_ties": n_ties, "alternative": alternative, "p": p}


# --------------------------------------------------------------------------- t tests
def t_interval(values: Sequence[float], conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of a Student-t confidence interval on the mean."""
    a = _arr(values)
    n = a.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(a.mean())
    if n < 2:
        return m, float("nan"), float("nan")
    sem = float(a.std(ddof=1)) / math.sqrt(n)
    h = float(_st.t.ppf(0.5 + conf / 2, n - 1)) * sem
    return m, m - h, m + h


def one_sample_t(values: Sequence[float], popmean: float = 0.0, alternative: Alternative = "two-sided", conf: float = 0.95) -> dict:
    """One-sample t test of the mean against ``popmean`` (paper: Δ_B across runs vs 0)."""
    a = _arr(values)
    n = a.size
    m, lo, hi = t_interval(a, conf)
    if n < 2 or float(a.std(ddof=1)) == 0.0:
        t, p = float("nan"), float("nan")
        if n >= 2:  # constant sample: the mean is exact, no variance to test against
            t = math.copysign(math.inf, m - popmean) if m != popmean else 0.0
            p = 0.0 if m != popmean else 1.0
    else:
        res = _st.ttest_1samp(a, popmean, alternative=alternative)
        t, p = float(res.statistic), float(res.pvalue)
    sd = float(a.std(ddof=1)) if n >= 2 else float("nan")
    return {"test": "one-sample t", "n": n, "mean": _clean(m), "sd": _clean(sd), "ci": [_clean(lo), _clean(hi)], "conf": conf,
            "popmean": popmean, "t": _clean(t), "df": n - 1, "alternative": alternative, "p": _clean(p)}


def paired_t(post: Sequence[float], pre: Sequence[float], alternative: Alternative = "two-sided", conf: float = 0.95) -> dict:
    """Paired t test on ``post − pre`` (same prompts under two conditions)."""
    a, b = _arr(post), _arr(pre)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    out = one_sample_t(a - b, 0.0, alternative, conf)
    out["test"] = "paired t"
    return out


def welch_t(x: Sequence[float], y: Sequence[float], alternative: Alternative = "two-sided") -> dict:
    """Welch's unequal-variance t test of mean(x) − mean(y) (paper: standard CC vs DFC)."""
    a, b = _arr(x), _arr(y)
    if a.size < 2 or b.size < 2:
        return {"test": "welch t", "n": [int(a.size), int(b.size)], "mean_x": _clean(float(a.mean()) if a.size else float("nan")),
                "mean_y": _clean(float(b.mean()) if b.size else float("nan")), "t": None, "df": None, "p": None, "alternative": alternative}
    res = _st.ttest_ind(a, b, equal_var=False, alternative=alternative)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if (va + vb) > 0 else float("nan")
    return {"test": "welch t", "n": [int(a.size), int(b.size)], "mean_x": float(a.mean()), "mean_y": float(b.mean()),
            "t": _clean(float(res.statistic)), "df": _clean(float(df)), "alternative": alternative, "p": _clean(float(res.pvalue))}


# --------------------------------------------------------------------------- bootstrap
def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean (paper §2.5), reproducible through ``seed``."""
    a = _arr(values)
    n = a.size
    if n == 0:
        return {"n": 0, "mean": None, "ci": [None, None], "n_boot": n_boot, "conf": conf, "seed": seed}
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - conf) / 2, 100 * (1 + conf) / 2])
    return {"n": n, "mean": float(a.mean()), "ci": [float(lo), float(hi)], "n_boot": n_boot, "conf": conf, "seed": seed}


def paired_bootstrap_ci(post: Sequence[float], pre: Sequence[float], n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap of mean(post − pre), resampling prompts (keeps the pairing)."""
    a, b = _arr(post), _arr(pre)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    return bootstrap_ci(a - b, n_boot, conf, seed)


# --------------------------------------------------------------------------- correlation
def fisher_ci(r: float, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval for a Pearson r from ``n`` pairs (needs n > 3)."""
    if n <= 3:
        return float("nan"), float("nan")
    r = max(min(r, 1 - 1e-15), -1 + 1e-15)
    z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
    h = float(_st.norm.ppf(0.5 + conf / 2)) * se
    return math.tanh(z - h), math.tanh(z + h)


def pearson(x: Sequence[float], y: Sequence[float], conf: float = 0.95) -> dict:
    """Pearson r, its two-sided p and a Fisher-z interval (paper: MSE vs Δ_A, r = +0.08 at n = 47)."""
    a, b = _arr(x), _arr(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    n = a.size
    if n < 3 or a.std() == 0 or b.std() == 0:
        return {"test": "pearson", "n": n, "r": None, "p": None, "ci": [None, None], "conf": conf}
    res = _st.pearsonr(a, b)
    lo, hi = fisher_ci(float(res.statistic), n, conf)
    return {"test": "pearson", "n": n, "r": float(res.statistic), "p": float(res.pvalue), "ci": [_clean(lo), _clean(hi)], "conf": conf}


# --------------------------------------------------------------------------- deltas
def delta_summary(post: Sequence[float], pre: Sequence[float], *, seed: int = 0, n_boot: int = 1000, conf: float = 0.95) -> dict:
    """Everything the report prints for one paired delta: mean, paired-t CI and p, bootstrap CI, n.

    Per-prompt values are 0/1 (accuracies) or −1..2 (overall score); the mean delta of 0/1
    values is in fractions (×100 for percentage points in reports).
    """
    a, b = _arr(post), _arr(pre)
    pt = paired_t(a, b, conf=conf)
    bs = paired_bootstrap_ci(a, b, n_boot, conf, seed)
    d = a - b
    return {
        "n": int(a.size),
        "pre": float(b.mean()) if b.size else None,
        "post": float(a.mean()) if a.size else None,
        "delta": float(d.mean()) if d.size else None,
        "t_ci": pt["ci"],
        "t": pt["t"],
        "p": pt["p"],
        "bootstrap_ci": bs["ci"],
        "n_improved": int((d > 0).sum()),
        "n_worsened": int((d < 0).sum()),
    }
