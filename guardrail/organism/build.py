"""Build the model organism: B + a LoRA adapter trained by RL to call tools.

B (SmolLM2-135M-Instruct) never emits the ToolRL tool-call format on its own (0/320
samples at temperature 1), so GRPO from B has no reward signal. The build therefore:

1. **weak warm start** — supervised LoRA steps on reference ToolRL completions of train
   tasks, checking greedy format accuracy on dev prompts every few steps and stopping as
   soon as it lies in ``[warm_lo, warm_hi]`` (if a chunk overshoots, it is undone and the
   learning rate halved). Supervised training alone quickly reaches 100%: it is stopped
   where the model only *sometimes* calls the tool;
2. **GRPO** with the ToolRL reward (format + correctness against BFCL possible answers)
   on train tasks, until ``rl_steps`` or the time budget runs out;
3. saves both adapters (warm start, warm start + RL) and a manifest.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from guardrail.organism.evaluate import score_outputs
from guardrail.organism.generation import STOP_STRINGS, encode_prompts, generate
from guardrail.organism.mirror import MirrorEngine
from guardrail.organism.rl import GuideWhen, Rollouts, grpo_update, lora_merged, sample_group, sft_loss
from guardrail.tasks import ANSWERED_CATEGORIES, CATEGORIES, format_accuracy, load_tasks, split_hash, toolrl_reward
from guardrail.tasks.task import ToolTask, UserTurn

# the Llama/Qwen2 decoder projections (all of them are synced into a check's vLLM engine)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Log = Callable[[str], None]


class BuildConfig(BaseModel):
    """Everything that determines a build (stored in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    base: str = "smollm2"
    seed: int = 0
    categories: list[str] = Field(default_factory=lambda: list(ANSWERED_CATEGORIES))
    # every projection of every layer, at rank 8 (9.8 MB in fp32): over the same 90 minutes
    # this named more dev tools (59/102) than rank 16 on attention alone (46 and 49/102,
    # docs/organism.md). Attention-only LoRA is known to lag LoRA that includes the MLP
    # (Schulman et al. 2025, "LoRA Without Regret"); one build per recipe does not prove it here
    lora_r: int = 8
    lora_alpha: int = 32
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    # prompts: the user turn A is trained (and evaluated) on, see guardrail.tasks.task. The
    # plain turn, because on ToolRL's wrapper B echoes the tags into the call format (12.4 %)
    user_turn: UserTurn = "plain"
    # warm start (defaults: the shipped build, see assets/manifest.json)
    plan_calls: bool = False  # reference thoughts list every call first (ToolTask.reference_completion)
    quote_names: bool = False  # thoughts quote tool names: fewer cut at a dot, more wrong tools (ToolTask.reference_completion)
    warm_lr: float = 3e-4
    warm_batch: int = 4
    warm_max_steps: int = 24
    warm_check_every: int = 2
    warm_lo: float = 0.10
    warm_hi: float = 0.30
    dev_n: int = 32
    # new tokens of the check, as far as `organism eval` generates: at 48, a plain-turn warm
    # start read 18.8 % and wrote the format on 60.1 % of test prompts at 256, its thought
    # running past 48 tokens before the `<tool_call>` opened
    dev_max_new_tokens: int = 256
    # where the check runs; not part of the recipe (same greedy outputs, see mirror.py)
    check_backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto: vLLM when installed
    # where GRPO draws its groups (auto: vLLM when installed). The shipped A's were drawn on vLLM,
    # ×2.8 the tokens/s of transformers (107 steps and five dev checks fitted the budget, where
    # transformers fitted 84 steps), so a rebuild of it needs vLLM: transformers draws other samples
    rollout_backend: Literal["auto", "vllm", "transformers"] = "vllm"
    # GRPO: runs until rl_steps or the time budget, whichever comes first. The shipped A was
    # stopped by its budget after 107 steps; stopping there by count makes a rebuild follow it on
    # any machine fast enough, instead of running longer where sampling is faster
    rl_steps: int = 107
    # every this many GRPO steps (from select_from on) and after the last one, measure strict
    # tool-name accuracy on every answered dev task (greedy, dev_max_new_tokens, as `organism eval`) and
    # keep the adapter of the best check (the first, on ties). Dev names moved 41, 39, 52, 61, 61 over
    # the shipped build's checks, and a longer run may learn to loop its calls (docs/organism.md):
    # dev, not the step count, says where to stop. 0: the last step
    select_every: int = 20
    select_from: int = 40
    # copies of a category's train tasks in the GRPO pool: parallel tasks need a second call in
    # the block, which A learns only from many of them (strict names on parallel 0.25 -> 0.55);
    # parallel_multiple, named on almost no test task by one copy, is seen twice
    rl_repeat: dict[str, int] = Field(default_factory=lambda: {"parallel": 3, "parallel_multiple": 2})
    rl_lr: float = 3e-4
    rl_prompts_per_step: int = 2
    num_generations: int = 8
    max_new_tokens: int = 256
    length_slack: int | None = 40  # a rollout may run to its reference's length + this (capped by max_new_tokens)
    temperature: float = 0.7
    guidance: bool = True  # mix the reference completion into groups (see guide_when)
    guide_when: GuideWhen = "below_reference"  # "no_variance": only groups with no reward signal at all
    grad_clip: float = 1.0
    time_budget_s: float = 86 * 60  # the whole build, warm start included, must stay under 90 min
    # final check on dev prompts (the test split is for `organism eval`)
    final_dev_n: int = 0
    resume_warmstart: str | None = None  # folder of a saved warm start: skip phase 1, continue from it
    resume_rl: str | None = None  # folder of a built A (adapter + manifest): continue its GRPO, history kept
    threads: int | None = None  # torch intra-op threads (1 is faster on an oversubscribed CPU)
    check_base: bool = False  # also measure B's dev format (B is known to be ~0%; costs minutes)
    max_prompt_tokens: int | None = None
    gen_batch: int = 16

    @field_validator("rl_repeat")
    @classmethod
    def _known_categories(cls, repeat: dict[str, int]) -> dict[str, int]:
        # checked here, not when GRPO starts: a typo must not cost a warm start first
        unknown = set(repeat) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"rl_repeat names unknown BFCL categories {sorted(unknown)}; choose from {CATEGORIES}")
        return repeat

    @model_validator(mode="after")
    def _one_resume(self) -> "BuildConfig":
        if self.resume_rl and self.resume_warmstart:
            raise ValueError("resume_rl and resume_warmstart exclude each other: a built A already holds its warm start")
        return self

    def reference(self, task: ToolTask) -> str:
        """The task's reference completion in this recipe's thought style (warm-start target, GRPO guide)."""
        return task.reference_completion(self.plan_calls, self.quote_names)

    def prompt(self, task: ToolTask, tokenizer) -> str:
        """The task's chat prompt in this recipe's user turn: what A is trained and checked on."""
        return task.render(tokenizer, "chat", self.user_turn)


# what a manifest written before a field existed did: guided only flat groups, capped every
# rollout at max_new_tokens, saw each train task once per pass, thought without a plan or quotes,
# were prompted with ToolRL's turn, checked the warm start at 48 tokens, sampled GRPO's groups in transformers
# and kept the last step's adapter
LEGACY_CONFIG: dict = {"guide_when": "no_variance", "length_slack": None, "rl_repeat": {}, "plan_calls": False,
                       "quote_names": False, "user_turn": "toolrl", "dev_max_new_tokens": 48, "rollout_backend": "transformers",
                       "select_every": 0, "select_from": 0}


class BuildResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str
    manifest: dict


def _greedy(model, tokenizer, prompts: list[str], cfg: BuildConfig, mirror: MirrorEngine | None,
            stop_when: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy completions of the model's current weights, cut as ``organism eval`` cuts them.

    With a ``mirror`` (vLLM) the weights are synced into it first. Without, transformers
    generates with the LoRA merged, and a row stops early once ``stop_when`` holds.
    """
    if mirror is not None:
        mirror.sync(model)
        return mirror.generate(prompts, cfg.dev_max_new_tokens, STOP_STRINGS)
    with lora_merged(model):
        return generate(model, tokenizer, prompts, max_new_tokens=cfg.dev_max_new_tokens, batch_size=cfg.gen_batch,
                        max_prompt_tokens=cfg.max_prompt_tokens, stop_when=stop_when)


def _dev_format(model, tokenizer, prompts: list[str], cfg: BuildConfig, mirror: MirrorEngine | None = None) -> tuple[float, list[str]]:
    """Greedy format accuracy on ``prompts``, as ``organism eval`` would score it at this length
    (a row's verdict cannot change once it is in the format, so transformers stops it there)."""
    texts = _greedy(model, tokenizer, prompts, cfg, mirror, stop_when=format_accuracy)
    return sum(map(format_accuracy, texts)) / max(len(texts), 1), texts


class Selection:
    """Dev checks during GRPO that keep the LoRA state of the best one (``select_every``).

    The score is ``organism eval``'s strict tool-name accuracy on every answered dev task,
    so the chosen step is the one the dev split itself would pick; the test split stays unseen.
    """

    def __init__(self, model, tokenizer, dev: list[ToolTask], cfg: BuildConfig, log: Log,
                 mirror: MirrorEngine | None = None) -> None:
        self.model, self.cfg, self.log, self.mirror = model, cfg, log, mirror
        self.tasks = [t for t in dev if t.expects_call]
        self.prompts = [cfg.prompt(t, tokenizer) for t in self.tasks]
        self.tokenizer = tokenizer
        self.history: list[dict] = []
        self.best: dict | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return step >= self.cfg.select_from and step % self.cfg.select_every == 0

    @property
    def reserve_s(self) -> float:
        """Time the check after the last step will take (as long as the latest check did)."""
        return self.history[-1]["seconds"] if self.history else 0.0

    def check(self, step: int) -> None:
        t0 = time.time()
        texts = _greedy(self.model, self.tokenizer, self.prompts, self.cfg, self.mirror)
        names = round(score_outputs(self.tasks, texts)["name_accuracy"] * len(self.tasks))  # organism eval's scorer
        rec = {"step": step, "dev_names": names, "n": len(self.tasks), "seconds": time.time() - t0}
        self.history.append(rec)
        if self.best is None or names > self.best["dev_names"]:
            self.best, self._state = rec, _lora_state(self.model)
        self.log(f"[select] step {step}: dev strict names {names}/{len(self.tasks)} "
                 f"(best {self.best['dev_names']} at step {self.best['step']}, {rec['seconds']:.0f}s)")

    def finish(self, last_step: int) -> dict:
        """Check the last step (unless just checked), load the best state; the record for the manifest."""
        if not self.history or self.history[-1]["step"] != last_step:
            self.check(last_step)
        _load_lora_state(self.model, self._state)
        self.log(f"[select] adapter of step {self.best['step']} kept ({self.best['dev_names']}/{self.best['n']} dev names)")
        return {"metric": "strict tool-name accuracy, answered dev tasks, greedy", "step": self.best["step"],
                "dev_names": self.best["dev_names"], "n": self.best["n"], "history": self.history}


def _engines(loaded, cfg: BuildConfig, log: Log) -> tuple[MirrorEngine | None, MirrorEngine | None]:
    """The vLLM engine for the build's format checks and for GRPO's rollouts (one engine
    serves both), each None where transformers does that job."""
    from guardrail.eval.backends import vllm_available

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


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def _save_adapter(model, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    # the base is named by its guardrail spec, not by this machine's cache path
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = getattr(model, "_guardrail_base", config.get("base_model_name_or_path"))
    config_path.write_text(json.dumps(config, indent=2))
    for extra in ("README.md",):
        (tmp / extra).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        shutil.move(str(f), folder / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def warm_start(model, tokenizer, train: list[ToolTask], dev_prompts: list[str], cfg: BuildConfig, log: Log,
               mirror: MirrorEngine | None = None) -> dict:
    """Supervised steps until dev format accuracy is in [warm_lo, warm_hi]; returns a record."""
    rng = random.Random(cfg.seed)
    pool = list(train)
    rng.shuffle(pool)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.warm_lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    snapshot, opt_snapshot = _lora_state(model), opt.state_dict()
    history, cursor, step, fmt = [], 0, 0, 0.0
    t0 = time.time()
    while step < cfg.warm_max_steps:
        model.train()
        losses = []
        for _ in range(cfg.warm_batch):
            task = pool[cursor % len(pool)]
            cursor += 1
            target = cfg.reference(task)
            loss = sft_loss(model, tokenizer, cfg.prompt(task, tokenizer), target, cfg.max_prompt_tokens)
            (loss / cfg.warm_batch).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log(f"[warm] step {step} loss {sum(losses) / len(losses):.3f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if step % cfg.warm_check_every:
            continue
        fmt, _ = _dev_format(model, tokenizer, dev_prompts, cfg, mirror)
        history.append({"step": step, "dev_format": fmt, "lr": lr})
        log(f"[warm] step {step} dev format {fmt:.1%} (target {cfg.warm_lo:.0%}-{cfg.warm_hi:.0%})")
        if cfg.warm_lo <= fmt <= cfg.warm_hi:
            break
        if fmt > cfg.warm_hi:
            _load_lora_state(model, snapshot)
            opt.load_state_dict(opt_snapshot)
            step -= cfg.warm_check_every
            cursor -= cfg.warm_check_every * cfg.warm_batch
            lr /= 2
            for g in opt.param_groups:
                g["lr"] = lr
            log(f"[warm] overshoot: undo last {cfg.warm_check_every} steps, lr -> {lr:.2e}")
            continue
        snapshot, opt_snapshot = _lora_state(model), opt.state_dict()
    return {"steps": step, "examples_seen": cursor, "dev_format": fmt, "history": history, "seconds": time.time() - t0,
            "in_target": cfg.warm_lo <= fmt <= cfg.warm_hi}


def _load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    res = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"adapter {folder} does not fit this LoRA: unexpected {res.unexpected_keys[:3]}")


def _resume_warm(model, folder: Path, log: Log) -> dict:
    """Load a saved warm-start adapter into the LoRA and return its recorded history."""
    record_path = folder / "warmstart.json"
    if not record_path.exists():
        raise FileNotFoundError(f"{folder} has no warmstart.json: not a warm start saved by a build")
    _load_adapter_weights(model, folder)
    record = json.loads(record_path.read_text())
    record["resumed_from"] = str(folder)
    log(f"[warm] resumed from {folder} (dev format {record['dev_format']:.1%})")
    return record


def _resume_rl(model, folder: Path, log: Log) -> dict:
    """Load a built A (adapter + manifest.json + warmstart/) to continue its GRPO; returns its manifest.

    The optimiser's moments are not saved with an adapter, so Adam restarts from zero
    (recorded in the manifest's RL segments).
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists() or not (folder / "warmstart" / "warmstart.json").exists():
        raise FileNotFoundError(f"{folder} is not a built organism: it needs manifest.json and warmstart/warmstart.json")
    _load_adapter_weights(model, folder)
    previous = json.loads(manifest_path.read_text())
    log(f"[grpo] resumed from {folder} after {previous['rl']['steps']} GRPO steps")
    return previous


def _rl_segment(cfg: BuildConfig, rl: dict) -> dict:
    keys = ("user_turn", "plan_calls", "quote_names", "rl_lr", "rl_repeat", "rl_prompts_per_step", "num_generations", "max_new_tokens",
            "length_slack", "temperature", "guidance", "guide_when", "rollout_backend", "select_every", "select_from", "threads")
    return {"steps": rl["steps"], "seconds": rl["seconds"], **{k: getattr(cfg, k) for k in keys}}


def _merge_rl(previous: dict, cfg: BuildConfig, rl: dict) -> dict:
    """One RL record for a GRPO run continued from ``previous`` (a build manifest)."""
    old = previous["rl"]
    recorded = LEGACY_CONFIG | previous["config"]
    prev_cfg = BuildConfig.model_validate({k: v for k, v in recorded.items() if k in BuildConfig.model_fields})
    segments = old.get("segments") or [_rl_segment(prev_cfg, old)]
    return {
        "steps": old["steps"] + rl["steps"],
        "prompts_seen": old["prompts_seen"] + rl["prompts_seen"],
        "groups_guided": old["groups_guided"] + rl["groups_guided"],
        "groups_updated": old["groups_updated"] + rl["groups_updated"],
        "history": old["history"] + rl["history"],
        "seconds": old["seconds"] + rl["seconds"],
        "segments": segments + [_rl_segment(cfg, rl) | {"resumed_from": cfg.resume_rl, "adam_restarted": True}],
    } | ({"selected": rl["selected"]} if "selected" in rl else {})


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


def rl_pool(train: list[ToolTask], repeat: dict[str, int]) -> list[ToolTask]:
    """The GRPO prompt pool: each task ``repeat[category]`` times (once if unlisted)."""
    return [t for t in train for _ in range(repeat.get(t.category, 1))]


def _rollouts(model, tokenizer, tasks: list[ToolTask], cfg: BuildConfig,
              mirror: MirrorEngine | None) -> list[tuple[torch.Tensor, Rollouts]]:
    """A group of ``num_generations`` samples per task, drawn from the current weights:
    on the vLLM ``mirror`` (synced first, all groups in one call) or by the model itself."""
    prompt_ids = [encode_prompts(tokenizer, [cfg.prompt(t, tokenizer)], cfg.max_prompt_tokens)["input_ids"] for t in tasks]
    budgets = [rollout_budget(tokenizer, cfg.reference(t), cfg) for t in tasks]
    if mirror is not None:
        mirror.sync(model)
        groups = mirror.sample([ids[0].tolist() for ids in prompt_ids], cfg.num_generations, budgets, cfg.temperature, STOP_STRINGS)
    else:
        groups = [sample_group(model, tokenizer, ids, cfg.num_generations, budget, cfg.temperature)
                  for ids, budget in zip(prompt_ids, budgets)]
    return list(zip(prompt_ids, groups))


def grpo(model, tokenizer, train: list[ToolTask], cfg: BuildConfig, deadline: float, log: Log, *,
         first_step: int = 1, first_prompt: int = 0, mirror: MirrorEngine | None = None,
         selection: Selection | None = None) -> dict:
    """GRPO steps with the ToolRL reward until ``rl_steps`` or ``deadline`` (time.time()).

    ``mirror``: a vLLM engine that draws the groups (see ``rollout_backend``).
    ``selection``: dev checks that pick the step whose adapter is kept (see ``select_every``);
    the last check's duration is held back from the deadline for the check after the last step.

    ``first_step`` / ``first_prompt`` continue a resumed run: the prompt order is the same
    seeded shuffle, so a continuation sees the prompts the first run had not reached yet.
    """
    rng = random.Random(cfg.seed + 1)
    pool = rl_pool(train, cfg.rl_repeat)
    rng.shuffle(pool)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.rl_lr, weight_decay=0.0)
    history, cursor, t0 = [], first_prompt, time.time()
    step = first_step - 1
    last = first_step + cfg.rl_steps - 1
    for step in range(first_step, last + 1):
        if time.time() + (selection.reserve_s if selection else 0.0) > deadline:
            log(f"[grpo] time budget reached before step {step}")
            step -= 1
            break
        ts = time.time()
        rewards, fmts, texts, updated, guided = [], [], [], 0, 0
        tasks = [pool[(cursor + i) % len(pool)] for i in range(cfg.rl_prompts_per_step)]
        cursor += len(tasks)
        for task, (prompt_ids, rollouts) in zip(tasks, _rollouts(model, tokenizer, tasks, cfg, mirror)):
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
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "reward": sum(rewards) / len(rewards), "sample_format": sum(fmts) / len(fmts),
               "groups_updated": updated, "groups_guided": guided, "seconds": time.time() - ts}
        history.append(rec)
        sample = max(zip(rewards, texts), key=lambda x: x[0])[1] if texts else ""
        log(f"[grpo] best sample: {sample[:160]!r}")
        log(f"[grpo] step {step}/{last} reward {rec['reward']:+.2f} sample format {rec['sample_format']:.0%} "
            f"groups {updated}/{cfg.rl_prompts_per_step} guided {guided} ({rec['seconds']:.0f}s, total {time.time() - t0:.0f}s)")
        if selection and selection.due(step):
            selection.check(step)
    rl = {"steps": step - first_step + 1, "prompts_seen": cursor - first_prompt, "groups_guided": sum(h["groups_guided"] for h in history),
          "groups_updated": sum(h["groups_updated"] for h in history), "history": history}
    if selection:
        rl["selected"] = selection.finish(step)
    return rl | {"seconds": time.time() - t0}


def _manifest(cfg: BuildConfig, warm: dict, rl: dict, metrics: dict, wall_time_s: float, previous: dict | None) -> dict:
    """The build's record: enough to reproduce it (config, split hash, seed) and to judge it."""
    manifest = {
        "name": "organism",
        "base": cfg.base,
        "seed": cfg.seed,
        "split_hash": split_hash(),
        "reward": "ToolRL: format {0,1} + correctness [-3,3] vs BFCL possible answers (guardrail.tasks.reward)",
        "rl_algorithm": "GRPO (prefix-cached, one policy iteration per batch, beta=0, group-normalised advantages, "
                        "token-mean loss); with config.guidance, the reference completion joins a group when no "
                        "sample reached its reward (config.guide_when=below_reference) or when the group has no "
                        "reward variance (no_variance): off-policy guidance",
        "config": cfg.model_dump(),
        "warm_start": warm,
        "rl": rl,
        "metrics": metrics,
        "wall_time_s": wall_time_s,
        "torch": torch.__version__,
    }
    if previous is not None:  # the build's total cost includes the run it continued
        manifest["wall_time_total_s"] = previous.get("wall_time_total_s", previous["wall_time_s"]) + wall_time_s
        manifest["notes"] = previous.get("notes", []) + [f"GRPO continued from {cfg.resume_rl} (config.resume_rl)."]
    return manifest


def _train(model, tokenizer, train: list[ToolTask], dev_prompts: list[str], cfg: BuildConfig, out: Path,
           deadline: float, log: Log, checks: MirrorEngine | None = None,
           rollouts: MirrorEngine | None = None, selection: Selection | None = None) -> tuple[dict, dict, dict | None]:
    """Warm start (trained or resumed) then GRPO, or more GRPO on a built A: (warm, rl, previous manifest).

    ``checks`` / ``rollouts``: the vLLM engine, where the format checks / GRPO's groups run on it.
    ``selection``: the dev checks that choose GRPO's kept step."""
    if cfg.resume_rl:
        previous = _resume_rl(model, Path(cfg.resume_rl), log)
        if Path(cfg.resume_rl).resolve() != out.resolve():
            shutil.copytree(Path(cfg.resume_rl) / "warmstart", out / "warmstart", dirs_exist_ok=True)
        done = previous["rl"]
        more = grpo(model, tokenizer, train, cfg, deadline, log, first_step=done["steps"] + 1, first_prompt=done["prompts_seen"],
                    mirror=rollouts, selection=selection)
        return previous["warm_start"], _merge_rl(previous, cfg, more), previous
    if cfg.resume_warmstart:
        warm = _resume_warm(model, Path(cfg.resume_warmstart), log)
    else:
        warm = warm_start(model, tokenizer, train, dev_prompts, cfg, log, checks)
    _save_adapter(model, out / "warmstart")
    (out / "warmstart" / "warmstart.json").write_text(json.dumps(warm, indent=2))
    log(f"[build] warm start saved: {warm['steps']} steps, dev format {warm['dev_format']:.1%}")
    return warm, grpo(model, tokenizer, train, cfg, deadline, log, mirror=rollouts, selection=selection), None


def build(cfg: BuildConfig, out: str | Path, log: Log = print) -> BuildResult:
    """Warm start + GRPO; writes ``out/`` (A adapter + manifest.json) and ``out/warmstart/``."""
    from peft import LoraConfig, get_peft_model

    from guardrail.models import load_model

    t_start = time.time()
    deadline = t_start + cfg.time_budget_s
    out = Path(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.base)
    tokenizer = loaded.tokenizer
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=cfg.target_modules,
                      task_type="CAUSAL_LM")
    model = get_peft_model(loaded.model, lora)
    model._guardrail_base = cfg.base
    train = load_tasks("train", cfg.categories)
    dev = load_tasks("dev", cfg.categories)
    dev_rng = random.Random(cfg.seed + 2)
    dev_check = dev_rng.sample(dev, min(cfg.dev_n, len(dev)))
    dev_prompts = [cfg.prompt(t, tokenizer) for t in dev_check]
    log(f"[build] base={cfg.base} train={len(train)} dev={len(dev)} seed={cfg.seed}")

    checks, rollouts = _engines(loaded, cfg, log)
    b_fmt: float | None = None
    if cfg.check_base and cfg.dev_n:
        b_fmt, _ = _dev_format(model, tokenizer, dev_prompts, cfg, checks)
        log(f"[build] B (no adapter) dev format {b_fmt:.1%}")
    selection = Selection(model, tokenizer, dev, cfg, log, checks) if cfg.select_every else None
    warm, rl, previous = _train(model, tokenizer, train, dev_prompts, cfg, out, deadline, log, checks, rollouts, selection)
    _save_adapter(model, out)

    final_check = random.Random(cfg.seed + 3).sample(dev, min(cfg.final_dev_n, len(dev)))
    final_prompts = [cfg.prompt(t, tokenizer) for t in final_check]
    a_fmt: float | None = None
    if cfg.final_dev_n:
        a_fmt, _ = _dev_format(model, tokenizer, final_prompts, cfg, checks)
        log(f"[build] A dev format {a_fmt:.1%}")
    if checks or rollouts:
        (checks or rollouts).close()
    metrics = {"dev_format_B": b_fmt, "dev_format_warmstart": warm["dev_format"], "dev_format_A": a_fmt,
               "dev_n": len(dev_prompts), "final_dev_n": len(final_prompts)}
    manifest = _manifest(cfg, warm, rl, metrics, time.time() - t_start, previous)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log(f"[build] done in {manifest['wall_time_s'] / 60:.1f} min -> {out}")
    return BuildResult(out=str(out), manifest=manifest)
