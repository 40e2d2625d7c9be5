"""The build's first job: a weak supervised warm start of the LoRA, or a saved one resumed.

B never writes the tool-call format (0/320 samples at temperature 1), so GRPO from B has no
reward signal; supervised steps alone reach 100 % format within ~30 steps. The warm start is
stopped where A only *sometimes* calls the tool: greedy dev format accuracy in
``[warm_lo, warm_hi]``. A chunk of steps that overshoots is undone and the learning rate halved.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch

from guardrail.organism.build_config import BuildConfig, Log
from guardrail.organism.dev_check import dev_format
from guardrail.organism.lora_weights import load_adapter_weights, load_lora_state, lora_state
from guardrail.organism.manifest import WarmCheck, WarmStartRecord
from guardrail.organism.rl import sft_loss
from guardrail.tasks.task import ToolTask
from guardrail.vllm.mirror import MirrorEngine


def optimizer_snapshot(opt: torch.optim.Optimizer) -> dict:
    """A copy of ``opt``'s state: ``state_dict()`` holds the very moment tensors later steps
    update in place, so restoring it would keep the moments of the steps being undone."""
    return copy.deepcopy(opt.state_dict())


class _SupervisedSteps:
    """Supervised steps over the seeded shuffle of the train tasks, with one snapshot to go back to."""

    def __init__(self, model, tokenizer, train: list[ToolTask], cfg: BuildConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.pool = list(train)
        random.Random(cfg.seed).shuffle(self.pool)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lr = cfg.warm_lr
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)
        self.step, self.cursor = 0, 0
        self.keep()

    def keep(self) -> None:
        """The current LoRA and optimiser state become the one :meth:`undo` returns to."""
        self._snapshot, self._opt_snapshot = lora_state(self.model), optimizer_snapshot(self.opt)

    def train_step(self) -> float:
        """One optimiser step on the next ``warm_batch`` reference completions; their mean loss."""
        cfg = self.cfg
        self.model.train()
        losses = []
        for _ in range(cfg.warm_batch):
            task = self.pool[self.cursor % len(self.pool)]
            self.cursor += 1
            loss = sft_loss(self.model, self.tokenizer, cfg.prompt(task, self.tokenizer), cfg.reference(task), cfg.max_prompt_tokens)
            (loss / cfg.warm_batch).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return sum(losses) / len(losses)

    def undo(self) -> None:
        """Back to the kept state, the examples of the undone steps to be seen again, at half the learning rate."""
        cfg = self.cfg
        load_lora_state(self.model, self._snapshot)
        self.opt.load_state_dict(self._opt_snapshot)
        self.step -= cfg.warm_check_every
        self.cursor -= cfg.warm_check_every * cfg.warm_batch
        self.lr /= 2
        for g in self.opt.param_groups:
            g["lr"] = self.lr


def warm_start(model, tokenizer, train: list[ToolTask], dev_prompts: list[str], cfg: BuildConfig, log: Log,
               mirror: MirrorEngine | None = None) -> WarmStartRecord:
    """Supervised steps until dev format accuracy is in [warm_lo, warm_hi] (or ``warm_max_steps``)."""
    sup = _SupervisedSteps(model, tokenizer, train, cfg)
    history: list[WarmCheck] = []
    fmt, t0 = 0.0, time.time()
    while sup.step < cfg.warm_max_steps:
        loss = sup.train_step()
        log(f"[warm] step {sup.step} loss {loss:.3f} lr {sup.lr:.2e} ({time.time() - t0:.0f}s)")
        if sup.step % cfg.warm_check_every:
            continue
        fmt, _ = dev_format(model, tokenizer, dev_prompts, cfg, mirror)
        history.append(WarmCheck(step=sup.step, dev_format=fmt, lr=sup.lr))
        log(f"[warm] step {sup.step} dev format {fmt:.1%} (target {cfg.warm_lo:.0%}-{cfg.warm_hi:.0%})")
        if cfg.warm_lo <= fmt <= cfg.warm_hi:
            break
        if fmt > cfg.warm_hi:
            sup.undo()
            log(f"[warm] overshoot: undo last {cfg.warm_check_every} steps, lr -> {sup.lr:.2e}")
            continue
        sup.keep()
    return WarmStartRecord(steps=sup.step, examples_seen=sup.cursor, dev_format=fmt, history=history,
                           seconds=time.time() - t0, in_target=cfg.warm_lo <= fmt <= cfg.warm_hi)


def resume_warm_start(model, folder: Path, log: Log) -> WarmStartRecord:
    """Load a saved warm-start adapter into the LoRA; its recorded history, marked as resumed."""
    if not (folder / "warmstart.json").exists():
        raise FileNotFoundError(f"{folder} has no warmstart.json: not a warm start saved by a build")
    load_adapter_weights(model, folder)
    record = WarmStartRecord.read(folder).model_copy(update={"resumed_from": str(folder)})
    log(f"[warm] resumed from {folder} (dev format {record.dev_format:.1%})")
    return record
