"""Synthetic paired activations with known shared, A-only and B-only features.

Used to test that a DFC puts model-specific structure into its exclusive partitions (and
that those partitions do not die), without running language models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticPair:
    acts: torch.Tensor  # [N, 2, d]
    shared_dirs: torch.Tensor  # [n_shared, 2, d] (unit per model)
    a_only_dirs: torch.Tensor  # [n_a, d]
    b_only_dirs: torch.Tensor  # [n_b, d]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


def synthetic_pair(
    n: int = 20000,
    d: int = 64,
    n_shared: int = 256,
    n_a: int = 16,
    n_b: int = 16,
    p_fire: float = 0.03,
    p_fire_exclusive: float = 0.1,
    drift: float = 0.1,
    noise: float = 0.05,
    exclusive_scale: float = 1.0,
    seed: int = 0,
) -> SyntheticPair:
    """Sparse non-negative features; shared ones write slightly different directions per model."""
    g = torch.Generator().manual_seed(seed)
    base = _unit(torch.randn(n_shared, d, generator=g))
    shared = torch.stack([base, _unit(base + drift * torch.randn(n_shared, d, generator=g))], dim=1)
    a_dirs = _unit(torch.randn(n_a, d, generator=g))
    b_dirs = _unit(torch.randn(n_b, d, generator=g))

    def codes(m: int, p: float) -> torch.Tensor:
        on = torch.rand(n, m, generator=g) < p
        return on * torch.rand(n, m, generator=g).add(0.5)

    fs, fa, fb = codes(n_shared, p_fire), codes(n_a, p_fire_exclusive), codes(n_b, p_fire_exclusive)
    xa = fs @ shared[:, 0] + exclusive_scale * (fa @ a_dirs)
    xb = fs @ shared[:, 1] + exclusive_scale * (fb @ b_dirs)
    acts = torch.stack([xa, xb], dim=1) + noise * torch.randn(n, 2, d, generator=g)
    return SyntheticPair(acts=acts, shared_dirs=shared, a_only_dirs=a_dirs, b_only_dirs=b_dirs)


@torch.no_grad()
def recovery(dirs: torch.Tensor, decoder_rows: torch.Tensor) -> torch.Tensor:
    """For each true direction [m, d], the best cosine with any decoder row [D', d]."""
    if decoder_rows.numel() == 0:
        return torch.zeros(dirs.shape[0])
    return (_unit(dirs) @ _unit(decoder_rows + 1e-12).T).max(dim=1).values
