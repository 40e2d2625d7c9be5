"""Steering saturation curves: Δ tool correctness of A vs |S| × α, per feature family.

The paper's steer (``steering/steer.py``): features ``f`` from the joint encoding after top-k,
``S`` = the top tool-signed features of a partition by Cohen's d, and

    δ = Σ_{i∈S} (α − 1) · f_i · d_i^A      added to A's raw activation at the last prompt token.

Families: ``a_exclusive``, ``b_exclusive`` (control: B-exclusive features have no decoder
row in A, so δ is exactly 0 by construction — the curve must be flat 0), ``shared``,
``a_exclusive+shared`` (interference: A-exclusive first, then shared, the paper's
``a-excl+shared`` subset) and ``standard`` (the standard crosscoder's top tool-signed
features). The delta is :func:`guardrail.features.interventions.steer_scale_delta`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from guardrail.eval.experiments.common import RunContext, compare, condition_summary, dictionary_health
from guardrail.eval.scoring import metric_vector, score_all
from guardrail.eval.stats import sign_flip_permutation
from guardrail.eval.suites import Suite
from guardrail.features import interventions as iv
from guardrail.paper import PAPER_ALPHAS

DFC_FAMILIES = ("a_exclusive", "b_exclusive", "shared", "a_exclusive+shared")
FAMILIES = DFC_FAMILIES + ("standard",)
PAPER_SIZES = (1, 2, 3, 5, 8, 13, 21, 33, "all")


def family_order(ranking: Any, family: str) -> tuple[list[int], str]:
    """Candidate features of a family, best first, and how they were chosen.

    Tool-signed features by Cohen's d (the paper's selector). A partition with no
    tool-signed feature falls back to all its features by d, so the B-exclusive control
    still steers real (firing) features rather than an empty set.
    """
    if family == "standard":
        part = None
    elif family == "a_exclusive+shared":
        a, how_a = family_order(ranking, "a_exclusive")
        s, how_s = family_order(ranking, "shared")
        return a + s, f"a_exclusive ({how_a}) then shared ({how_s})"
    else:
        part = family
    ordered = ranking.top("tool", part)
    if ordered:
        return ordered, "tool-signed by Cohen's d"
    feats = [f for f in ranking.features if part is None or f.partition == part]
    feats.sort(key=lambda f: -f.cohens_d)
    return [f.index for f in feats], "no tool-signed feature: all by Cohen's d"


def subset(ranking: Any, family: str, size: int | str) -> list[int]:
    """``S`` of a given size (``"all"`` = every candidate); for the union, ``size`` of each part."""
    if family == "a_exclusive+shared":
        a = subset(ranking, "a_exclusive", size)
        s = subset(ranking, "shared", size)
        return list(dict.fromkeys(a + s))
    order, _ = family_order(ranking, family)
    return order if size == "all" else order[: int(size)]


def resolve_sizes(sizes: Sequence[int | str], available: int) -> list[int | str]:
    """Sizes that are distinct subsets: numeric sizes below ``available`` then ``"all"``."""
    out: list[int | str] = []
    for s in sizes:
        if s == "all" or int(s) >= available:
            if "all" not in out and available > 0:
                out.append("all")
        elif int(s) > 0 and s not in out:
            out.append(int(s))
    return out


@torch.no_grad()
def steer_patches(cc: Any, acts: torch.Tensor, idx: Sequence[int], alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A's steered activations ``[N, d]`` and each row's ‖δ‖ (joint encoding, post top-k)."""
    view = iv.dictionary_view(cc, iv.MODEL_A)
    xa, xb = acts[:, 0].float(), acts[:, 1].float()
    if not idx:
        return xa.clone(), torch.zeros(len(xa))
    f = iv.encode(view, xa, xb)
    delta = iv.steer_scale_delta(f, torch.as_tensor(list(idx), dtype=torch.long), view.dirs_raw, alpha)
    return xa + delta, delta.norm(dim=-1)


def run_steering(ctx: RunContext, dfc: Any, dfc_ranking: Any, suite: Suite, *, standard: Any = None, standard_ranking: Any = None,
                 sizes: Sequence[int | str] = PAPER_SIZES, alphas: Sequence[float] = PAPER_ALPHAS,
                 families: Sequence[str] = FAMILIES, name: str = "steering") -> dict[str, Any]:
    """Every (family, |S|, α) cell on the tool prompts of ``suite``; outputs saved as JSONL."""
    acts = ctx.acts(suite)
    clean = ctx.clean_records(0, suite, name)
    records = list(clean)
    result: dict[str, Any] = {"n_prompts": len(suite), "suite": suite.recipe, "A_clean": condition_summary(clean),
                              "alphas": list(alphas), "families": {}, "dictionaries": {
                                  "dfc": dictionary_health(dfc, acts, torch.tensor([i.is_tool for i in suite.items]))}}
    if standard is not None:
        result["dictionaries"]["standard"] = dictionary_health(standard, acts, torch.tensor([i.is_tool for i in suite.items]))
    for fam in families:
        cc, ranking = (standard, standard_ranking) if fam == "standard" else (dfc, dfc_ranking)
        if cc is None or ranking is None:
            result["families"][fam] = {"skipped": "no standard crosscoder given" if fam == "standard" else "no dictionary"}
            continue
        if fam != "standard" and not cc.is_dfc:
            result["families"][fam] = {"skipped": "dictionary has no partition"}
            continue
        if fam == "a_exclusive+shared":  # |S| counts features of each part; "all" = both parts whole
            order, how = family_order(ranking, fam)
            n_avail = max(len(family_order(ranking, "a_exclusive")[0]), len(family_order(ranking, "shared")[0]))
        else:
            order, how = family_order(ranking, fam)
            n_avail = len(order)
        fam_sizes = resolve_sizes(sizes, n_avail)
        cells = []
        for size in fam_sizes:
            idx = subset(ranking, fam, size)
            for alpha in alphas:
                patched, norms = steer_patches(cc, acts, idx, alpha)
                texts = ctx.generate(0, suite, list(patched))
                cond = f"{fam}|S={size}|alpha={alpha:g}"
                recs = score_all(suite.items, texts, experiment=name, model="A", condition=cond, features=idx[:64])
                records += recs
                cells.append({
                    "size": size, "n_features": len(idx), "alpha": alpha, "features": idx[:16],
                    "rows_changed": int((norms > 0).sum()), "max_delta_norm": float(norms.max()) if len(norms) else 0.0,
                    "steered": condition_summary(recs), "delta": compare(recs, clean, ctx.seed, ctx.n_boot),
                    "tool_correctness_by_prompt": metric_vector(recs, "tool_correctness"),
                })
        result["families"][fam] = {"selection": how, "n_candidates": len(order), "sizes": fam_sizes, "cells": cells}
    result["outputs"] = str(ctx.save(name, records).relative_to(ctx.out_dir))
    result["summary"] = summarize(result)
    return result


def _gain(cell: dict[str, Any], metric: str = "tool_correctness") -> float:
    return cell["delta"][metric]["delta"]


def _interference_test(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Sign-flip permutation over prompts of Δ(union) − Δ(A-exclusive), pooled over the matched cells.

    The cells share their prompts, so a prompt's differences in every cell flip together;
    the sign of the mean over a few cells alone is not a test.
    """
    if not all("tool_correctness_by_prompt" in c for pair in pairs for c in pair):
        return {"test": "sign-flip permutation over prompts", "p": None, "mean_delta": None, "undefined": "no per-prompt outcomes saved"}
    diffs = [[u - a for a, u in zip(ca["tool_correctness_by_prompt"], cu["tool_correctness_by_prompt"])] for ca, cu in pairs]
    return sign_flip_permutation(diffs, alternative="two-sided")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline facts: best single-feature A-exclusive gain, the B-exclusive control, interference, standard CC need."""
    fams = result["families"]
    out: dict[str, Any] = {}

    def cells(f: str, steered_only: bool = True) -> list[dict[str, Any]]:
        """A family's cells; α = 1 is the identity and never counts as a best cell."""
        return [c for c in fams.get(f, {}).get("cells", []) if not (steered_only and c["alpha"] == 1.0)]

    a1 = [c for c in cells("a_exclusive") if c["size"] == 1 or (c["size"] == "all" and c["n_features"] == 1)]
    if a1:
        best = max(a1, key=_gain)
        out["a_exclusive_single_feature_best"] = {"alpha": best["alpha"], "features": best["features"], **best["delta"]["tool_correctness"],
                                                  "strict": {k: best["delta"][k] for k in ("name_correct", "args_correct") if k in best["delta"]}}
    if cells("a_exclusive"):
        best = max(cells("a_exclusive"), key=_gain)
        out["a_exclusive_best"] = {"size": best["size"], "alpha": best["alpha"], **best["delta"]["tool_correctness"]}
    b = cells("b_exclusive", steered_only=False)
    if b:
        out["b_exclusive_control"] = {
            "max_delta_norm": max(c["max_delta_norm"] for c in b),
            "max_abs_gain": max(abs(_gain(c)) for c in b),
            "rows_changed": sum(c["rows_changed"] for c in b),
            "exactly_zero": all(c["max_delta_norm"] == 0.0 and c["rows_changed"] == 0 for c in b),
            "n_cells": len(b),
        }
    ax, u = {(c["size"], c["alpha"]): c for c in cells("a_exclusive")}, cells("a_exclusive+shared")
    pairs = [(ax[(c["size"], c["alpha"])], c) for c in u if (c["size"], c["alpha"]) in ax]
    if pairs:
        diffs = [_gain(cu) - _gain(ca) for ca, cu in pairs]
        out["interference"] = {"n_cells": len(pairs), "mean_union_minus_a_exclusive": sum(diffs) / len(diffs),
                               "cells_worse": sum(d < 0 for d in diffs), "cells_better": sum(d > 0 for d in diffs),
                               "test": _interference_test(pairs)}
    std = cells("standard")
    if std:
        best = max(std, key=_gain)
        out["standard_best"] = {"size": best["size"], "n_features": best["n_features"], "alpha": best["alpha"], **best["delta"]["tool_correctness"]}
        target = out.get("a_exclusive_single_feature_best", {}).get("delta")
        if target is not None and target > 0:
            reach = [c for c in std if _gain(c) >= target]
            out["standard_features_to_match_single_a_exclusive"] = min((c["n_features"] for c in reach), default=None)
    return out
