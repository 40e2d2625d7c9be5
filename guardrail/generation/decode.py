"""Generated token ids to text: the one decode rule and the one handling of stop strings.

Both engines end a completion the same way: at its first end-of-sequence token, with
trailing padding dropped, decoded with special tokens kept (added tokens such as
``<tool_call>`` are marked special by some tokenizers, and the scorers read them), and cut
right after its earliest stop string. The engines are asked to stop on the same strings
(:func:`hf_stop_kwargs`, :func:`vllm_stop_kwargs`), so the cut only removes what a
multi-token stop string's last token carried past it.
"""

from __future__ import annotations

from typing import Any, Sequence


def eos_ids(model: Any, tok: Any) -> set[int]:
    """Every token that ends a sequence: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def completion_ids(ids: Sequence[int], eos: set[int], pad: int | None) -> list[int]:
    """The ids before the first end-of-sequence token, trailing padding dropped."""
    out: list[int] = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    while out and out[-1] == pad:
        out.pop()
    return out


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to and including its earliest stop string."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


def decode_completion(tok: Any, ids: Sequence[int], eos: set[int], stop: Sequence[str] = ()) -> str:
    """A completion's text by the one rule: cut at EOS, special tokens kept, cut after a stop string."""
    text = tok.decode(completion_ids(ids, eos, tok.pad_token_id), skip_special_tokens=False)
    return trim_at_stop(text, stop)


def hf_stop_kwargs(stop: Sequence[str], tok: Any) -> dict[str, Any]:
    """Arguments that make transformers' ``generate`` end a row once it wrote a stop string."""
    return {"stop_strings": list(stop), "tokenizer": tok} if stop else {}


def vllm_stop_kwargs(stop: Sequence[str]) -> dict[str, Any]:
    """``SamplingParams`` fields that make vLLM end a row on a stop string, keeping it in the output."""
    return {"stop": list(stop) or None, "include_stop_str_in_output": True}
