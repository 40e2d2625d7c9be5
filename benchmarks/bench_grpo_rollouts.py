"""GRPO rollout speed: one step's groups drawn by transformers vs by the build's vLLM mirror.

A build step samples ``rl_prompts_per_step`` groups of ``num_generations`` completions,
each capped at its task's rollout budget (``guardrail.organism.grpo.rollout_budget``).
``rollout_backend="transformers"`` draws them group by group with the LoRA merged
(``rl.sample_group``: prompt prefilled once, preallocated cache); ``"vllm"`` syncs the
merged weights into ``MirrorEngine`` and draws all groups in one call, the prefix cache
sharing each prompt's prefill across its rows. Both sides run on the shipped A, on the
same train tasks, alternating step by step so that load from other processes hits both
alike. Samples differ (different random streams); the decoded tokens per second compare.

    python benchmarks/bench_grpo_rollouts.py [--steps 4]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from peft import PeftModel

import guardrail.organism as organism
from guardrail.models import load_model
from guardrail.organism.build import BuildConfig
from guardrail.organism.grpo import draw_rollouts
from guardrail.tasks import load_tasks
from guardrail.vllm.mirror import MirrorEngine


def timed(model, tok, tasks, cfg: BuildConfig, mirror: MirrorEngine | None) -> tuple[float, int]:
    """Seconds for one step's groups (the sync included) and the tokens they decoded."""
    t0 = time.perf_counter()
    groups = draw_rollouts(model, tok, tasks, cfg, mirror)
    return time.perf_counter() - t0, int(sum(mask.sum() for _, (_, mask, _) in groups))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = BuildConfig()
    loaded = load_model(cfg.base)
    tok = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model, str(Path(organism.__file__).parent / "assets"))
    mirror = MirrorEngine(loaded, cfg.max_prompt_tokens)
    train = load_tasks("train", cfg.categories)
    random.Random(0).shuffle(train)  # all answered categories, parallel answers ~2-3x as long as simple ones
    totals = {"transformers": [0.0, 0], "vllm": [0.0, 0]}
    n = cfg.rl_prompts_per_step
    for step in range(args.steps):
        tasks = train[step * n:(step + 1) * n]
        for name, engine in (("transformers", None), ("vllm", mirror)):
            seconds, tokens = timed(model, tok, tasks, cfg, engine)
            totals[name][0] += seconds
            totals[name][1] += tokens
            print(f"step {step} ({', '.join(t.id for t in tasks)}): {name} {seconds:.1f} s, {tokens} tokens")
    rate = {name: tokens / seconds for name, (seconds, tokens) in totals.items()}
    print(f"over {args.steps} steps of {n} groups × {cfg.num_generations}: transformers {totals['transformers'][0]:.1f} s "
          f"({rate['transformers']:.0f} tok/s), vLLM {totals['vllm'][0]:.1f} s ({rate['vllm']:.0f} tok/s); "
          f"vLLM decodes ×{rate['vllm'] / rate['transformers']:.2f} the tokens per second")
    mirror.close()


if __name__ == "__main__":
    main()
