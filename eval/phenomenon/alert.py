"""An alarm that sees it coming: one A-exclusive feature at the last prompt token predicts A's call.

Under the hedge protocol every prompt carries the tool template and A calls on some and
not on others, so a feature that only detects the template scores AUROC 0.5 here. The
score is what the ``alert`` policy compares with its threshold on a served A: the
feature's value in the single-model encoding after the sparsity rule, at the last prompt
token, before any output. The feature (best dev AUROC among live A-exclusive features) and
its threshold (best Youden J on dev) are chosen on the dev split; the test split reports
AUROC, ordinary prompts with no tools give the false-positive rate at that threshold, and
BFCL irrelevance prompts under the deployment protocol show how often the alarm and A's
calls go together where no listed tool applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.features import interventions as iv
from guardrail.features.ranking import auroc

if TYPE_CHECKING:
    from guardrail.eval.phenomenon.reference import ProbeCeiling


def scores(view: iv.DictionaryView, xa: torch.Tensor) -> torch.Tensor:
    """Every feature's single-model code ``[N, D]`` at the rows given (A's raw activations)."""
    return iv.encode(view, xa)


@dataclass(frozen=True)
class AlertChoice:
    feature: int
    threshold: float
    dev_auroc: float
    dev_n_pos: int
    dev_n_neg: int


def choose(f_dev: torch.Tensor, calls_dev: torch.Tensor, candidates: list[int]) -> AlertChoice:
    """The candidate with the best dev AUROC, and the threshold with the best Youden J there."""
    if not candidates:
        raise NotMeasurable("no live A-exclusive feature to alert on")
    pos, neg = f_dev[calls_dev][:, candidates], f_dev[~calls_dev][:, candidates]
    if len(pos) == 0 or len(neg) == 0:
        raise NotMeasurable(f"A must call on some dev prompts and not on others to choose an alarm ({len(pos)} calls, {len(neg)} not)")
    auc = auroc(pos, neg)
    best = int(torch.argmax(auc))
    col = f_dev[:, candidates[best]].numpy()
    return AlertChoice(candidates[best], youden_threshold(col, calls_dev.numpy()), float(auc[best]), len(pos), len(neg))


def youden_threshold(score: np.ndarray, label: np.ndarray) -> float:
    """The cut (alert when score > cut) maximising TPR − FPR; cuts sit between observed values."""
    values = np.unique(score)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2]) if len(values) > 1 else values - 1e-6
    best, best_j = float(cuts[0]), -np.inf
    for c in cuts:
        alert = score > c
        j = alert[label].mean() - alert[~label].mean()
        if j > best_j:
            best, best_j = float(c), j
    return max(best, 0.0)


def roc_points(score: np.ndarray, label: np.ndarray) -> tuple[list[float], list[float]]:
    """(FPR, TPR) at every cut, from alerting on nothing to alerting on everything."""
    order = np.argsort(-score, kind="stable")
    s, y = score[order], label[order].astype(bool)
    tps, fps = np.cumsum(y), np.cumsum(~y)
    keep = np.r_[np.diff(s) != 0, True]
    tpr = np.r_[0.0, tps[keep] / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps[keep] / max((~y).sum(), 1)]
    return fpr.tolist(), tpr.tolist()


@dataclass(frozen=True)
class AlertResult:
    feature: int
    threshold: float
    dev_auroc: float
    n_pos: int
    n_neg: int
    auroc: float | None  # None: the test prompts hold only calls or only non-calls
    tpr: float | None  # at the threshold, test hedge prompts where A calls
    fpr_hedge: float | None  # at the threshold, test hedge prompts where A does not call
    n_ordinary: int
    fpr_ordinary: float | None
    n_irrelevance: int
    fire_rate_irrelevance: float | None
    call_rate_irrelevance: float | None
    roc: dict  # {"fpr": [...], "tpr": [...]} on the test hedge prompts
    example_call: str | None  # a test hedge prompt where A calls and the alarm fired first (else one where A calls)
    probe: ProbeCeiling | None  # the site's ceiling (no bar; None when not measurable)

    @classmethod
    def of(cls, choice: AlertChoice, f_test: torch.Tensor, calls_test: torch.Tensor, f_ordinary: torch.Tensor,
           f_irrelevance: torch.Tensor, calls_irrelevance: torch.Tensor, test_ids: list[str], probe: ProbeCeiling | None = None) -> "AlertResult":
        j, t = choice.feature, choice.threshold
        col = f_test[:, j]
        pos, neg = col[calls_test], col[~calls_test]
        auc = float(auroc(pos[:, None], neg[:, None])[0]) if len(pos) and len(neg) else None
        fpr, tpr = roc_points(col.numpy(), calls_test.numpy())
        mean = lambda m: float(m.float().mean()) if m.numel() else None  # noqa: E731
        return cls(j, t, choice.dev_auroc, len(pos), len(neg), auc, mean(pos > t), mean(neg > t),
                   len(f_ordinary), mean(f_ordinary[:, j] > t), len(f_irrelevance), mean(f_irrelevance[:, j] > t),
                   mean(calls_irrelevance), {"fpr": fpr, "tpr": tpr}, _example(test_ids, calls_test, col > t), probe)


def _example(ids: list[str], calls: torch.Tensor, fired: torch.Tensor) -> str | None:
    for want in (calls & fired, calls):
        hits = want.nonzero().flatten().tolist()
        if hits:
            return ids[hits[0]]
    return None
