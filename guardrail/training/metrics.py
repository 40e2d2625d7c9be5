"""Evaluation metrics of a crosscoder, per model and per partition.

Reported: MSE and fraction of variance unexplained (FVU) per model, L0 overall and per
partition, dead fraction and fire rates per partition (exclusive features dying is the
DFC's known failure), the relative decoder norm histogram, and partition integrity.
"""

from __future__ import annotations

from typing import Any

import torch

from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.dictionary.partition import PARTITION_NAMES

MODELS = ("A", "B")


@torch.no_grad()
def evaluate(cc: Crosscoder, x: torch.Tensor, batch_size: int = 4096, bins: int = 20) -> dict[str, Any]:
    """Metrics of ``cc`` on normalised rows ``x`` [N, 2, d]."""
    n, d = x.shape[0], cc.d_model
    sq_err = torch.zeros(2, dtype=torch.float64)
    fire_counts = torch.zeros(cc.dict_size, dtype=torch.float64)
    l0_sum = 0.0
    any_part = torch.zeros(3, dtype=torch.float64)
    labels = cc.partition.labels()
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size]
        x_hat, f = cc(xb)
        sq_err += (x_hat - xb).double().pow(2).sum(dim=(0, 2))
        active = f > 0
        fire_counts += active.double().sum(0)
        l0_sum += float(active.sum())
        for p in range(3):
            cols = labels == p
            if cols.any():
                any_part[p] += float(active[:, cols].any(1).sum())
    var = (x.double() - x.double().mean(0)).pow(2).sum(dim=(0, 2))
    out: dict[str, Any] = {"n_rows": n}
    for m, name in enumerate(MODELS):
        out[f"mse_{name}"] = float(sq_err[m] / (n * d))
        out[f"fvu_{name}"] = float(sq_err[m] / var[m]) if var[m] > 0 else float("nan")
    out["mse"] = float(sq_err.sum() / (n * 2 * d))
    out["fvu"] = float(sq_err.sum() / var.sum()) if var.sum() > 0 else float("nan")
    out["l0"] = l0_sum / n
    rates = fire_counts / n
    out["dead_fraction"] = float((fire_counts == 0).double().mean())
    out["partitions"] = _partition_metrics(cc, rates, fire_counts, any_part, n)
    out["relative_decoder_norm"] = relative_norm_histogram(cc, bins)
    out["partition_violation"] = cc.partition_violation()
    return out


def _partition_metrics(cc: Crosscoder, rates: torch.Tensor, counts: torch.Tensor, any_part: torch.Tensor, n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for p, name in enumerate(PARTITION_NAMES):
        r = cc.partition.range(name)
        if len(r) == 0:
            continue
        pr = rates[r.start : r.stop]
        res[name] = {
            "size": len(r),
            "l0": float(counts[r.start : r.stop].sum() / n),
            "dead_fraction": float((pr == 0).double().mean()),
            "mean_fire_rate": float(pr.mean()),
            "max_fire_rate": float(pr.max()),
            "rows_with_any": float(any_part[p] / n),
        }
    return res


@torch.no_grad()
def relative_norm_histogram(cc: Crosscoder, bins: int = 20) -> dict[str, Any]:
    """Histogram of ||d^A|| / (||d^A|| + ||d^B||) over [0, 1], overall and per partition."""
    rel = cc.relative_decoder_norm()
    edges = torch.linspace(0, 1, bins + 1)
    out: dict[str, Any] = {"edges": [round(float(e), 4) for e in edges], "all": torch.histc(rel, bins, 0, 1).long().tolist()}
    for name in PARTITION_NAMES:
        r = cc.partition.range(name)
        if len(r):
            out[name] = torch.histc(rel[r.start : r.stop], bins, 0, 1).long().tolist()
    return out


def dead_by_partition(cc: Crosscoder, dead: torch.Tensor) -> dict[str, float]:
    """Fraction of each partition counted dead by the trainer's window."""
    out = {}
    for name in PARTITION_NAMES:
        r = cc.partition.range(name)
        if len(r):
            out[name] = float(dead[r.start : r.stop].float().mean())
    return out
