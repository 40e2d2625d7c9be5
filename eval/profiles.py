"""Run profiles: ``quick`` (CPU, the embedded pair, ≤ 45 min on 2 cores) and ``paper`` (GPU, full protocol).

A profile fixes every size of a reproduction run; CLI options override single fields.
The tiny random pair gets a smoke-sized version of each profile (its 1024-position
context and random weights make long prompts and long generations pointless).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from guardrail.paper import PAPER_ALPHAS
from guardrail.tasks import UserTurn


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    # evaluation prompts (BFCL test split) and ordinary prompts (ranking, explanations)
    n_tool: int = Field(gt=0)
    n_plain: int = Field(ge=0)
    # activation collection for training and ranking (train split)
    train_tool: int = Field(gt=0)
    train_plain: int = Field(gt=0)
    train_last_n: int | None = Field(32, description="collect the last N prompt tokens per prompt (None = every token)")
    collect_batch: int = 8
    # dictionaries: every one comes from the sweep grid (scaled to the width); the main
    # free / penalised DFC and standard crosscoder are its smallest (D, k) at `exclusive`
    grid: str = "paper"
    exclusive: float = 0.05
    steps: int | None = Field(None, description="override the grid's training steps (None = the grid's)")
    batch_size: int | None = Field(None, description="override the grid's batch size")
    # steering
    sizes: list[int | Literal["all"]] = [1, 2, 3, 5, 8, 13, 21, 33, "all"]
    alphas: list[float] = list(PAPER_ALPHAS)
    # sweep
    sweep_prompts: int | None = Field(None, description="tool prompts per sweep variant (None = n_tool)")
    # generation: the tool prompts' user turn (raw rendering), see guardrail.tasks.UserTurn
    turn: UserTurn = "toolrl"
    max_new_tokens: int = 200
    gen_batch: int = 8
    max_prompt_tokens: int | None = None
    # explanations
    explain_per_partition: int = 3
    explain_prompts: int = 40
    n_boot: int = 1000
    experiments: list[str] = ["splice", "steering", "ablation", "sweep", "geometry", "explain"]

    def with_overrides(self, **kw: Any) -> "Profile":
        upd = {k: v for k, v in kw.items() if v is not None}
        return self.model_validate({**self.model_dump(), **upd}) if upd else self


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick", n_tool=40, n_plain=40, train_tool=300, train_plain=300, train_last_n=32,
        sizes=[1, 3, "all"], alphas=[1.0, 16.0, 64.0],
        grid="quick", sweep_prompts=40,
        # the embedded organism's hedge rendering (docs/phenomenon.md): under ToolRL's user turn its A
        # writes no call in the raw rendering, leaving nothing to splice or steer; it names its tool within 64 tokens
        turn="dialogue", max_new_tokens=64, gen_batch=8, explain_prompts=24,
    ),
    "paper": Profile(
        name="paper", n_tool=100, n_plain=100, train_tool=4000, train_plain=4000, train_last_n=None,
        grid="paper", max_new_tokens=200, gen_batch=32, explain_prompts=200,
    ),
}

# Smoke-sized settings for the random tiny pair (2 layers, d=128, 1024 positions, char tokenizer).
TINY_OVERRIDES: dict[str, Any] = {
    "n_tool": 8, "n_plain": 8, "train_tool": 16, "train_plain": 16, "train_last_n": 16,
    "steps": 120, "batch_size": 64, "sweep_prompts": 6, "grid": "quick",
    "sizes": [1, 2, "all"], "alphas": [1.0, 16.0, 64.0], "max_new_tokens": 8, "max_prompt_tokens": 900,
    "explain_prompts": 6, "explain_per_partition": 2, "n_boot": 200, "gen_batch": 8,
}


def get_profile(name: str, pair: str | None = None, **overrides: Any) -> Profile:
    """The named profile, smoke-sized for the tiny pair, with CLI overrides applied last."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    prof = PROFILES[name]
    if pair == "tiny":
        prof = prof.with_overrides(**TINY_OVERRIDES)
    return prof.with_overrides(**overrides)
