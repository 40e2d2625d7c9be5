"""Collection throughput: vLLM against transformers with early exit, on the demo's collection.

Both collect the same prompts into a cache with ``guardrail.activations.collect``: the
embedded SmolLM2 pair (``load_pair("organism")``), the demo's site (the paper's relative
depth, the last 32 prompt tokens) and the demo's prompts (train-split tool tasks under the
hedge protocol plus as many ordinary prompts, ``eval/phenomenon/artifact.py``). transformers
runs left-padded batches stopped after the site's layer; vLLM gets each shard in one
``generate`` call per model, on engines cut after the site's layer. Engine start-up (and
the one-off copy of the kept layers) is timed apart, after a warm-up read. The two caches
are compared row for row. Seen on 2 cores shared with another heavy job, one torch thread:
2.5x at 48 prompts (18 s against 45 s), 2.3x at 96, rows equal to 3e-5 relative.

    python benchmarks/bench_collect_vllm.py [--prompts 48] [--batch 8] [--shard 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from guardrail.activations import collect
from guardrail.eval.phenomenon.artifact import DictionaryRecipe, layer_of, protocol_prompts
from guardrail.eval.phenomenon.protocols import HEDGE
from guardrail.generation.tokenize import encode_prompts
from guardrail.models import load_pair
from guardrail.residual import Site


def timed_collect(pair, prompts, site, out: Path, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    cache = collect(pair, prompts, site, out, progress=False, **kw)
    return time.perf_counter() - t0, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48, help="tool prompts + ordinary prompts (half each)")
    ap.add_argument("--batch", type=int, default=8, help="transformers: prompts per forward pass")
    ap.add_argument("--shard", type=int, default=256, help="prompts per cache shard (vLLM: per generate call)")
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from guardrail.vllm.collection import VLLMReader

    pair = load_pair("organism")
    recipe = DictionaryRecipe(tool_prompts=args.prompts // 2, plain_prompts=args.prompts - args.prompts // 2)
    site = Site(layer=layer_of(pair, recipe), positions="prompt", last_n=recipe.last_n)
    prompts = protocol_prompts(pair, HEDGE, recipe)
    tokens = int(encode_prompts(pair.tokenizer, [p.text for p in prompts], args.max_length)["attention_mask"].sum())
    reader = VLLMReader()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        collect(pair, prompts[:2], site, root / "warm", progress=False, engine=reader, max_length=args.max_length)
        startup = time.perf_counter() - t0
        t_vllm, vl = timed_collect(pair, prompts, site, root / "vllm", engine=reader, shard_prompts=args.shard, max_length=args.max_length)
        t_hf, hf = timed_collect(pair, prompts, site, root / "hf", batch_size=args.batch, shard_prompts=args.shard, max_length=args.max_length)
        a, b = vl.load(), hf.load()
    same = torch.equal(a.prompt_idx, b.prompt_idx) and torch.equal(a.position, b.position)
    err = ((a.acts - b.acts).norm(dim=-1) / b.acts.norm(dim=-1).clamp(min=1e-6)).max().item()
    print(f"SmolLM2-135M organism pair, layer {site.layer}/{pair.n_layers}, last {site.last_n} prompt tokens, "
          f"{len(prompts)} prompts ({tokens} prompt tokens per model), torch threads {torch.get_num_threads()}")
    print(f"{'engine':<28}{'seconds':>9}{'prompts/s':>11}{'tokens/s':>11}")
    for name, t in ((f"transformers, batch {args.batch}", t_hf), ("vLLM, one call per shard", t_vllm)):
        print(f"{name:<28}{t:>9.1f}{len(prompts) / t:>11.2f}{2 * tokens / t:>11.1f}")
    print(f"speed-up       : {t_hf / t_vllm:.2f}x (target >= 2x); vLLM start-up {startup:.1f} s, not counted")
    print(f"rows           : {len(a)} each, same prompts and positions: {same}; max relative row difference {err:.1e}")


if __name__ == "__main__":
    main()
