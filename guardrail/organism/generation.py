"""Batched generation with transformers, for building and evaluating the organism.

Generation stops early for a sequence once it closes its tool call or response (or hits
EOS): the ToolRL format ends there, and on CPU every extra token is paid for by the
whole batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

STOP_STRINGS = ("</tool_call>", "</response>")


class _StopOnStrings(StoppingCriteria):
    """Per-sequence stop once any stop string appears in the generated part."""

    def __init__(self, tokenizer, prompt_len: int, stops: Sequence[str]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, tuple(stops)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:][:, -12:], skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], dtype=torch.bool, device=input_ids.device)


class _StopWhen(StoppingCriteria):
    """Per-sequence stop once ``done(generated text)`` holds (for verdicts that cannot change later)."""

    def __init__(self, tokenizer, prompt_len: int, done: Callable[[str], bool]):
        self.tokenizer, self.prompt_len, self.done = tokenizer, prompt_len, done

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    stop_strings: Sequence[str] = STOP_STRINGS,
    max_prompt_tokens: int | None = None,
    stop_when: Callable[[str], bool] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[str]:
    """Completions (decoded, special tokens removed) for already-rendered prompts.

    Prompts are left-padded in batches sorted by length (less padding), results are
    returned in input order. ``max_prompt_tokens`` keeps only the last tokens of longer
    prompts (for tiny test models with short context). ``stop_when(text)`` ends a sequence
    early once it holds: a check whose verdict is settled (the tool-call format, once
    written, stays written) need not pay for the rest. ``progress(done, total, secs)``.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    t0 = time.time()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = encode_prompts(tokenizer, [prompts[i] for i in idx], max_prompt_tokens)
        plen = enc["input_ids"].shape[1]
        criteria = [_StopOnStrings(tokenizer, plen, stop_strings)] if stop_strings else []
        criteria += [_StopWhen(tokenizer, plen, stop_when)] if stop_when else []
        stopping = StoppingCriteriaList(criteria) if criteria else None
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            stopping_criteria=stopping,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        texts = tokenizer.batch_decode(gen[:, plen:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            out[i] = text
        if progress:
            progress(min(start + batch_size, len(order)), len(order), time.time() - t0)
    model.train(was_training)
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch; prompts already carry their special tokens (chat template)."""
    tokenizer.padding_side = "left"
    if max_prompt_tokens is not None:
        tokenizer.truncation_side = "left"
        return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False, truncation=True, max_length=max_prompt_tokens)
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
