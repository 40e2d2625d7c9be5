"""What the artifact alone reveals, before any model runs."""

from __future__ import annotations

import torch

from guardrail.paper import MODEL_A, MODEL_B


@torch.no_grad()
def static_checks(cc) -> dict:
    """Partition integrity, decoder-norm asymmetry, and how far shared B-side directions
    point along A-exclusive directions (a leak channel that needs no A at run time)."""
    part = cc.partition
    rel = cc.relative_decoder_norm().detach()  # ‖d_A‖ / (‖d_A‖ + ‖d_B‖)
    shared = torch.tensor(list(part.shared), dtype=torch.long)
    a_excl = torch.tensor(list(part.a_exclusive), dtype=torch.long)
    out = {
        "partition_violation": float(cc.partition_violation()),
        "partition": part.sizes(),
        "shared_relative_norm": _describe(rel[shared]),
        "shared_a_leaning_fraction": float((rel[shared] > 0.9).float().mean()) if len(shared) else 0.0,
    }
    if len(a_excl) and len(shared):
        dirs_a = cc.decoder_directions(MODEL_A, raw=True)[a_excl]
        dirs_b = cc.decoder_directions(MODEL_B, raw=True)[shared]
        unit = lambda t: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        cos = unit(dirs_a) @ unit(dirs_b).T  # [n_a, n_shared]
        best = cos.abs().max(dim=1).values
        out["a_exclusive_vs_shared_b_cosine"] = _describe(best)
    return out


def _describe(x: torch.Tensor) -> dict:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.float(), torch.tensor([0.5, 0.9, 0.99]))
    return {"mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(x.max())}
