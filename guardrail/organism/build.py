"""Build the model organism: B + a LoRA adapter trained by RL to call tools.

The jobs, in order, each in its own module:

1. ``warmstart`` — a weak supervised warm start (B alone never writes the tool-call format,
   so GRPO from B has no reward signal), or a saved one resumed;
2. ``grpo`` — GRPO with the ToolRL reward on train tasks until ``rl_steps`` or the time
   budget, or more GRPO on a built A (``resume_rl``);
3. ``selection`` — dev checks during GRPO that choose the step whose adapter is kept;
4. ``manifest`` — the typed record of all of it, written as ``manifest.json``.

This module loads the model, sets up the vLLM engine the jobs share, runs them and saves
both adapters (warm start, warm start + RL) beside the manifest.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from guardrail.organism.build_config import BuildConfig, Log
from guardrail.organism.dev_check import dev_format
from guardrail.organism.grpo import grpo, resume_grpo
from guardrail.organism.lora_weights import save_adapter
from guardrail.organism.manifest import BuildManifest, BuildMetrics, RLRecord, WarmStartRecord
from guardrail.organism.selection import Selection
from guardrail.organism.warmstart import resume_warm_start, warm_start
from guardrail.tasks import load_tasks, split_hash
from guardrail.tasks.task import ToolTask
from guardrail.vllm.mirror import MirrorEngine

__all__ = ["BuildConfig", "BuildResult", "build"]


class BuildResult(BaseModel):
    """Where a build wrote its adapters, and its manifest as written to ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    out: str
    manifest: dict


def _engines(loaded, cfg: BuildConfig, log: Log) -> tuple[MirrorEngine | None, MirrorEngine | None]:
    """The vLLM engine for the build's format checks and for GRPO's rollouts (one engine
    serves both), each None where transformers does that job."""
    from guardrail.vllm import vllm_available

    warm_checks = cfg.dev_n and (cfg.check_base or not (cfg.resume_rl or cfg.resume_warmstart))
    wanted = {"checks": cfg.check_backend != "transformers" and bool(warm_checks or cfg.final_dev_n or cfg.select_every),
              "rollouts": cfg.rollout_backend != "transformers" and cfg.rl_steps > 0}
    uses = [use for use, yes in wanted.items() if yes]
    if not uses:
        return None, None
    if not vllm_available():
        if "vllm" in (cfg.check_backend, cfg.rollout_backend):
            raise RuntimeError("check_backend or rollout_backend is 'vllm' but vLLM is not installed: `pip install guardrail[vllm]`")
        return None, None
    log(f"[build] {' and '.join(uses)} on vLLM (synced with the LoRA before each use)")
    engine = MirrorEngine(loaded, cfg.max_prompt_tokens)
    return (engine if wanted["checks"] else None), (engine if wanted["rollouts"] else None)


def _lora_model(cfg: BuildConfig):
    """B with a fresh LoRA of the recipe's shape (seeded by the caller), and what loaded B."""
    from peft import LoraConfig, get_peft_model

    from guardrail.models import load_model

    loaded = load_model(cfg.base)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=cfg.target_modules,
                      layers_to_transform=cfg.lora_layers, task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    return model, loaded


def _continue_grpo(model, tokenizer, train: list[ToolTask], cfg: BuildConfig, out: Path, deadline: float, log: Log,
                   rollouts: MirrorEngine | None, selection: Selection | None) -> tuple[WarmStartRecord, RLRecord, BuildManifest]:
    """More GRPO on the built A of ``cfg.resume_rl``, its warm start copied along."""
    source = Path(cfg.resume_rl)
    previous = resume_grpo(model, source, log)
    if source.resolve() != out.resolve():
        shutil.copytree(source / "warmstart", out / "warmstart", dirs_exist_ok=True)
    more = grpo(model, tokenizer, train, cfg, deadline, log, first_step=previous.rl.steps + 1,
                first_prompt=previous.rl.prompts_seen, mirror=rollouts, selection=selection)
    return previous.warm_start, previous.rl_continued_by(more, cfg), previous


def _warm_then_grpo(model, tokenizer, train: list[ToolTask], dev_prompts: list[str], cfg: BuildConfig, out: Path,
                    deadline: float, log: Log, checks: MirrorEngine | None, rollouts: MirrorEngine | None,
                    selection: Selection | None) -> tuple[WarmStartRecord, RLRecord]:
    """Warm start (trained or resumed), saved to ``out/warmstart``, then GRPO."""
    if cfg.resume_warmstart:
        warm = resume_warm_start(model, Path(cfg.resume_warmstart), log)
    else:
        warm = warm_start(model, tokenizer, train, dev_prompts, cfg, log, checks)
    save_adapter(model, out / "warmstart", cfg.base)
    warm.write(out / "warmstart")
    log(f"[build] warm start saved: {warm.steps} steps, dev format {warm.dev_format:.1%}")
    return warm, grpo(model, tokenizer, train, cfg, deadline, log, mirror=rollouts, selection=selection)


def _check_format(model, tokenizer, dev: list[ToolTask], n: int, seed: int, cfg: BuildConfig,
                  checks: MirrorEngine | None) -> tuple[float | None, int]:
    """Dev format accuracy on ``n`` dev prompts drawn with ``seed`` (None when ``n`` is 0), and how many."""
    tasks = random.Random(seed).sample(dev, min(n, len(dev)))
    if not n:
        return None, len(tasks)
    fmt, _ = dev_format(model, tokenizer, [cfg.prompt(t, tokenizer) for t in tasks], cfg, checks)
    return fmt, len(tasks)


def build(cfg: BuildConfig, out: str | Path, log: Log = print) -> BuildResult:
    """Warm start + GRPO; writes ``out/`` (A adapter + manifest.json) and ``out/warmstart/``."""
    t_start = time.time()
    deadline = t_start + cfg.time_budget_s
    out = Path(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, loaded = _lora_model(cfg)
    tokenizer = loaded.tokenizer
    train = load_tasks("train", cfg.categories)
    dev = load_tasks("dev", cfg.categories)
    dev_check = random.Random(cfg.seed + 2).sample(dev, min(cfg.dev_n, len(dev)))
    dev_prompts = [cfg.prompt(t, tokenizer) for t in dev_check]
    log(f"[build] base={cfg.base} train={len(train)} dev={len(dev)} seed={cfg.seed}")

    checks, rollouts = _engines(loaded, cfg, log)
    b_fmt: float | None = None
    if cfg.check_base and cfg.dev_n:
        b_fmt, _ = dev_format(model, tokenizer, dev_prompts, cfg, checks)
        log(f"[build] B (no adapter) dev format {b_fmt:.1%}")
    selection = Selection(model, tokenizer, dev, cfg, log, checks) if cfg.select_every else None
    previous: BuildManifest | None = None
    if cfg.resume_rl:
        warm, rl, previous = _continue_grpo(model, tokenizer, train, cfg, out, deadline, log, rollouts, selection)
    else:
        warm, rl = _warm_then_grpo(model, tokenizer, train, dev_prompts, cfg, out, deadline, log, checks, rollouts, selection)
    save_adapter(model, out, cfg.base)

    a_fmt, final_n = _check_format(model, tokenizer, dev, cfg.final_dev_n, cfg.seed + 3, cfg, checks)
    if a_fmt is not None:
        log(f"[build] A dev format {a_fmt:.1%}")
    if checks or rollouts:
        (checks or rollouts).close()
    metrics = BuildMetrics(dev_format_B=b_fmt, dev_format_warmstart=warm.dev_format, dev_format_A=a_fmt,
                           dev_n=len(dev_prompts), final_dev_n=final_n)
    manifest = BuildManifest.of_build(cfg, warm, rl, metrics, time.time() - t_start, split_hash(), previous)
    manifest.write(out)
    log(f"[build] done in {manifest.wall_time_s / 60:.1f} min -> {out}")
    return BuildResult(out=str(out), manifest=manifest.dump())
