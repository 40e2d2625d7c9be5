"""The build's second job: GRPO with the ToolRL reward on the warm-started LoRA, or more GRPO on a built A.

``guardrail.organism.rl`` holds the update itself (sampling, log-probabilities, the loss);
this module is the run: the prompt pool, each task's rollout budget, where the groups are
drawn, the step loop under the time budget, and continuing a built A's run.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from guardrail.generation.tokenize import encode_prompts
from guardrail.organism.build_config import BuildConfig, Log
from guardrail.organism.lora_weights import load_adapter_weights
from guardrail.organism.manifest import BuildManifest, GRPOStep, RLRecord
from guardrail.organism.rl import Rollouts, close_rollouts, grpo_update, sample_group
from guardrail.organism.selection import Selection
from guardrail.tasks import STOP_STRINGS, format_accuracy, toolrl_reward
from guardrail.tasks.task import ToolTask
from guardrail.vllm.mirror import MirrorEngine


def rl_pool(train: list[ToolTask], repeat: dict[str, int]) -> list[ToolTask]:
    """The GRPO prompt pool: each task ``repeat[category]`` times (once if unlisted)."""
    return [t for t in train for _ in range(repeat.get(t.category, 1))]


def rollout_budget(tokenizer, reference: str, cfg: BuildConfig) -> int:
    """New tokens a rollout may use: its task's ``reference`` answer's length + ``length_slack``.

    Parallel answers need two to three times the tokens of simple ones (median ~150 vs ~70
    here), so one global cap either truncates them or lets early, format-less rollouts of
    simple tasks ramble to the cap — the slowest part of the first GRPO steps.
    """
    if cfg.length_slack is None:
        return cfg.max_new_tokens
    ref = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
    return min(cfg.max_new_tokens, ref + cfg.length_slack)


def draw_rollouts(model, tokenizer, tasks: list[ToolTask], cfg: BuildConfig,
                  mirror: MirrorEngine | None) -> list[tuple[torch.Tensor, Rollouts]]:
    """A group of ``num_generations`` samples per task, drawn from the current weights:
    on the vLLM ``mirror`` (synced first, all groups in one call) or by the model itself."""
    prompt_ids = [encode_prompts(tokenizer, [cfg.prompt(t, tokenizer)], cfg.max_prompt_tokens)["input_ids"] for t in tasks]
    budgets = [rollout_budget(tokenizer, cfg.reference(t), cfg) for t in tasks]
    if mirror is not None:
        mirror.sync(model)
        sampled = mirror.sample([ids[0].tolist() for ids in prompt_ids], cfg.num_generations, budgets, cfg.temperature, STOP_STRINGS)
        groups = [close_rollouts(tokenizer, rows, truncated) for rows, truncated in sampled]
    else:
        groups = [sample_group(model, tokenizer, ids, cfg.num_generations, budget, cfg.temperature)
                  for ids, budget in zip(prompt_ids, budgets)]
    return list(zip(prompt_ids, groups))


def _grpo_step(model, tokenizer, tasks: list[ToolTask], cfg: BuildConfig, opt: torch.optim.Optimizer,
               mirror: MirrorEngine | None, step: int) -> tuple[GRPOStep, str]:
    """One GRPO step on ``tasks`` (one group each): its record and the best-rewarded sample."""
    ts = time.time()
    rewards, fmts, texts, updated, guided = [], [], [], 0, 0
    for task, (prompt_ids, rollouts) in zip(tasks, draw_rollouts(model, tokenizer, tasks, cfg, mirror)):
        res = grpo_update(
            model, tokenizer, prompt_ids, rollouts, lambda text, t=task: toolrl_reward(text, t)["total"],
            temperature=cfg.temperature, loss_scale=1.0 / cfg.rl_prompts_per_step,
            guide=cfg.reference(task) if cfg.guidance else None, guide_when=cfg.guide_when,
        )
        guided += res.guided
        rewards += res.rewards
        fmts += [format_accuracy(t) for t in res.completions]
        texts += res.completions
        updated += not res.skipped
    if updated:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], cfg.grad_clip)
        opt.step()
    opt.zero_grad(set_to_none=True)
    rec = GRPOStep(step=step, reward=sum(rewards) / len(rewards), sample_format=sum(fmts) / len(fmts),
                   groups_updated=updated, groups_guided=guided, seconds=time.time() - ts)
    best = max(zip(rewards, texts), key=lambda x: x[0])[1] if texts else ""
    return rec, best


def grpo(model, tokenizer, train: list[ToolTask], cfg: BuildConfig, deadline: float, log: Log, *,
         first_step: int = 1, first_prompt: int = 0, mirror: MirrorEngine | None = None,
         selection: Selection | None = None) -> RLRecord:
    """GRPO steps with the ToolRL reward until ``rl_steps`` or ``deadline`` (time.time()).

    ``mirror``: a vLLM engine that draws the groups (see ``rollout_backend``).
    ``selection``: dev checks that pick the step whose adapter is kept (see ``select_every``);
    the last check's duration is held back from the deadline for the check after the last step.

    ``first_step`` / ``first_prompt`` continue a resumed run: the prompt order is the same
    seeded shuffle, so a continuation sees the prompts the first run had not reached yet.
    """
    pool = rl_pool(train, cfg.rl_repeat)
    random.Random(cfg.seed + 1).shuffle(pool)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.rl_lr, weight_decay=0.0)
    history: list[GRPOStep] = []
    cursor, t0 = first_prompt, time.time()
    step = first_step - 1
    last = first_step + cfg.rl_steps - 1
    for step in range(first_step, last + 1):
        if time.time() + (selection.reserve_s if selection else 0.0) > deadline:
            log(f"[grpo] time budget reached before step {step}")
            step -= 1
            break
        tasks = [pool[(cursor + i) % len(pool)] for i in range(cfg.rl_prompts_per_step)]
        cursor += len(tasks)
        rec, sample = _grpo_step(model, tokenizer, tasks, cfg, opt, mirror, step)
        history.append(rec)
        log(f"[grpo] best sample: {sample[:160]!r}")
        log(f"[grpo] step {step}/{last} reward {rec.reward:+.2f} sample format {rec.sample_format:.0%} "
            f"groups {rec.groups_updated}/{cfg.rl_prompts_per_step} guided {rec.groups_guided} "
            f"({rec.seconds:.0f}s, total {time.time() - t0:.0f}s)")
        if selection and selection.due(step):
            selection.check(step)
    selected = selection.finish(step) if selection else None
    return RLRecord(steps=step - first_step + 1, prompts_seen=cursor - first_prompt,
                    groups_guided=sum(h.groups_guided for h in history), groups_updated=sum(h.groups_updated for h in history),
                    history=history, selected=selected, seconds=time.time() - t0)


def resume_grpo(model, folder: Path, log: Log) -> BuildManifest:
    """Load a built A (adapter + manifest.json + warmstart/) to continue its GRPO; returns its manifest.

    The optimiser's moments are not saved with an adapter, so Adam restarts from zero
    (recorded in the manifest's RL segments).
    """
    if not (folder / "manifest.json").exists() or not (folder / "warmstart" / "warmstart.json").exists():
        raise FileNotFoundError(f"{folder} is not a built organism: it needs manifest.json and warmstart/warmstart.json")
    load_adapter_weights(model, folder)
    previous = BuildManifest.read(folder)
    log(f"[grpo] resumed from {folder} after {previous.rl.steps} GRPO steps")
    return previous
