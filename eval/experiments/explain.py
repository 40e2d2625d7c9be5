"""Feature explanations without an LLM judge: top-activating contexts and template share.

For the top tool-signed features of each partition, every prompt token of a suite is
encoded (joint encoding of A's and B's residual at the crosscoder's layer) and the
strongest activations are kept with their surrounding text. The *template share* is the
fraction of those top activations that sit on tokens of the tool-call output template
(``<tool_call>``, ``</tool_call>``, ``<response>``, ``<think>``, …) — the paper found its top
features to be structural-template detectors (firing on ``</tool_call> <response>``).

A marker that every tool prompt ends with (``</user>`` in the raw ToolRL rendering) is not
counted: ranking reads the last prompt token, so a top "tool-signed" feature firing there
marks where a tool prompt ends — which ordinary prompts, bare text, never share — not the
call template. :func:`prompt_end_markers` finds such markers and the share and its base
rate are computed without them.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from guardrail.eval.suites import Suite
from guardrail.residual.hf import read_residual

TEMPLATE_MARKERS = ("<tool_call>", "</tool_call>", "<response>", "</response>", "<think>", "</think>", "<obs>", "</obs>",
                    "<user>", "</user>", '"name"', '"parameters"')


def _marker_re(markers: Sequence[str]) -> re.Pattern[str] | None:
    return re.compile("|".join(re.escape(m) for m in markers)) if markers else None


def template_spans(text: str, markers: Sequence[str] = TEMPLATE_MARKERS) -> list[tuple[int, int]]:
    """Character spans of the template markers in ``text``."""
    rx = _marker_re(markers)
    return [(m.start(), m.end()) for m in rx.finditer(text)] if rx else []


def prompt_end_markers(texts: Sequence[str], markers: Sequence[str] = TEMPLATE_MARKERS) -> list[str]:
    """Markers that every one of ``texts`` ends with (the token a last-prompt-token ranking reads)."""
    return [m for m in markers if texts and all(t.rstrip().endswith(m) for t in texts)]


def token_spans(tok: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token (offset mapping when the tokenizer has one)."""
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] == ids:
            return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):
        pass
    spans, pos = [], 0
    for t in ids:
        piece = tok.decode([t])
        start = text.find(piece, pos) if piece else -1
        start = pos if start < 0 else start
        spans.append((start, start + len(piece)))
        pos = start + len(piece)
    return spans


def on_template(span: tuple[int, int], marks: Sequence[tuple[int, int]]) -> bool:
    return any(span[0] < e and s < span[1] for s, e in marks)


@torch.no_grad()
def run_explain(pair: Any, cc: Any, ranking: Any, suite: Suite, layer: int, *, per_partition: int = 3, top_k: int = 10,
                window: int = 40, max_prompt_tokens: int | None = None, batch_size: int = 4) -> dict[str, Any]:
    """Top contexts and template share of the top tool-signed features of each partition."""
    parts = ("a_exclusive", "b_exclusive", "shared") if cc.is_dfc else ("shared",)
    chosen: list[tuple[str, int]] = [(p, i) for p in parts for i in ranking.top("tool", p, per_partition)]
    if not chosen:
        return {"features": [], "note": "no tool-signed feature to explain"}
    idx = torch.tensor([i for _, i in chosen])
    ending = prompt_end_markers([text for item, text in zip(suite.items, suite.texts) if item.is_tool])
    counted = [m for m in TEMPLATE_MARKERS if m not in ending]
    best_vals, best_loc, fire_counts, n_tokens = _scan(pair, cc, suite.texts, idx, layer, top_k, max_prompt_tokens, batch_size)
    contexts_of = _Contexts(pair.tokenizer, suite, window, max_prompt_tokens, counted)
    features = []
    for j, (part, fi) in enumerate(chosen):
        contexts = [contexts_of.at(p, t, v) for v, (p, t) in zip(best_vals[j].tolist(), best_loc[j].tolist()) if v > 0 and p >= 0]
        n_pos, stat = len(contexts), ranking.stat(fi)
        features.append({"feature": fi, "partition": part, "cohens_d": stat.cohens_d, "auroc": stat.auroc,
                         "fire_rate_tokens": float(fire_counts[j] / max(n_tokens, 1)), "n_top": n_pos,
                         "template_share": sum(c["on_template"] for c in contexts) / n_pos if n_pos else None,
                         "last_token_share": sum(c["last_prompt_token"] for c in contexts) / n_pos if n_pos else None,
                         "top_contexts": contexts})
    shares = [f["template_share"] for f in features if f["template_share"] is not None]
    return {"n_prompts": len(suite), "n_tokens": n_tokens, "markers": counted, "prompt_end_markers": ending, "features": features,
            "mean_template_share": sum(shares) / len(shares) if shares else None,
            "template_token_fraction": _template_fraction(pair.tokenizer, suite.texts, max_prompt_tokens, counted)}


def _scan(pair: Any, cc: Any, texts: Sequence[str], idx: torch.Tensor, layer: int, top_k: int,
          max_prompt_tokens: int | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Encode every prompt token; keep each feature's ``top_k`` activations and where they sit.

    Returns values [F, top_k], locations [F, top_k, 2] as (prompt, token position counted
    from the first real token; -1 when unfilled), firing counts [F] and the token count.
    """
    tok = pair.tokenizer
    best_vals = torch.full((len(idx), top_k), -1.0)
    best_loc = torch.full((len(idx), top_k, 2), -1, dtype=torch.long)
    fire_counts, n_tokens = torch.zeros(len(idx)), 0
    kw = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
    for start in range(0, len(texts), batch_size):
        side, tok.truncation_side = tok.truncation_side, "left"
        try:
            enc = tok(list(texts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False, **kw)
        finally:
            tok.truncation_side = side
        ids, mask = enc["input_ids"], enc["attention_mask"]
        acts = torch.stack([read_residual(m.model, layer, ids, mask).float() for m in (pair.a, pair.b)], dim=2)  # [B, T, 2, d]
        real = mask.bool()
        flat = acts[real]
        f = cc.encode(cc.normalize(flat))[:, idx]  # [n_real, F]
        n_tokens += flat.shape[0]
        fire_counts += (f > 0).float().sum(0)
        b_idx, t_idx = real.nonzero(as_tuple=True)
        locs = torch.stack([b_idx + start, t_idx - (~real).sum(1)[b_idx]], dim=1)
        for j in range(len(idx)):
            vals = torch.cat([best_vals[j], f[:, j]])
            top = vals.topk(min(top_k, len(vals))).indices
            best_vals[j], best_loc[j] = vals[top], torch.cat([best_loc[j], locs])[top]
    return best_vals, best_loc, fire_counts, n_tokens


class _Contexts:
    """Turns (prompt, token) locations into readable contexts; tokenises each prompt once."""

    def __init__(self, tok: Any, suite: Suite, window: int, max_prompt_tokens: int | None, markers: Sequence[str] = TEMPLATE_MARKERS):
        self.tok, self.window, self.max_prompt_tokens, self.markers = tok, window, max_prompt_tokens, markers
        self.texts, self.items = suite.texts, suite.items
        self._tokens: dict[int, tuple[int, list[tuple[int, int]], list[tuple[int, int]]]] = {}

    def _prompt(self, p: int) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
        if p not in self._tokens:
            text = self.texts[p]
            full = self.tok(text, add_special_tokens=False)["input_ids"]
            kept = min(len(full), self.max_prompt_tokens) if self.max_prompt_tokens else len(full)
            self._tokens[p] = (kept, token_spans(self.tok, text, full), template_spans(text, self.markers))
        return self._tokens[p]

    def at(self, p: int, t: int, value: float) -> dict[str, Any]:
        kept, spans, marks = self._prompt(p)
        offset = len(spans) - kept  # tokens dropped by left truncation
        span = spans[t + offset] if 0 <= t + offset < len(spans) else (0, 0)
        text, w = self.texts[p], self.window
        return {"prompt": self.items[p].id, "kind": self.items[p].kind, "activation": round(value, 4),
                "position": t, "token": text[span[0] : span[1]], "on_template": on_template(span, marks), "last_prompt_token": t == kept - 1,
                "context": text[max(0, span[0] - w) : span[0]] + "[[" + text[span[0] : span[1]] + "]]" + text[span[1] : span[1] + w // 2]}


def _template_fraction(tok: Any, texts: Sequence[str], max_prompt_tokens: int | None, markers: Sequence[str] = TEMPLATE_MARKERS) -> float:
    """Base rate: the share of all prompt tokens that are template tokens (what chance would give)."""
    total = hits = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spans = token_spans(tok, text, ids)
        if max_prompt_tokens:
            spans = spans[-max_prompt_tokens:]
        marks = template_spans(text, markers)
        total += len(spans)
        hits += sum(on_template(s, marks) for s in spans)
    return hits / total if total else 0.0
