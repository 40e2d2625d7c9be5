"""The ToolRL reward (Qian et al. 2025, §3.3) against BFCL possible answers.

``R = R_format + R_correct`` with

* ``R_format`` ∈ {0, 1}: the whole output is ``<think>…</think>\\n<tool_call>\\n…\\n</tool_call>``
  (one tool-call block) when a call is expected, ``<think>…</think>\\n<response>…</response>``
  when none is (BFCL irrelevance);
* ``R_correct`` ∈ [−3, 3]: −3 if the tool-call block is missing or not JSON; otherwise
  ToolRL's score ``S = r_name + Σ_gt (r_keys + r_values)`` scaled by its maximum
  ``1 + Σ_gt (1 + |params|)`` onto [−3, 3], where r_name is the frequency-aware Jaccard
  of called vs. expected names, and each expected call is greedily paired with the best
  unused predicted call of the same name: r_keys = Jaccard of parameter keys, r_values =
  number of parameters with an accepted value. BFCL adaptations: an expected parameter
  whose accepted values include ``""`` is optional — omitting it loses nothing (not in
  the key set, counted correct); values match BFCL-style (``scoring.param_ok``).
  Tasks without a ground-truth call score 0 here, as in ToolRL.
"""

from __future__ import annotations

import re
from collections import Counter

from guardrail.tasks.scoring import param_ok, parse_tool_calls
from guardrail.tasks.task import ToolTask

R_MAX, R_MIN = 3.0, -3.0
_CALL_FORMAT = re.compile(r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$", re.DOTALL)
_RESPONSE_FORMAT = re.compile(r"^<think>.*?</think>\n<response>.*?</response>$", re.DOTALL)


def match_score(a: list[str], b: list[str]) -> float:
    """Frequency-aware Jaccard similarity of two lists (1.0 if equal, 0.0 if one is empty)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    ca, cb = Counter(a), Counter(b)
    inter = sum(min(ca[k], cb[k]) for k in ca.keys() & cb.keys())
    return inter / (len(a) + len(b) - inter)


def format_reward(text: str, expects_call: bool = True) -> float:
    """1.0 if the stripped output has exactly ToolRL's structure, else 0.0."""
    text = text.strip()
    if expects_call:
        ok = _CALL_FORMAT.search(text) and text.count("<tool_call>") == 1 and text.count("</tool_call>") == 1
    else:
        ok = _RESPONSE_FORMAT.search(text) and text.count("<response>") == 1 and text.count("</response>") == 1
    return 1.0 if ok else 0.0


def _pair_score(gt_params: dict[str, list], args: dict) -> float:
    required_or_given = [k for k, opts in gt_params.items() if "" not in opts or k in args]
    key_score = match_score(sorted(required_or_given), sorted(args))
    value_score = sum(
        1.0 if (k in args and param_ok(args[k], opts)) or (k not in args and "" in opts) else 0.0
        for k, opts in gt_params.items()
    )
    return key_score + value_score


def tool_call_score(calls: list[dict], possible_answer: list[dict]) -> tuple[float, float]:
    """ToolRL's raw score and its maximum for parsed calls against BFCL ground truth."""
    gt = [next(iter(e.items())) for e in possible_answer]
    score = match_score([n for n, _ in gt], [c["name"] for c in calls])
    max_score = 1.0
    used: set[int] = set()
    for name, params in gt:
        max_score += 1.0 + len(params)
        best, best_i = 0.0, -1
        for i, call in enumerate(calls):
            if i in used or call["name"] != name:
                continue
            s = _pair_score(params, call["parameters"])
            if s > best:
                best, best_i = s, i
        if best_i >= 0:
            used.add(best_i)
            score += best
    return score, max_score


def correctness_reward(text: str, possible_answer: list[dict] | None) -> float:
    """R_correct in [−3, 3]; 0 for tasks without a ground-truth call."""
    if not possible_answer:
        return 0.0
    if "</tool_call>" not in text:
        return R_MIN
    calls = parse_tool_calls(text)
    if calls is None:
        return R_MIN
    score, max_score = tool_call_score(calls, possible_answer)
    return (R_MAX - R_MIN) * score / max_score + R_MIN


def toolrl_reward(text: str, task: ToolTask) -> dict[str, float]:
    """Format, correctness and their sum for one completion of one task."""
    fmt = format_reward(text, task.expects_call)
    cor = correctness_reward(text, task.possible_answer)
    return {"format": fmt, "correctness": cor, "total": fmt + cor}
