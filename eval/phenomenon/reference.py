"""What the site allows, whatever the dictionary: references fit to A's call on dev.

A bar that fails can be the dictionary's fault (no feature carries the behaviour) or the
site's (the behaviour cannot be read or written at this layer's last prompt token). Two
references fit directly on A's raw residual there, with the label the alarm and the steer
are judged by (A's greedy output contains a tool call, dev split), tell the two apart:

* **probe**: a logistic regression on the whole residual (standardised; the L2 strength
  chosen by 5-fold cross-validation on dev). Its test AUROC is what a linear readout of the
  whole site, fit on the same dev prompts as the alarm, achieves: a single feature read at
  the same site is not expected to do much better, and a bar far above it is out of the
  site's reach.
* **call direction**: the mean residual of the dev prompts A calls on minus that of the
  ones it does not. The steer's test conditions also run this direction at the headline's
  ‖δ‖ on every token the steer edits: when not even the direction fit to the label turns
  calls on, no feature at this site will.

Neither is a control or a bar: they are measured beside the bars so that a negative result
says where it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guardrail.eval.phenomenon.alert import roc_points
from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.features.ranking import auroc

PROBE_CS = tuple(float(c) for c in np.logspace(-4, 1, 11))  # inverse L2 strengths the cross-validation chooses from


@dataclass(frozen=True)
class ProbeCeiling:
    """A dev-fit logistic probe of A's call on the residual at the last prompt token."""

    n_dev: int
    dev_cv_auroc: float  # mean AUROC of the held-out folds at the chosen strength
    c: float  # the chosen inverse L2 strength
    auroc: float | None  # on the test prompts (None: they hold only calls or only non-calls)
    roc: dict  # {"fpr": [...], "tpr": [...]} on the test prompts


def probe_ceiling(x_dev: torch.Tensor, calls_dev: torch.Tensor, x_test: torch.Tensor, calls_test: torch.Tensor,
                  seed: int = 0) -> ProbeCeiling:
    """Fit on dev (``[N, d]`` raw residuals, ``[N]`` bool labels), score the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = calls_dev.numpy().astype(int)
    if y.min() == y.max() or min(y.sum(), len(y) - y.sum()) < 5:
        raise NotMeasurable(f"the probe needs at least 5 dev prompts A calls on and 5 it does not ({int(y.sum())} of {len(y)} call)")
    x = x_dev.numpy()
    probe = lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))  # noqa: E731
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    cv = {c: float(cross_val_score(probe(c), x, y, cv=folds, scoring="roc_auc").mean()) for c in PROBE_CS}
    best = max(cv, key=lambda c: (cv[c], -c))  # the strongest regularisation among equals
    score = probe(best).fit(x, y).decision_function(x_test.numpy())
    label = calls_test.numpy()
    pos, neg = score[label], score[~label]
    auc = float(auroc(torch.tensor(pos)[:, None], torch.tensor(neg)[:, None])[0]) if len(pos) and len(neg) else None
    fpr, tpr = roc_points(score, label)
    return ProbeCeiling(len(y), cv[best], best, auc, {"fpr": fpr, "tpr": tpr})


def call_direction(x_dev: torch.Tensor, calls_dev: torch.Tensor) -> torch.Tensor:
    """``[d]``: mean residual where A calls minus where it does not (dev)."""
    if not bool(calls_dev.any()) or bool(calls_dev.all()):
        raise NotMeasurable("the call direction needs dev prompts A calls on and prompts it does not")
    return x_dev[calls_dev].mean(0) - x_dev[~calls_dev].mean(0)
