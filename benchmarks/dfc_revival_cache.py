"""Exclusive-feature survival on a real activation cache: paper settings vs guardrail defaults.

Trains the same DFC twice on a cache from ``guardrail collect`` (same data, seed, steps):
once as the paper does (plain init, no revival), once with the defaults (balanced
exclusive init + per-partition AuxK). Prints FVU, dead fractions over all rows and over
the training window, and how often any A-exclusive feature fires on tool vs plain rows.

    python benchmarks/dfc_revival_cache.py CACHE_DIR [--steps 800] [--dict-size 2048] [--k 16]
"""

from __future__ import annotations

import argparse

import torch

from guardrail.activations import ActivationCache
from guardrail.dictionary import AuxKConfig, DFCConfig
from guardrail.training import TrainingConfig, train

VARIANTS = {
    "paper settings (no revival)": dict(exclusive_init_scale=1.0, aux_k=AuxKConfig(enabled=False)),
    "guardrail defaults": {},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--dict-size", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = ActivationCache.open(args.cache)
    pa = cache.load()
    m = cache.manifest
    print(f"{m.model_a} vs {m.model_b}, layer {m.layer}, {len(pa)} rows ({int(pa.is_tool.sum())} tool), d={pa.acts.shape[-1]}; "
          f"D={args.dict_size} k={args.k} exclusive 5%, {args.steps} steps")
    tc = TrainingConfig(steps=args.steps, batch_size=512, lr=3e-4, warmup_steps=50, progress=False)
    for name, kw in VARIANTS.items():
        cc = train(cache, DFCConfig(dict_size=args.dict_size, k=args.k, exclusive=0.05, lambda_shared=1e-3, **kw), training=tc)
        met = cc.metrics
        x = cc.normalize(pa.acts)
        with torch.no_grad():
            f = torch.cat([cc.encode(x[i : i + 2048]) for i in range(0, len(x), 2048)]) > 0
        a, b = cc.partition.a_exclusive, cc.partition.b_exclusive
        fa, fb = f[:, a.start : a.stop], f[:, b.start : b.stop]
        print(f"{name:28s} FVU A {met['fvu_A']:.3f} B {met['fvu_B']:.3f} | dead over all rows: A-excl {(~fa.any(0)).float().mean():.3f} "
              f"B-excl {(~fb.any(0)).float().mean():.3f} | training-window dead {met['train_dead_fraction']} | "
              f"rows with an A-excl feature: tool {fa[pa.is_tool].any(1).float().mean():.3f} plain {fa[~pa.is_tool].any(1).float().mean():.3f}",
              flush=True)


if __name__ == "__main__":
    main()
