"""What the artifact alone reveals, before any model runs."""

from __future__ import annotations

import torch

from guardrail.paper import MODEL_A, MODEL_B


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def exclusive_shared_cosine(cc) -> torch.Tensor:
    """Signed cosines ``[n_a, n_shared]`` between each A-exclusive feature's A-side decoder
    direction and each shared feature's B-side one, in raw residual space.

    A shared feature whose B-side direction nearly copies an A-exclusive direction writes into
    B what only A was meant to have: a channel that needs no A at run time. The static check
    summarises it and the ``steer_near_duplicate`` threat attacks it, from this one matrix.
    """
    part = cc.partition
    a_excl = torch.tensor(list(part.a_exclusive), dtype=torch.long)
    shared = torch.tensor(list(part.shared), dtype=torch.long)
    if not len(a_excl) or not len(shared):
        return torch.zeros(len(a_excl), len(shared))
    dirs_a = cc.decoder_directions(MODEL_A, raw=True).detach().float()[a_excl]
    dirs_b = cc.decoder_directions(MODEL_B, raw=True).detach().float()[shared]
    return _unit(dirs_a) @ _unit(dirs_b).T


@torch.no_grad()
def static_checks(cc, near_duplicate_cos: float = 0.9) -> dict:
    """Partition integrity, decoder-norm asymmetry, and how far shared B-side directions
    point along A-exclusive directions (a leak channel that needs no A at run time):
    per A-exclusive feature its closest shared B-side |cos|, and how many shared features
    are near-duplicates (|cos| ≥ ``near_duplicate_cos`` with some A-exclusive direction)."""
    part = cc.partition
    rel = cc.relative_decoder_norm().detach()  # ‖d_A‖ / (‖d_A‖ + ‖d_B‖)
    shared = torch.tensor(list(part.shared), dtype=torch.long)
    out = {
        "partition_violation": float(cc.partition_violation()),
        "partition": part.sizes(),
        "shared_relative_norm": _describe(rel[shared]),
        "shared_a_leaning_fraction": float((rel[shared] > 0.9).float().mean()) if len(shared) else 0.0,
    }
    cos = exclusive_shared_cosine(cc).abs()
    if cos.numel():
        out["a_exclusive_vs_shared_b_cosine"] = _describe(cos.max(dim=1).values)
        out["shared_near_duplicates"] = {"threshold": near_duplicate_cos, "count": int((cos.max(dim=0).values >= near_duplicate_cos).sum())}
    return out


def _describe(x: torch.Tensor) -> dict:
    if x.numel() == 0:
        return {}
    q = torch.quantile(x.float(), torch.tensor([0.5, 0.9, 0.99]))
    return {"mean": float(x.mean()), "median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(x.max())}
