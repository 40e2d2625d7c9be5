"""Activation collection speed: early exit after the hooked layer vs a full forward pass.

Both read the residual stream after decoder layer L of SmolLM2-135M (30 layers) for the
same left-padded batches of real prompts (BFCL tool prompts rendered raw, plus ordinary
prompts). "full" runs every layer with ``output_hidden_states`` and picks
``hidden_states[L + 1]``, which is how collection is usually written; "early exit" is
``guardrail.residual.read_residual``, which stops the forward pass after layer L. Batches
alternate between the two so that load from other processes hits both alike; the outputs
are checked equal.

    python benchmarks/bench_collect.py [--layer 15] [--prompts 48] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from guardrail.models import load_model
from guardrail.prompts import mixed
from guardrail.residual.hf import position_ids_for, read_residual


@torch.no_grad()
def full_forward(model, layer, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = load_model("smollm2")
    prompts = mixed(args.prompts // 2, args.prompts - args.prompts // 2, split="train", mode="raw", seed=1)
    prompts.sort(key=lambda p: len(p.text))
    times = {"full": [], "early": []}
    tokens = 0
    for s in range(0, len(prompts), args.batch):
        enc = m.tokenizer([p.text for p in prompts[s : s + args.batch]], return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        tokens += int(mask.sum())
        t0 = time.perf_counter()
        ref = full_forward(m.model, args.layer, ids, mask)
        t1 = time.perf_counter()
        got = read_residual(m.model, args.layer, ids, mask)
        t2 = time.perf_counter()
        if not torch.allclose(ref, got, atol=1e-5, rtol=1e-4):
            raise SystemExit("early exit and full forward disagree")
        times["full"].append(t1 - t0)
        times["early"].append(t2 - t1)
    full, early = sum(times["full"]), sum(times["early"])
    ratios = [f / e for f, e in zip(times["full"], times["early"])]
    print(f"SmolLM2-135M, layer {args.layer}/{m.n_layers}, {len(prompts)} prompts, {tokens} tokens, batch {args.batch}")
    print(f"full forward : {tokens / full:8.1f} tokens/s ({full:.1f} s)")
    print(f"early exit   : {tokens / early:8.1f} tokens/s ({early:.1f} s)")
    print(f"speed-up     : {full / early:.2f}x overall, median per batch {statistics.median(ratios):.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
