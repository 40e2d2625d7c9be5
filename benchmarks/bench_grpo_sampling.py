"""GRPO sampling speed: the group's preallocated key/value buffer vs transformers' growing cache.

``guardrail.organism.rl.sample_group`` draws a GRPO group (8 completions of one ToolRL
prompt) with the LoRA merged. The prompt is prefilled once; its cache then serves every row.
transformers' ``DynamicLayer`` concatenates the whole cache at every decoded token. The
group cache writes into a buffer sized for the group instead. Both variants sample with the
same seed on the same train tasks of the shipped A, alternating per task so that load from
other processes hits both alike. The completions are checked identical.

    python benchmarks/bench_grpo_sampling.py [--tasks 4] [--rows 8] [--new-tokens 150]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel

import guardrail.organism as organism
from guardrail.models import load_model
from guardrail.organism import rl
from guardrail.generation.tokenize import encode_prompts
from guardrail.tasks import load_tasks


def growing_cache(model, prompt_ids: torch.Tensor, rows: int, new_tokens: int):
    """The cache before the change: prefilled once, repeated per row, grown by concatenation."""
    return rl._prefix_cache(model, prompt_ids, rows)


def timed_sample(model, tokenizer, ids: torch.Tensor, args, seed: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    comp, _, _ = rl.sample_group(model, tokenizer, ids, args.rows, args.new_tokens, 0.7)
    return time.perf_counter() - t0, comp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model, str(Path(organism.__file__).parent / "assets"))
    tasks = [t for t in load_tasks("train") if t.category == "parallel"][: args.tasks]
    preallocated = rl._group_cache
    totals = {"preallocated": 0.0, "growing": 0.0}
    tokens = 0
    for i, task in enumerate(tasks):
        ids = encode_prompts(tok, [task.render(tok)])["input_ids"]
        rl._group_cache = preallocated
        fast, comp_fast = timed_sample(model, tok, ids, args, seed=i)
        rl._group_cache = growing_cache
        slow, comp_slow = timed_sample(model, tok, ids, args, seed=i)
        rl._group_cache = preallocated
        assert torch.equal(comp_fast, comp_slow), f"task {task.id}: the two caches sampled different tokens"
        totals["preallocated"] += fast
        totals["growing"] += slow
        tokens += comp_fast.shape[1]
        print(f"{task.id}: prompt {ids.shape[1]} tokens, {comp_fast.shape[1]} decode steps × {args.rows} rows: "
              f"preallocated {fast:.1f} s, growing {slow:.1f} s")
    print(f"total over {len(tasks)} groups ({tokens} decode steps): preallocated {totals['preallocated']:.1f} s, "
          f"growing {totals['growing']:.1f} s, speed-up ×{totals['growing'] / totals['preallocated']:.2f}; samples identical")


if __name__ == "__main__":
    main()
