"""Prompts to token ids, as every generation and residual read of guardrail tokenizes them."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def encode_prompts(tok: Any, texts: Sequence[str], max_prompt_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of already-rendered prompts (they carry their own special tokens).

    Left padding puts every row's last prompt token in column −1; truncation, when
    ``max_prompt_tokens`` is set, drops tokens from the left so that token survives. The
    tokenizer's padding and truncation sides are restored afterwards: the tokenizer is
    shared, and its other users keep their own settings.
    """
    sides = tok.padding_side, tok.truncation_side
    tok.padding_side, tok.truncation_side = "left", "left"
    try:
        kw: dict[str, Any] = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
        return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False, **kw)
    finally:
        tok.padding_side, tok.truncation_side = sides


def length_batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by length, so that a batch pads little."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
