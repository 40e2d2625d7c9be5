"""What determines an organism build: ``BuildConfig``, stored in the build's manifest.

Two markers on a field say how a recorded config is read back:

* ``Legacy(value)``: what every build did before the field existed, so a manifest written
  then is read as the build it was, not as today's default;
* ``PER_SEGMENT``: the field shapes a GRPO run, so it is recorded with each GRPO segment
  (a continued run may change it); ``manifest.RLSegment`` is made of these fields.

Why each default is what it is: docs/organism.md, "How the defaults were chosen".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from guardrail.organism.rl import GuideWhen
from guardrail.tasks import ANSWERED_CATEGORIES, CATEGORIES
from guardrail.tasks.task import ToolTask, UserTurn

# the Llama/Qwen2 decoder projections (all of them are synced into a check's vLLM engine)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Log = Callable[[str], None]
Backend = Literal["auto", "vllm", "transformers"]


@dataclass(frozen=True)
class Legacy:
    """The value a build had before its field existed: read for a manifest that lacks the field."""

    value: Any


@dataclass(frozen=True)
class PerSegment:
    """Marks a field recorded with every GRPO segment, because a continued run may change it."""


PER_SEGMENT = PerSegment()


def legacy_of(info: FieldInfo) -> Legacy | None:
    """The field's ``Legacy`` marker, if it has one."""
    return next((m for m in info.metadata if isinstance(m, Legacy)), None)


class BuildConfig(BaseModel):
    """Everything that determines a build (stored in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    base: str = "smollm2"  # model spec of B
    seed: int = 0  # LoRA initialisation, prompt order, sampling
    categories: list[str] = Field(default_factory=lambda: list(ANSWERED_CATEGORIES))  # BFCL categories trained on
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))  # projections that carry the LoRA
    # decoder layers that carry the LoRA (None: every layer). A band ending at the dictionary's layer makes that
    # layer's residual stream the only path by which A differs from B (docs/organism.md, "A banded A")
    lora_layers: Annotated[list[int] | None, Legacy(None)] = None
    # the user turn A is trained and checked on (guardrail.tasks.task)
    user_turn: Annotated[UserTurn, Legacy("toolrl"), PER_SEGMENT] = "plain"
    # reference thoughts list every call first (ToolTask.reference_completion)
    plan_calls: Annotated[bool, Legacy(False), PER_SEGMENT] = False
    # reference thoughts quote tool names (ToolTask.reference_completion)
    quote_names: Annotated[bool, Legacy(False), PER_SEGMENT] = False
    warm_lr: float = 3e-4  # warm start: learning rate (halved on each overshoot)
    warm_batch: int = 4  # warm start: reference completions per step
    warm_max_steps: int = 24  # warm start: steps at most
    warm_check_every: int = 2  # warm start: steps between dev format checks
    warm_lo: float = 0.10  # warm start: stop once dev format accuracy is in [warm_lo, warm_hi]
    warm_hi: float = 0.30
    dev_n: int = 32  # dev prompts of the warm start's format check
    dev_max_new_tokens: Annotated[int, Legacy(48)] = 256  # greedy new tokens of every dev check
    check_backend: Backend = "auto"  # engine of the dev checks, not part of the recipe (auto: vLLM when installed)
    rollout_backend: Annotated[Backend, Legacy("transformers"), PER_SEGMENT] = "vllm"  # engine drawing GRPO's groups
    rl_steps: int = 107  # GRPO steps at most (the time budget may stop it earlier)
    # dev checks every this many GRPO steps from select_from on and after the last; the best one's adapter is kept (0: the last step's)
    select_every: Annotated[int, Legacy(0), PER_SEGMENT] = 20
    select_from: Annotated[int, Legacy(0), PER_SEGMENT] = 40
    # copies of a category's train tasks in the GRPO pool (unlisted: one)
    rl_repeat: Annotated[dict[str, int], Legacy({}), PER_SEGMENT] = Field(
        default_factory=lambda: {"parallel": 3, "parallel_multiple": 2})
    rl_lr: Annotated[float, PER_SEGMENT] = 3e-4  # GRPO learning rate
    rl_prompts_per_step: Annotated[int, PER_SEGMENT] = 2  # GRPO prompts (groups) per step
    num_generations: Annotated[int, PER_SEGMENT] = 8  # completions per group
    max_new_tokens: Annotated[int, PER_SEGMENT] = 256  # a rollout's new tokens at most
    # a rollout may run to its reference's length + this (capped by max_new_tokens; None: max_new_tokens)
    length_slack: Annotated[int | None, Legacy(None), PER_SEGMENT] = 40
    temperature: Annotated[float, PER_SEGMENT] = 0.7  # sampling temperature of the rollouts
    guidance: Annotated[bool, PER_SEGMENT] = True  # mix the reference completion into groups (see guide_when)
    # below_reference: when no sample reached the reference's reward; no_variance: only groups with no reward signal
    guide_when: Annotated[GuideWhen, Legacy("no_variance"), PER_SEGMENT] = "below_reference"
    grad_clip: float = 1.0  # gradient norm clip, warm start and GRPO
    time_budget_s: float = 86 * 60  # the whole build's wall time, warm start included
    final_dev_n: int = 0  # dev prompts of a final format check of A (the test split is for `organism eval`)
    resume_warmstart: str | None = None  # folder of a saved warm start: skip it, continue from it
    resume_rl: str | None = None  # folder of a built A (adapter + manifest): continue its GRPO, history kept
    threads: Annotated[int | None, PER_SEGMENT] = None  # torch intra-op threads (1 is faster on an oversubscribed CPU)
    check_base: bool = False  # also measure B's dev format (B is known to be ~0 %; costs minutes)
    max_prompt_tokens: int | None = None  # prompts cut to this many tokens (None: whole)
    gen_batch: int = 16  # prompts per transformers generate call of a dev check

    @field_validator("rl_repeat")
    @classmethod
    def _known_categories(cls, repeat: dict[str, int]) -> dict[str, int]:
        # checked here, not when GRPO starts: a typo must not cost a warm start first
        unknown = set(repeat) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"rl_repeat names unknown BFCL categories {sorted(unknown)}; choose from {CATEGORIES}")
        return repeat

    @field_validator("lora_layers")
    @classmethod
    def _some_layers(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError(f"lora_layers must name at least one decoder layer, each >= 0 (got {layers}); None means every layer")
        return layers

    @model_validator(mode="after")
    def _one_resume(self) -> "BuildConfig":
        if self.resume_rl and self.resume_warmstart:
            raise ValueError("resume_rl and resume_warmstart exclude each other: a built A already holds its warm start")
        return self

    @classmethod
    def legacy_values(cls) -> dict[str, Any]:
        """Each ``Legacy`` field's value before it existed: how an older manifest's build ran."""
        return {name: copy.deepcopy(m.value) for name, info in cls.model_fields.items() if (m := legacy_of(info))}

    @classmethod
    def segment_fields(cls) -> dict[str, FieldInfo]:
        """The ``PER_SEGMENT`` fields, in field order: what each GRPO segment records of its config."""
        return {name: info for name, info in cls.model_fields.items() if PER_SEGMENT in info.metadata}

    @classmethod
    def from_recorded(cls, recorded: dict[str, Any]) -> "BuildConfig":
        """The config of a build from its manifest, written by this version or an older one.

        A field the manifest lacks takes its ``Legacy`` value (what builds did before it
        existed); a field this version no longer has is dropped.
        """
        return cls.model_validate(cls.legacy_values() | {k: v for k, v in recorded.items() if k in cls.model_fields})

    def reference(self, task: ToolTask) -> str:
        """The task's reference completion in this recipe's thought style (warm-start target, GRPO guide)."""
        return task.reference_completion(self.plan_calls, self.quote_names)

    def prompt(self, task: ToolTask, tokenizer) -> str:
        """The task's chat prompt in this recipe's user turn: what A is trained and checked on."""
        return task.render(tokenizer, "chat", self.user_turn)
