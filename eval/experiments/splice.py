"""Splice: generate with the last prompt token's activation replaced by the reconstruction.

Two encodings, for A and for B:

* ``joint`` — the paper's protocol: features encoded from *both* A's and B's activations,
  decoded into each model. B's "spillover" under it partly carries A's own activation into
  B (a confound, not a property of the artifact alone).
* ``single`` — each model's reconstruction from its own activation only
  (``encode_single``): what someone holding one model and the published crosscoder can do.
  For B this is the artifact-only threat a release audit must measure.

All feature math is :mod:`guardrail.features.interventions` (encode, reconstruct, splice).
"""

from __future__ import annotations

from typing import Any

import torch

from guardrail.eval.experiments.common import MODEL_NAMES, RunContext, compare, condition_summary, dictionary_health
from guardrail.eval.scoring import score_all
from guardrail.eval.suites import Suite
from guardrail.features import interventions as iv

ENCODINGS = ("joint", "single")


@torch.no_grad()
def splice_patches(cc: Any, acts: torch.Tensor, encoding: str) -> dict[int, torch.Tensor]:
    """Replacement activations ``{model: [N, d]}`` (raw) for A (0) and B (1) under ``encoding``.

    Returns the reconstructions themselves (the paper splices without the error term).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")
    views = {m: iv.dictionary_view(cc, m) for m in (0, 1)}
    xa, xb = acts[:, 0].float(), acts[:, 1].float()
    out: dict[int, torch.Tensor] = {}
    if encoding == "joint":
        f = iv.encode(views[0], xa, xb)
        for m, x in ((0, xa), (1, xb)):
            out[m] = iv.splice(x, iv.reconstruct(views[m], f), keep_error=False)
    else:
        for m, x in ((0, xa), (1, xb)):
            f = iv.encode(views[m], x)  # single-model encoding: only model m's encoder half
            out[m] = iv.splice(x, iv.reconstruct(views[m], f), keep_error=False)
    return out


def _recon_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    err = (x_hat - x).pow(2).sum(-1)
    return {"mse": float(err.mean() / x.shape[-1]), "relative_l2": float((err.sqrt() / x.norm(dim=-1).clamp_min(1e-12)).mean())}


def run_splice(ctx: RunContext, cc: Any, suite: Suite, *, name: str = "dfc", encodings: tuple[str, ...] = ENCODINGS,
               models: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """Clean vs reconstructed generation of A and B on ``suite``; per-prompt outputs saved as JSONL."""
    acts = ctx.acts(suite)
    ids = [i.id for i in suite.items]
    result: dict[str, Any] = {"name": name, "n_prompts": len(suite), "suite": suite.recipe,
                              "dictionary": dictionary_health(cc, acts, torch.tensor([i.is_tool for i in suite.items]))}
    records: list[dict[str, Any]] = []
    clean = {m: ctx.clean_records(m, suite, f"splice:{name}") for m in models}
    for m in models:
        records += clean[m]
        result[f"{MODEL_NAMES[m]}_clean"] = condition_summary(clean[m])
    for enc in encodings:
        patches = splice_patches(cc, acts, enc)
        for m in models:
            texts = ctx.generate(m, suite, list(patches[m]))
            recs = score_all(suite.items, texts, experiment=f"splice:{name}", model=MODEL_NAMES[m], condition=f"recon_{enc}")
            records += recs
            key = f"{MODEL_NAMES[m]}_recon_{enc}"
            result[key] = condition_summary(recs)
            result[key]["reconstruction"] = _recon_error(acts[:, m].float(), patches[m])
            result[f"{key}_delta"] = compare(recs, clean[m], ctx.seed, ctx.n_boot)
    assert ids == [r["id"] for r in clean[models[0]]]
    result["outputs"] = str(ctx.save(f"splice_{name}", records).relative_to(ctx.out_dir))
    return result
