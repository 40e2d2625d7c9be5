"""Batched greedy generation with transformers, with an optional one-shot last-prompt-token patch.

Prompts go in left-padded batches of similar length; with left padding, column −1 is
every row's last prompt token, so the paper's patch is a forward hook
(:func:`guardrail.residual.hf.patch_residual`) that rewrites that column on the prefill
pass only, and a read of that column on the same pass gives the residual the completion
was generated from. Texts are decoded by :mod:`guardrail.generation.decode`.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from guardrail.generation.backend import Patch, check_patches
from guardrail.generation.decode import decode_completion, eos_ids, hf_stop_kwargs
from guardrail.generation.settings import GenerationSettings
from guardrail.generation.tokenize import encode_prompts, length_batches
from guardrail.residual.hf import patch_residual

Rows = Sequence[tuple[int, torch.Tensor]]  # (row of the batch, its replacement vector)


class _StopWhen(StoppingCriteria):
    """Per-row stop once ``done(text so far)`` holds (for verdicts that cannot change later)."""

    def __init__(self, tok: Any, prompt_len: int, eos: set[int], done: Callable[[str], bool]) -> None:
        self.tok, self.prompt_len, self.eos, self.done = tok, prompt_len, eos, done

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        texts = [decode_completion(self.tok, row, self.eos) for row in input_ids[:, self.prompt_len :].tolist()]
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_batch(model: Any, tok: Any, enc: dict[str, torch.Tensor], settings: GenerationSettings, *, layer: int | None = None,
                   rows: Rows = (), criteria: Sequence[StoppingCriteria] = (), read: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Greedy ``generate`` of one encoded batch; ``rows`` get their vector written at the last
    prompt token after ``layer``, once, during prefill (decode steps are untouched). With
    ``read`` (a list), the residual after ``layer`` at every row's last prompt token, as the
    prefill computed it (after the write), is appended to it as one ``[B, d]`` tensor."""
    kwargs: dict[str, Any] = dict(do_sample=False, max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id, top_p=None, top_k=None,
                                  temperature=None, **hf_stop_kwargs(settings.stop, tok))
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    with ExitStack() as stack:
        if rows:
            stack.enter_context(patch_residual(model, layer, _on_prefill(lambda hidden: _written(hidden, rows))))
        if read is not None:  # entered after the write: forward hooks see the output the previous hook returned
            stack.enter_context(patch_residual(model, layer, _on_prefill(lambda hidden: read.append(hidden[:, -1].float().clone()))))
        return model.generate(**enc, **kwargs)


def _on_prefill(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``fn`` on the first forward pass of a ``generate`` call (the prefill) only."""
    done = False

    def once(hidden: torch.Tensor) -> torch.Tensor | None:
        nonlocal done
        if done:
            return None
        done = True
        return fn(hidden)

    return once


def _written(hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
    new = hidden.clone()
    for j, vec in rows:
        new[j, -1] = vec.to(new.dtype)
    return new


def generate_texts(model: Any, tok: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                   patches: Sequence[Patch] | None = None, stop_when: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy completions of ``prompts`` in input order, in eval mode (the model's mode is restored).

    ``patches[i]`` replaces prompt i's last-token residual after ``layer`` at prefill.
    ``stop_when(text)`` ends a row early once it holds: a check whose verdict is settled
    (the tool-call format, once written, stays written) need not pay for the rest.
    """
    return _generate(model, tok, prompts, settings, layer=layer, patches=patches, stop_when=stop_when)[0]


def generate_reading(model: Any, tok: Any, prompts: Sequence[str], settings: GenerationSettings, layer: int) -> tuple[list[str], torch.Tensor]:
    """Greedy completions of ``prompts`` and the residual ``[N, d]`` after ``layer`` at each
    prompt's last token, read on the prefill that generated them: no second forward pass."""
    return _generate(model, tok, prompts, settings, layer=layer, read=True)  # type: ignore[return-value]


def _generate(model: Any, tok: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
              patches: Sequence[Patch] | None = None, stop_when: Callable[[str], bool] | None = None,
              read: bool = False) -> tuple[list[str], torch.Tensor | None]:
    check_patches(prompts, patches, layer)
    eos = eos_ids(model, tok)
    out: list[str] = [""] * len(prompts)
    acts: list[torch.Tensor | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for idx in length_batches(prompts, settings.batch_size):
            enc = encode_prompts(tok, [prompts[i] for i in idx], settings.max_prompt_tokens)
            width = enc["input_ids"].shape[1]
            rows = [(j, patches[i]) for j, i in enumerate(idx) if patches is not None and patches[i] is not None]
            criteria = [_StopWhen(tok, width, eos, stop_when)] if stop_when is not None else []
            seen: list[torch.Tensor] | None = [] if read else None
            gen = generate_batch(model, tok, enc, settings, layer=layer, rows=rows, criteria=criteria, read=seen)
            for j, i in enumerate(idx):
                out[i] = decode_completion(tok, gen[j, width:].tolist(), eos, settings.stop)
                if seen:
                    acts[i] = seen[0][j]
    finally:
        model.train(was_training)
    return out, (torch.stack(acts) if read else None)  # type: ignore[arg-type]


class TransformersBackend:
    """The harness's transformers engine: :func:`generate_texts` on a loaded model."""

    name = "transformers"

    def prompts_per_chunk(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, n_conditions: int) -> int:
        return max(len(prompts), 1)  # no prefix cache to fit: one chunk

    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]:
        return generate_texts(loaded.model, loaded.tokenizer, prompts, settings, layer=layer, patches=patches)

    def generate_reading(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int) -> tuple[list[str], torch.Tensor]:
        return generate_reading(loaded.model, loaded.tokenizer, prompts, settings, layer)
