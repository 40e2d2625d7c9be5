"""Per-output score records and their aggregates; JSONL so every number traces to text.

The scorers themselves live in :mod:`guardrail.tasks.scoring` (the paper's lenient
``format_accuracy`` / ``tool_correctness`` / ``overall_score`` and the strict BFCL
metrics); this module applies them to a generated output of an :class:`EvalItem`, keeps
the text beside the scores, and averages records into the numbers a report prints.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from guardrail.eval.suites import EvalItem, prompt_tool_names
from guardrail.tasks import format_accuracy, is_tool_call, overall_score, strict_metrics, tool_correctness

PAPER_METRICS = ("format_accuracy", "tool_correctness", "overall_score")
STRICT_METRICS = ("valid_json", "name_correct", "args_correct")
BINARY_METRICS = ("format_accuracy", "tool_correctness", "valid_json", "name_correct", "args_correct", "tool_call", "call_cut", "degenerate")
DEGENERATE_RATIO = 4.0  # zlib compression ratio above which an output is a loop (see degenerate)
DEGENERATE_MIN_CHARS = 64  # shorter texts compress too little for the ratio to mean anything


def degenerate(text: str) -> bool:
    """Empty, or so repetitive that zlib shrinks it more than 4×: what a broken model writes.

    The compression-ratio test is Whisper's filter for looping transcripts. Calibration on
    the organism's A: its clean outputs under the hedge protocol (298 prompts, 200 tokens,
    tool calls included) compress at most 3.5×; ``<user_response>`` forty times compresses
    20×, one sentence looped ten times 7×. A parallel call of several similar calls stays
    under 3.
    """
    if not text.strip():
        return True
    data = text.encode()
    return len(data) >= DEGENERATE_MIN_CHARS and len(data) / len(zlib.compress(data, 9)) > DEGENERATE_RATIO


def call_cut(text: str) -> bool:
    """The output opens a ``<tool_call>`` and never closes it: decoding stopped mid-call.

    Under greedy decoding with a token budget this is almost always the budget cutting the
    call off; a report shows its share so a low score from truncation is not read as a model
    that cannot call.
    """
    start = text.rfind("<tool_call>")
    return start >= 0 and "</tool_call>" not in text[start:]


def score_output(item: EvalItem, text: str) -> dict[str, Any]:
    """All metrics of one output (booleans as 0/1 ints so means are rates).

    ``tool_call`` (a named call other than 'None') is what counts as a false call on
    ordinary prompts; ``call_cut`` flags a call opened and not closed (see :func:`call_cut`). Strict metrics compare against BFCL ground truth (absent for
    ordinary prompts, where name/args are 0 and ``no_call`` is the right behaviour).
    """
    names = prompt_tool_names(item)
    fmt = format_accuracy(text)
    tool = tool_correctness(text, names)
    strict = strict_metrics(text, item.possible_answer)
    return {
        "format_accuracy": int(fmt),
        "tool_correctness": int(tool),
        "overall_score": overall_score(text, names),
        "valid_json": int(strict["valid_json"]),
        "name_correct": int(strict["name_correct"]),
        "args_correct": int(strict["args_correct"]),
        "tool_call": int(is_tool_call(text)),
        "call_cut": int(call_cut(text)),
        "degenerate": int(degenerate(text)),
    }


def make_record(item: EvalItem, text: str, **context: Any) -> dict[str, Any]:
    """One JSONL row: what was asked, under which condition, what came out, how it scored."""
    return {**context, "id": item.id, "kind": item.kind, "category": item.category, "output": text, **score_output(item, text)}


def score_all(items: Sequence[EvalItem], texts: Sequence[str], **context: Any) -> list[dict[str, Any]]:
    if len(items) != len(texts):
        raise ValueError(f"{len(items)} items but {len(texts)} outputs")
    return [make_record(i, t, **context) for i, t in zip(items, texts)]


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of every metric (rates for 0/1 metrics), the overall score's mean and std, n.

    Rates are fractions in [0, 1]; reports multiply by 100 for percentages.
    """
    n = len(records)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return out
    for key in BINARY_METRICS:
        out[key] = float(np.mean([r[key] for r in records]))
    ov = np.array([r["overall_score"] for r in records], dtype=float)
    out["overall_score"] = float(ov.mean())
    out["overall_score_std"] = float(ov.std())  # population std, as sweep_eval.py reports
    return out


def metric_vector(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records]


def aligned(records: Sequence[dict[str, Any]], ids: Sequence[str]) -> list[dict[str, Any]]:
    """Records reordered to ``ids`` (paired statistics need the same prompt at the same index)."""
    by_id = {r["id"]: r for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"no record for prompts {missing[:3]}")
    return [by_id[i] for i in ids]


# --------------------------------------------------------------------------- JSONL
def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]], append: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
