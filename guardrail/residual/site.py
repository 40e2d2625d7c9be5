"""Where in a model to read or write: a layer's output residual stream and which tokens."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Positions = Literal["last_prompt", "prompt", "generated", "all"]


class Site(BaseModel):
    """The residual stream after decoder layer ``layer`` at the chosen token positions.

    ``last_prompt`` is the paper's protocol (one activation per prompt, patched once at
    prefill); ``prompt`` with ``last_n`` keeps the last N prompt tokens, which is how
    training data gets enough rows without drifting far from the last-token distribution.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=0)
    positions: Positions = "last_prompt"
    last_n: int | None = Field(default=None, ge=1, description="with positions='prompt': only the last N prompt tokens")

    def prompt_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bool [B, T] of prompt tokens this site selects, for left-padded prompts."""
        real = attention_mask.bool()
        if self.positions == "last_prompt":
            sel = torch.zeros_like(real)
            sel[:, -1] = real[:, -1]
            return sel
        if self.positions == "generated":
            return torch.zeros_like(real)
        if self.last_n is None:
            return real
        from_end = real.flip(1).cumsum(1).flip(1)  # 1 at the last real token, 2 before it...
        return real & (from_end <= self.last_n)

    def validate_for(self, n_layers: int) -> None:
        if self.layer >= n_layers:
            raise ValueError(f"site layer {self.layer} does not exist: the model has layers 0..{n_layers - 1}")
