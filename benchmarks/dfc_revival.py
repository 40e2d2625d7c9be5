"""Do a DFC's exclusive features live? Paper settings vs guardrail's revival defaults.

Synthetic pair with known shared, A-only and B-only features (tests/oracles/synthetic.py).
For each variant: dead fraction and fire rate per partition on held-out rows, FVU, and how
well the A-exclusive decoder rows recover the true A-only directions (best cosine).

    python benchmarks/dfc_revival.py [--steps 1500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from guardrail.dictionary import AuxKConfig, DFCConfig
from guardrail.training import TrainingConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles
from oracles.synthetic import recovery, synthetic_pair  # noqa: E402

VARIANTS = {
    "paper (no revival)": dict(exclusive_init_scale=1.0, aux_k=AuxKConfig(enabled=False)),
    "balanced init only": dict(aux_k=AuxKConfig(enabled=False)),
    "AuxK only": dict(exclusive_init_scale=1.0),
    "default (init + AuxK)": dict(),
    "default + k_exclusive=2": dict(k_exclusive=2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--dict-size", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="substring of variant names to run")
    ap.add_argument("--p-excl", type=float, default=0.1, help="firing probability of each true A-only/B-only feature")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--excl-scale", type=float, default=1.0, help="magnitude of the model-specific features relative to shared ones")
    ap.add_argument("--drift", type=float, default=0.1, help="how much shared features' directions differ between A and B")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = synthetic_pair(n=30000, d=args.d, n_shared=4 * args.d, n_a=16, n_b=16, p_fire_exclusive=args.p_excl,
                          exclusive_scale=args.excl_scale, drift=args.drift)
    tc = TrainingConfig(steps=args.steps, batch_size=256, lr=args.lr, warmup_steps=50, progress=False, checkpoint_every=0)
    print(f"d={args.d} D={args.dict_size} k={args.k} exclusive=5% steps={args.steps} lr={args.lr}; "
          f"truth: {4 * args.d} shared, 16 A-only, 16 B-only (each fires on {args.p_excl:.0%} of rows)")
    print(f"{'variant':28s} {'FVU':>6s} {'deadA':>6s} {'deadB':>6s} {'deadS':>6s} {'fireA':>7s} {'rowsA':>6s} {'recA':>5s} {'recB':>5s}")
    for name, kw in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        cfg = DFCConfig(dict_size=args.dict_size, k=args.k, exclusive=0.05, lambda_shared=1e-3, **kw)
        cc = train(data.acts, cfg, training=tc)
        m, p = cc.metrics, cc.metrics["partitions"]
        part = cc.partition
        rec_a = recovery(data.a_only_dirs, cc.decoder_directions(0, raw=True)[: part.n_a]).mean()
        rec_b = recovery(data.b_only_dirs, cc.decoder_directions(1, raw=True)[part.b_exclusive.start : part.b_exclusive.stop]).mean()
        print(
            f"{name:28s} {m['fvu']:6.3f} {p['a_exclusive']['dead_fraction']:6.2f} {p['b_exclusive']['dead_fraction']:6.2f} "
            f"{p['shared']['dead_fraction']:6.2f} {p['a_exclusive']['mean_fire_rate']:7.4f} {p['a_exclusive']['rows_with_any']:6.2f} "
            f"{float(rec_a):5.2f} {float(rec_b):5.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
