"""Many conditions over the same prompts: patched conditions in prefix-cache-sized chunks, and guard policies."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from guardrail.generation.backend import Backend, Patch
from guardrail.generation.decode import decode_completion, eos_ids
from guardrail.generation.settings import GenerationSettings
from guardrail.generation.tokenize import length_batches


def generate_conditions(backend: Backend, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
                        conditions: dict[str, Sequence[Patch] | None], *, layer: int | None = None,
                        progress: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    """Greedy outputs of every condition (its per-prompt patches, or None) on every prompt.

    Prompts go in chunks that vLLM's prefix cache can hold while all conditions decode
    them: the first condition prefills and caches each prompt, the others (one batched
    call) recompute only the patched last token. Run condition by condition, each would
    prefill every ~700-token tool prompt again — most of an audit's time on a CPU.
    ``progress(n)`` is called with the number of prompts finished after each chunk.
    """
    names = list(conditions)
    chunk = backend.prompts_per_chunk(loaded, prompts, settings, len(names))
    out: dict[str, list[str]] = {n: [] for n in names}
    for s in range(0, len(prompts), chunk):
        sub = list(prompts[s : s + chunk])

        def part(name: str) -> list[Patch]:
            p = conditions[name]
            return [None] * len(sub) if p is None else list(p[s : s + chunk])

        out[names[0]] += backend.generate(loaded, sub, settings, layer=layer, patches=part(names[0]))
        if len(names) > 1:
            texts = backend.generate(loaded, sub * (len(names) - 1), settings, layer=layer,
                                     patches=[p for n in names[1:] for p in part(n)])
            for i, n in enumerate(names[1:]):
                out[n] += texts[i * len(sub) : (i + 1) * len(sub)]
        if progress is not None:
            progress(len(sub))
    return out


Plan = Callable[[range, torch.Tensor], dict[str, Sequence[Patch]]]


def generate_from_clean(backend: Backend, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, plan: Plan, *,
                        layer: int, n_conditions: int, progress: Callable[[int], None] | None = None
                        ) -> tuple[dict[str, list[str]], torch.Tensor]:
    """Clean greedy outputs, the residual after ``layer`` at each prompt's last token, and
    the outputs of every condition ``plan`` derives from those residuals.

    The residuals are read on the clean outputs' own prefill, so the conditions that depend
    on them need no separate pass over the prompts: per chunk of prompts (sized for
    ``n_conditions`` as :func:`generate_conditions` sizes it), the clean pass prefills and
    reads; ``plan(indices, rows)`` gives each condition's patches for those prompts; then
    every distinct (prompt, patch) pair is generated once, in one batched call. A ``None``
    patch is the clean prompt and takes the clean output; two conditions writing the same
    vector into the same prompt share one generation. Returns ``({"clean": ..., **conditions}, rows [N, d])``.
    """
    chunk = backend.prompts_per_chunk(loaded, prompts, settings, n_conditions)
    out: dict[str, list[str]] = {"clean": []}
    reads: list[torch.Tensor] = []
    for s in range(0, len(prompts), chunk):
        sub = list(prompts[s : s + chunk])
        clean, rows = backend.generate_reading(loaded, sub, settings, layer=layer)
        out["clean"] += clean
        reads.append(rows)
        for name, texts in _patched(backend, loaded, sub, settings, layer, plan(range(s, s + len(sub)), rows), clean).items():
            out.setdefault(name, []).extend(texts)
        if progress is not None:
            progress(len(sub))
    return out, torch.cat(reads) if reads else torch.zeros(0)


def _patched(backend: Backend, loaded: Any, prompts: list[str], settings: GenerationSettings, layer: int,
             planned: dict[str, Sequence[Patch]], clean: list[str]) -> dict[str, list[str]]:
    """Each planned condition's outputs; distinct (prompt, patch) pairs generated once, ``None`` rows clean."""
    jobs: dict[tuple[int, bytes], tuple[int, torch.Tensor]] = {}  # (prompt, patch bytes) -> (its place in the call, the patch)
    keys = {name: [None if p is None else (i, p.detach().float().cpu().numpy().tobytes()) for i, p in enumerate(patches)]
            for name, patches in planned.items()}
    for name, row_keys in keys.items():
        for key, p in zip(row_keys, planned[name]):
            if key is not None:
                jobs.setdefault(key, (len(jobs), p))
    texts = backend.generate(loaded, [prompts[i] for i, _ in jobs], settings, layer=layer, patches=[p for _, p in jobs.values()]) if jobs else []
    return {name: [clean[i] if key is None else texts[jobs[key][0]] for i, key in enumerate(row_keys)] for name, row_keys in keys.items()}


def generate_under_policies(backend: Backend, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
                            artifact: Any, policies: dict[str, Any]) -> dict[str, list[str]]:
    """Greedy outputs of every prompt under each named guard policy (acting wherever its rules say).

    vLLM: :meth:`guardrail.vllm.generation.VLLMBackend.under_policies`. Transformers: the
    :func:`guardrail.policy.guard` context manager per policy, ``settings.batch_size`` rows
    at a time. Either way the text is decoded by :mod:`guardrail.generation.decode`.
    """
    under = getattr(backend, "under_policies", None)
    if under is not None:
        return under(loaded, prompts, settings, artifact, policies)
    return {name: _hf_guarded(loaded, prompts, settings, artifact, pol) for name, pol in policies.items()}


def _hf_guarded(loaded: Any, prompts: Sequence[str], settings: GenerationSettings, artifact: Any, policy: Any) -> list[str]:
    from guardrail.policy import guard

    tok, eos, out = loaded.tokenizer, eos_ids(loaded.model, loaded.tokenizer), [""] * len(prompts)
    with guard(loaded, artifact, policy) as g:
        for idx in length_batches(prompts, settings.batch_size):
            for i, res in zip(idx, g.generate([prompts[i] for i in idx], max_new_tokens=settings.max_new_tokens)):
                out[i] = decode_completion(tok, res.token_ids, eos, settings.stop)
    return out
