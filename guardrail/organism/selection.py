"""GRPO's checkpoint selection: dev checks during the run, the best one's adapter kept.

Dev names moved by up to 13 tasks between checks 20 steps apart in one run, so the step
count alone picks a point on a noisy curve; the dev split says where to stop, and the
test split stays unseen by the build.
"""

from __future__ import annotations

import time

from guardrail.organism.build_config import BuildConfig, Log
from guardrail.organism.dev_check import greedy
from guardrail.organism.evaluate import score_outputs
from guardrail.organism.lora_weights import LoraState, load_lora_state, lora_state
from guardrail.organism.manifest import SelectionCheck, SelectionRecord
from guardrail.tasks.task import ToolTask
from guardrail.vllm.mirror import MirrorEngine


class Selection:
    """Dev checks during GRPO that keep the LoRA state of the best one (``select_every``).

    The score is ``organism eval``'s strict tool-name accuracy on every answered dev task,
    so the chosen step is the one the dev split itself would pick. Ties keep the first.
    """

    def __init__(self, model, tokenizer, dev: list[ToolTask], cfg: BuildConfig, log: Log,
                 mirror: MirrorEngine | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.log, self.mirror = model, tokenizer, cfg, log, mirror
        self.tasks = [t for t in dev if t.expects_call]
        self.prompts = [cfg.prompt(t, tokenizer) for t in self.tasks]
        self.history: list[SelectionCheck] = []
        self.best: SelectionCheck | None = None
        self._state: LoraState | None = None

    def due(self, step: int) -> bool:
        """Whether GRPO checks after ``step``."""
        return step >= self.cfg.select_from and step % self.cfg.select_every == 0

    @property
    def reserve_s(self) -> float:
        """Time the check after the last step will take (as long as the latest check did)."""
        return self.history[-1].seconds if self.history else 0.0

    def check(self, step: int) -> None:
        """Score the current weights on dev; keep them if they beat every earlier check."""
        t0 = time.time()
        texts = greedy(self.model, self.tokenizer, self.prompts, self.cfg, self.mirror)
        names = round(score_outputs(self.tasks, texts)["name_accuracy"] * len(self.tasks))  # organism eval's scorer
        rec = SelectionCheck(step=step, dev_names=names, n=len(self.tasks), seconds=time.time() - t0)
        self.history.append(rec)
        if self.best is None or names > self.best.dev_names:
            self.best, self._state = rec, lora_state(self.model)
        self.log(f"[select] step {step}: dev strict names {names}/{len(self.tasks)} "
                 f"(best {self.best.dev_names} at step {self.best.step}, {rec.seconds:.0f}s)")

    def finish(self, last_step: int) -> SelectionRecord:
        """Check the last step (unless just checked), load the best state; the record for the manifest."""
        if not self.history or self.history[-1].step != last_step:
            self.check(last_step)
        load_lora_state(self.model, self._state)
        best = self.best
        self.log(f"[select] adapter of step {best.step} kept ({best.dev_names}/{best.n} dev names)")
        return SelectionRecord(step=best.step, dev_names=best.dev_names, n=best.n, history=self.history)
