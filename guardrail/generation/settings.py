"""How to decode: the settings every generation call of guardrail takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """Greedy decoding of ``max_new_tokens`` (the paper uses 200), ``batch_size`` rows at a time.

    ``max_prompt_tokens`` truncates prompts from the left, so the last prompt token (the one
    the paper patches) always survives. A sequence ends once it has written one of ``stop``;
    the stop string is kept in its text.
    """

    max_new_tokens: int = 200
    batch_size: int = 8
    max_prompt_tokens: int | None = None
    stop: tuple[str, ...] = ()
