"""The residual at each prompt's last token, read from prompts tokenized as generation tokenizes them.

The paper's patch rewrites exactly this activation, so the vector a condition writes and
the one read here belong to the same token of the same (left-truncated) prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from guardrail.generation.tokenize import encode_prompts, length_batches
from guardrail.residual.hf import read_residual


@torch.no_grad()
def last_token_residual(loaded: Any, prompts: Sequence[str], layer: int, *, batch_size: int = 8,
                        max_prompt_tokens: int | None = None) -> torch.Tensor:
    """One model's raw residual ``[N, d]`` after ``layer`` at each prompt's last token."""
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    for idx in length_batches(prompts, batch_size):
        enc = encode_prompts(loaded.tokenizer, [prompts[i] for i in idx], max_prompt_tokens)
        acts = read_residual(loaded.model, layer, enc["input_ids"], enc["attention_mask"])[:, -1].float()
        for j, i in enumerate(idx):
            rows[i] = acts[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def last_token_activations(pair: Any, prompts: Sequence[str], layer: int, *, batch_size: int = 8,
                           max_prompt_tokens: int | None = None) -> torch.Tensor:
    """Raw residual ``[N, 2, d]`` of A (0) and B (1) at the last prompt token after ``layer``."""
    kw = dict(batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    return torch.stack([last_token_residual(pair.a, prompts, layer, **kw), last_token_residual(pair.b, prompts, layer, **kw)], dim=1)
