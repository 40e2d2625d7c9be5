"""Throughput of guarded vs unguarded generation on vLLM-CPU with SmolLM2-135M.

One engine, one run: 32 concurrent prompts × 128 new tokens (ignore_eos, greedy) for
- unguarded,
- alert on 64 features at every token (targets ratio ≥ 0.97) — a monitor, its threshold set
  so it fires on about 1% of tokens (measured on the benchmark's own prompts and printed);
- the same alert at threshold 0, firing whenever any of the 64 features is active (the
  event-firehose worst case, printed for reference, no target),
- splice at every token (≥ 0.90),
- steer at the last prompt token only (≥ 0.99),
each measured ``--repeats`` times, alternating, best time kept. The crosscoder is random
(paper-sized by default: D=8192, k=90, 5% exclusive) with normalisation stats taken from
the model's own activations: the cost of a guard does not depend on what the features mean.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_guard.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TARGETS = {"alert64": 0.97, "splice": 0.90, "steer_last": 0.99}
ALERT_FIRE_RATE = 0.01


def make_artifact(folder: Path, layer: int, dict_size: int, k: int, out: Path) -> Path:
    from guardrail.dictionary import Crosscoder, DFCConfig, save_artifact
    from guardrail.models import load_model
    from guardrail.residual.hf import read_residual

    loaded = load_model(str(folder))
    texts = ["Write a haiku about the sea.", "What is 17 * 23?", "List three uses of a paperclip.", "Call the weather tool for Paris."]
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    x = read_residual(loaded.model, layer, enc.input_ids, enc.attention_mask)[enc.attention_mask.bool()]
    acts = torch.stack([x, x], 1)
    cc = Crosscoder(DFCConfig(dict_size=dict_size, k=k, exclusive=0.05).with_d_model(x.shape[-1]), seed=0)
    cc.set_normalization(acts.mean(0), acts.std(0).clamp_min(1e-3))
    return save_artifact(cc, out, model_a="smollm2", model_b="smollm2", layer=layer, positions="all")


def alert_threshold(folder: Path, art: Path, layer: int, prompts: list[str], n_alert: int) -> float:
    """Threshold at which the alert fires on ``ALERT_FIRE_RATE`` of the prompts' tokens."""
    from guardrail.dictionary import load_artifact
    from guardrail.features import interventions as iv
    from guardrail.models import load_model
    from guardrail.residual.hf import read_residual

    loaded = load_model(str(folder))
    enc = loaded.tokenizer(prompts, return_tensors="pt", padding=True)
    x = read_residual(loaded.model, layer, enc.input_ids, enc.attention_mask)[enc.attention_mask.bool()].float()
    peak = iv.encode(iv.dictionary_view(load_artifact(art)), x)[:, :n_alert].max(dim=-1).values
    return float(torch.quantile(peak, 1 - ALERT_FIRE_RATE))


def policies(n_alert: int, threshold: float) -> dict:
    from guardrail.policy import Policy

    quiet = {"otel": False}
    watch = lambda thr: {"id": "watch", "action": "alert", "select": {"indices": list(range(n_alert))}, "threshold": thr, "positions": "all"}  # noqa: E731
    return {
        "alert64": Policy.from_data({"name": "alert64", "telemetry": quiet, "rules": [watch(threshold)]}),
        "alert64_every": Policy.from_data({"name": "alert64_every", "telemetry": quiet, "rules": [watch(0.0)]}),
        "splice": Policy.from_data({"name": "splice", "telemetry": quiet, "rules": [
            {"id": "splice", "action": "splice", "positions": "all"}]}),
        "steer_last": Policy.from_data({"name": "steer_last", "telemetry": quiet, "rules": [
            {"id": "push", "action": "steer", "select": {"indices": [0, 1, 2]}, "alpha": 16, "positions": "last_prompt"}]}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--dict-size", type=int, default=8192)
    ap.add_argument("--k", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from guardrail.models.gguf import smollm2_folder
    from guardrail.vllm.driver import install_guard
    from guardrail.vllm.engine import engine_kwargs

    folder = smollm2_folder()
    tmp = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    art = make_artifact(folder, args.layer, args.dict_size, args.k, tmp / "dfc")
    prompts = [f"Question {i}: explain in detail how a {w} works, step by step." for i, w in enumerate(
        ["bicycle", "compiler", "refrigerator", "telescope", "vaccine", "bridge", "battery", "router"] * (args.prompts // 8 + 1))][: args.prompts]
    threshold = alert_threshold(folder, art, args.layer, prompts, 64)
    llm = LLM(model=str(folder), max_model_len=1024, max_num_seqs=args.prompts, **engine_kwargs())
    guard = install_guard(llm, art, policies(64, threshold))

    def params(policy: str | None):
        extra = {"guardrail_policy": policy} if policy else None
        return SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, extra_args=extra)

    def run(policy: str | None) -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, params(policy), use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
        return dt

    run(None)  # warm-up
    modes = [None, "alert64", "alert64_every", "splice", "steer_last"]
    best = {m: float("inf") for m in modes}
    events: dict = {}
    for _ in range(args.repeats):
        for m in modes:
            best[m] = min(best[m], run(m))
            events[m] = len(guard.events(clear=True))
    n_tok = args.prompts * args.tokens
    base = best[None]
    report = {"config": vars(args) | {"json": None}, "unguarded_tok_s": n_tok / base, "modes": {}}
    print(f"unguarded: {n_tok / base:.1f} tok/s ({base:.2f} s for {args.prompts}×{args.tokens})")
    for m in modes[1:]:
        ratio = base / best[m]
        target = TARGETS.get(m)
        ok = target is None or ratio >= target
        report["modes"][m] = {"tok_s": n_tok / best[m], "ratio": ratio, "target": target, "meets_target": ok, "events_per_run": events[m]}
        verdict = "no target" if target is None else f"target ≥ {target}, {'ok' if ok else 'MISSED'}"
        print(f"{m:>13}: {n_tok / best[m]:.1f} tok/s  guarded/unguarded = {ratio:.3f}  ({verdict}; {events[m]} events per run)")
    print(f"alert64 threshold {threshold:.3f} (fires on {ALERT_FIRE_RATE:.0%} of the prompts' tokens); "
          f"{n_tok} generated tokens per run")
    report["alert64_threshold"] = threshold
    report["guard"] = {k: v for k, v in guard.summary().items() if k != "aborted"}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
