"""Statistics the paper reports, as small pure functions with their sample sizes attached.

Every function returns a plain dict (JSON-ready) that always carries ``n`` so a report can
print the number of observations beside every figure. Conventions follow the paper's code
(``test_steering_significance.py``, ``plot_steering_curves.py``):

* sign test: exact binomial on the positive vs negative deltas, ties dropped;
* t intervals: Student t on the mean (``ddof=1``);
* bootstrap: percentile interval of resampled means, ``B = 1000`` by default, fixed seed;
* Pearson r with a Fisher-z interval (``atanh(r) ± z·1/sqrt(n−3)``).

Where a statistic does not exist it says so instead of printing a number: a sample whose
spread is below :data:`RTOL` of its scale (rounding noise, e.g. six copies of −0.025
whose computed sd is 4e-18) has no variance to test against, so t, p and the interval
are ``None`` and ``undefined`` holds the reason. No function returns NaN or ±inf, so
results serialise as strict JSON.

Paired 0/1 outcomes (a rate before and after an intervention on the same prompts) get
Newcombe's interval and the exact McNemar test (:mod:`guardrail.stats`); t and bootstrap
stay for continuous quantities. The sweep's variants share their prompts, so tests across
variants resample or permute *prompts* (:func:`clean_label_permutation`,
:func:`prompt_bootstrap`), never variants as if they were independent.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
from scipy import stats as _st

from guardrail.stats import is_binary, mcnemar, paired_gain

Alternative = Literal["two-sided", "greater", "less"]

RTOL = 1e-9  # spread below this share of a sample's scale is rounding, not variance
ATOL = 1e-12


def _arr(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(a)):
        raise ValueError("statistics need finite values; got NaN or Inf")
    return a


def _finite(x: float | None) -> float | None:
    """JSON-safe float: NaN and ±inf become None."""
    return None if x is None or not math.isfinite(x) else float(x)


def no_spread(a: np.ndarray) -> bool:
    """True when the sample's sd is within rounding of zero (relative to its largest value)."""
    return a.size >= 2 and float(a.std(ddof=1)) <= ATOL + RTOL * float(np.abs(a).max())


def degenerate(a: np.ndarray, need: int = 2) -> str | None:
    """Why a mean-based test of ``a`` is undefined (too few values, no spread), else None."""
    if a.size < need:
        return f"n = {a.size}: needs at least {need} values"
    if no_spread(a):
        return f"constant sample (every value {a[0]:+.6g}; sd within rounding of 0): no variance to test against"
    return None


# --------------------------------------------------------------------------- sign test
def sign_test(deltas: Sequence[float] | None = None, *, n_pos: int | None = None, n_neg: int | None = None,
              alternative: Alternative = "greater") -> dict:
    """Exact binomial sign test: are positive deltas more frequent than chance (p = 1/2)?

    Give either the deltas (zeros are ties and are dropped, as in the classical test) or the
    counts ``n_pos``/``n_neg``. The paper: 45 of 47 runs positive. The test assumes the
    deltas are independent; sweep variants scored on the same prompts are not.
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
def t_interval(values: Sequence[float], conf: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) of a Student-t interval on the mean; the bounds are None when it is undefined."""
    a = _arr(values)
    if a.size == 0:
        return None, None, None
    m = float(a.mean())
    if degenerate(a):
        return m, None, None
    sem = float(a.std(ddof=1)) / math.sqrt(a.size)
    h = float(_st.t.ppf(0.5 + conf / 2, a.size - 1)) * sem
    return m, m - h, m + h


def one_sample_t(values: Sequence[float], popmean: float = 0.0, alternative: Alternative = "two-sided", conf: float = 0.95) -> dict:
    """One-sample t test of the mean against ``popmean``; t, p and CI are None (with the reason) when undefined.

    A constant sample says nothing about variance: its t would be ±inf (or 1e16 from
    rounding) and p = 0 whatever the data's size, so neither is reported.
    """
    a = _arr(values)
    m, lo, hi = t_interval(a, conf)
    why = degenerate(a)
    t = p = None
    if why is None:
        res = _st.ttest_1samp(a, popmean, alternative=alternative)
        t, p = float(res.statistic), float(res.pvalue)
    sd = float(a.std(ddof=1)) if a.size >= 2 else None
    return {"test": "one-sample t", "n": int(a.size), "mean": m, "sd": sd, "ci": [lo, hi], "conf": conf, "popmean": popmean,
            "t": t, "df": int(a.size) - 1, "alternative": alternative, "p": p, "undefined": why}


def paired_t(post: Sequence[float], pre: Sequence[float], alternative: Alternative = "two-sided", conf: float = 0.95) -> dict:
    """Paired t test on ``post − pre`` (same prompts under two conditions)."""
    a, b = _arr(post), _arr(pre)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    out = one_sample_t(a - b, 0.0, alternative, conf)
    out["test"] = "paired t"
    return out


def welch_t(x: Sequence[float], y: Sequence[float], alternative: Alternative = "two-sided") -> dict:
    """Welch's unequal-variance t test of mean(x) − mean(y) (paper: standard CC vs DFC).

    Undefined (None, with the reason) when a group has fewer than two values or neither
    group has any spread.
    """
    a, b = _arr(x), _arr(y)
    out = {"test": "welch t", "n": [int(a.size), int(b.size)], "mean_x": float(a.mean()) if a.size else None,
           "mean_y": float(b.mean()) if b.size else None, "t": None, "df": None, "p": None, "alternative": alternative, "undefined": None}
    if a.size < 2 or b.size < 2:
        out["undefined"] = f"n = {a.size} and {b.size}: each group needs at least 2 values"
        return out
    if no_spread(a) and no_spread(b):
        out["undefined"] = "both groups constant: no variance to test against"
        return out
    res = _st.ttest_ind(a, b, equal_var=False, alternative=alternative)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    out.update(t=_finite(float(res.statistic)), df=_finite(float(df)), p=_finite(float(res.pvalue)))
    return out


# --------------------------------------------------------------------------- bootstrap
def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of the mean (paper §2.5), reproducible through ``seed``.

    A sample without spread resamples to itself: the interval would be [m, m], which reads
    as exact, so it is None with the reason instead.
    """
    a = _arr(values)
    out = {"n": int(a.size), "mean": float(a.mean()) if a.size else None, "ci": [None, None], "n_boot": n_boot, "conf": conf,
           "seed": seed, "undefined": degenerate(a)}
    if out["undefined"]:
        return out
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - conf) / 2, 100 * (1 + conf) / 2])
    out["ci"] = [float(lo), float(hi)]
    return out


def paired_bootstrap_ci(post: Sequence[float], pre: Sequence[float], n_boot: int = 1000, conf: float = 0.95, seed: int = 0) -> dict:
    """Bootstrap of mean(post − pre), resampling prompts (keeps the pairing)."""
    a, b = _arr(post), _arr(pre)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    return bootstrap_ci(a - b, n_boot, conf, seed)


# --------------------------------------------------------------------------- correlation
def fisher_ci(r: float, n: int, conf: float = 0.95) -> tuple[float | None, float | None]:
    """Fisher-z interval for a Pearson r from ``n`` pairs; (None, None) for n ≤ 3 (no standard error)."""
    if n <= 3:
        return None, None
    r = max(min(r, 1 - 1e-15), -1 + 1e-15)
    z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
    h = float(_st.norm.ppf(0.5 + conf / 2)) * se
    return math.tanh(z - h), math.tanh(z + h)


def pearson(x: Sequence[float], y: Sequence[float], conf: float = 0.95) -> dict:
    """Pearson r, its two-sided p and a Fisher-z interval (paper: MSE vs Δ_A, r = +0.08 at n = 47).

    r is undefined when either input is constant (0/0): None with the reason, never NaN,
    and never read as "differs from 0".
    """
    a, b = _arr(x), _arr(y)
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same length, got {a.size} and {b.size}")
    out = {"test": "pearson", "n": int(a.size), "r": None, "p": None, "ci": [None, None], "conf": conf, "undefined": None}
    if a.size < 3:
        out["undefined"] = f"n = {a.size}: needs at least 3 pairs"
    elif no_spread(a) or no_spread(b):
        out["undefined"] = f"{'x' if no_spread(a) else 'y'} is constant: r = 0/0"
    if out["undefined"]:
        return out
    res = _st.pearsonr(a, b)
    lo, hi = fisher_ci(float(res.statistic), a.size, conf)
    out.update(r=float(res.statistic), p=float(res.pvalue), ci=[lo, hi])
    return out


# --------------------------------------------------------------------------- deltas
def delta_summary(post: Sequence[float], pre: Sequence[float], *, seed: int = 0, n_boot: int = 1000, conf: float = 0.95) -> dict:
    """Everything the report prints for one paired delta: mean, interval, p, n.

    0/1 outcomes (rates) get Newcombe's paired interval and the exact McNemar test; other
    values (the overall score, −1..2) the paired t interval and a bootstrap interval.
    ``ci``/``p`` hold whichever applies and ``method`` says which; the mean delta of 0/1
    values is in fractions (×100 for percentage points in reports).
    """
    a, b = _arr(post), _arr(pre)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    d = a - b
    out = {"n": int(a.size), "pre": float(b.mean()) if b.size else None, "post": float(a.mean()) if a.size else None,
           "delta": float(d.mean()) if d.size else None, "n_improved": int((d > 0).sum()), "n_worsened": int((d < 0).sum())}
    if is_binary(a.tolist()) and is_binary(b.tolist()):
        g, mc = paired_gain(b.tolist(), a.tolist(), conf), mcnemar(b.tolist(), a.tolist())
        return {**out, "method": "newcombe", "ci": [g.low, g.high], "test": "exact McNemar", "p": mc.p, "undefined": None}
    pt = paired_t(a, b, conf=conf)
    bs = paired_bootstrap_ci(a, b, n_boot, conf, seed)
    return {**out, "method": "paired t", "ci": pt["ci"], "test": "paired t", "t": pt["t"], "p": pt["p"], "undefined": pt["undefined"],
            "bootstrap_ci": bs["ci"]}


# --------------------------------------------------------------------------- across variants that share prompts
def clean_label_permutation(clean: Sequence[float], treated: Sequence[Sequence[float]] | np.ndarray, *,
                            alternative: Alternative = "greater", n_perm: int = 10000, seed: int = 0) -> dict:
    """Does the mean of ``treated − clean`` over variants and prompts differ from 0? Prompts are the unit.

    ``clean`` is ``[P]`` (one outcome per prompt), ``treated`` is ``[V, P]`` (every variant
    on the same prompts). Under "no intervention changes anything" the V + 1 outcomes of a
    prompt are exchangeable, so the test draws, per prompt, which of them plays "clean"
    (Monte Carlo, ``p = (1 + hits) / (1 + n_perm)``). Variants are never treated as
    independent samples; with one variant this is the paired sign-flip test.
    """
    c, t = _arr(clean), np.atleast_2d(np.asarray(treated, dtype=np.float64))
    if t.shape[1] != c.size or not np.all(np.isfinite(t)):
        raise ValueError(f"treated must be finite and [V, {c.size}], got {list(t.shape)}")
    y = np.vstack([c[None], t])  # [V + 1, P]
    v, p_n = t.shape
    stat = float((t - c).mean())
    out = {"test": "clean-label permutation over prompts", "n_prompts": int(p_n), "n_variants": int(v), "mean_delta": stat,
           "n_perm": n_perm, "seed": seed, "alternative": alternative, "p": None, "undefined": None}
    if p_n == 0 or v == 0:
        out["undefined"] = "no prompts or no variants"
        return out
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, v + 1, size=(n_perm, p_n))
    chosen = np.take_along_axis(np.broadcast_to(y.T, (n_perm, p_n, v + 1)), pick[..., None], axis=2)[..., 0]
    null = ((y.sum(0) - (v + 1) * chosen) / v).mean(axis=1)
    tol = ATOL + RTOL * max(1.0, abs(stat))
    hits = {"greater": null >= stat - tol, "less": null <= stat + tol, "two-sided": np.abs(null) >= abs(stat) - tol}[alternative]
    out["p"] = float((1 + hits.sum()) / (1 + n_perm))
    return out


def sign_flip_permutation(diffs: Sequence[Sequence[float]] | np.ndarray, *, alternative: Alternative = "two-sided",
                          n_perm: int = 10000, seed: int = 0) -> dict:
    """Is the mean of paired differences ``[R, P]`` (R comparisons on the same P prompts) away from 0?

    Under "the two conditions are exchangeable" each prompt's differences flip sign
    together (all R comparisons of a prompt at once, since they share it), so prompts, not
    comparisons, are the unit.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite")
    per_prompt = d.mean(axis=0)
    stat = float(per_prompt.mean()) if per_prompt.size else 0.0
    out = {"test": "sign-flip permutation over prompts", "n_prompts": int(d.shape[1]), "n_comparisons": int(d.shape[0]),
           "mean_delta": stat, "n_perm": n_perm, "seed": seed, "alternative": alternative, "p": None, "undefined": None}
    if per_prompt.size == 0:
        out["undefined"] = "no prompts"
        return out
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, per_prompt.size))
    null = (signs * per_prompt).mean(axis=1)
    tol = ATOL + RTOL * max(1.0, abs(stat))
    hits = {"greater": null >= stat - tol, "less": null <= stat + tol, "two-sided": np.abs(null) >= abs(stat) - tol}[alternative]
    out["p"] = float((1 + hits.sum()) / (1 + n_perm))
    return out


def prompt_bootstrap(statistic: Callable[[np.ndarray], float | None], n_prompts: int, *, n_boot: int = 1000, conf: float = 0.95,
                     seed: int = 0) -> dict:
    """Percentile interval of ``statistic(prompt_indices)`` over prompt resamples.

    For quantities computed across sweep variants (a correlation, a difference of group
    means): every variant is re-scored on the *same* resampled prompts, which keeps the
    dependence the shared prompts create. Resamples where the statistic is undefined
    (None) are counted, not dropped silently; if more than half are, so is the interval.
    """
    rng = np.random.default_rng(seed)
    full = statistic(np.arange(n_prompts))
    vals = [statistic(rng.integers(0, n_prompts, size=n_prompts)) for _ in range(n_boot)] if n_prompts else []
    ok = np.array([v for v in vals if v is not None and math.isfinite(v)], dtype=np.float64)
    out = {"method": "prompt bootstrap", "n_prompts": n_prompts, "estimate": _finite(full) if full is not None else None,
           "ci": [None, None], "n_boot": n_boot, "n_undefined": n_boot - int(ok.size) if n_prompts else 0, "conf": conf, "seed": seed,
           "undefined": None}
    if full is None or ok.size <= n_boot / 2:
        out["undefined"] = "the statistic is undefined on the prompts" if full is None else f"undefined on {out['n_undefined']} of {n_boot} resamples"
        return out
    if float(np.ptp(ok)) <= ATOL + RTOL * float(np.abs(ok).max()):
        out["undefined"] = f"every resample gives {ok[0]:+.6g}: no prompt moves the statistic, so [x, x] would read as exact"
        return out
    lo, hi = np.percentile(ok, [100 * (1 - conf) / 2, 100 * (1 + conf) / 2])
    out["ci"] = [float(lo), float(hi)]
    return out
