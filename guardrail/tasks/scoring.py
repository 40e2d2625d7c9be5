"""Scorers for tool-use outputs, as pure functions of the generated text.

Two families:

* the paper's lenient metrics (sweep_eval.py ``score_response``): ``format_accuracy``
  (``<tool_call>`` present and a ``"name": "…"`` field anywhere), ``tool_correctness``
  (the first called name substring-matches, either way, *any* tool listed in the prompt)
  and ``overall_score`` in {−1, 0, 1, 2};
* strict metrics against BFCL ground truth: the ``<tool_call>`` block parses as JSON
  calls, the called names equal the ground truth, and the arguments pass a BFCL-style
  check against ``possible_answer``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

_NAME_RE = re.compile(r'"name"\s*:\s*"([^"]+)"')
_PROMPT_TOOL_RE = re.compile(r"(?:^|\n)\d+\.\s*Name:\s*(.+?)(?:\n|$)")
_STANDARDIZE_RE = re.compile(r"[ ,./\-_*^]")


# ---------------------------------------------------------------- paper (lenient) metrics


def format_accuracy(text: str) -> bool:
    """Paper definition: the output contains ``<tool_call>`` and a ``"name": "…"`` field."""
    return "<tool_call>" in text.lower() and bool(_NAME_RE.search(text))


def called_name(text: str) -> str | None:
    """The first ``"name": "…"`` value in the output (what the paper scores), or None."""
    m = _NAME_RE.search(text)
    return m.group(1) if m else None


def tool_names_from_prompt(prompt: str) -> list[str]:
    """Tool names listed as ``N. Name: …`` lines in a rendered prompt (paper's regex)."""
    return [t.strip() for t in _PROMPT_TOOL_RE.findall(prompt)]


def tool_correctness(text: str, tool_names: list[str]) -> bool:
    """Lenient: the called name equals or substring-matches (either way) any listed tool."""
    name = called_name(text)
    if not name or not tool_names:
        return False
    name = name.lower()
    return any(name == t or name in t or t in name for t in (t.strip().lower() for t in tool_names))


def overall_score(text: str, tool_names: list[str]) -> int:
    """Paper's score: +2 format and tool right, 0 format only, +1 tool only, −1 neither."""
    fmt, tool = format_accuracy(text), tool_correctness(text, tool_names)
    if fmt and tool:
        return 2
    if fmt:
        return 0
    return 1 if tool else -1


# ---------------------------------------------------------------- parsing


def tool_call_block(text: str) -> str | None:
    """Text between the first ``<tool_call>`` and the next ``</tool_call>`` (None if absent)."""
    if "<tool_call>" not in text or "</tool_call>" not in text.split("<tool_call>", 1)[1]:
        return None
    return text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0].strip()


def _as_call(obj: Any) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    params = obj.get("parameters", obj.get("arguments", {}))
    if not isinstance(params, dict):
        return None
    return {"name": obj["name"], "parameters": params}


def parse_tool_calls(text: str) -> list[dict] | None:
    """Calls ``[{"name", "parameters"}]`` from the ``<tool_call>`` block, or None if unparsable.

    Accepts one JSON object per line (ToolRL's format) or one JSON list/object for the
    whole block. Calls named ``None`` (the prompt's way to decline) are dropped.
    """
    block = tool_call_block(text)
    if block is None:
        return None
    lines = [ln for ln in block.splitlines() if ln.strip()]
    objs: list[Any] | None = None
    try:
        objs = [json.loads(ln) for ln in lines]
    except json.JSONDecodeError:
        try:
            whole = json.loads(block)
            objs = whole if isinstance(whole, list) else [whole]
        except json.JSONDecodeError:
            return None
    flat = [x for o in objs for x in (o if isinstance(o, list) else [o])]
    calls = [_as_call(o) for o in flat]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c["name"].strip().lower() != "none"]


def is_tool_call(text: str) -> bool:
    """Did the output call a tool (paper format present and the name is not 'None')?"""
    name = called_name(text)
    return format_accuracy(text) and name is not None and name.strip().lower() != "none"


# ---------------------------------------------------------------- strict metrics (BFCL)


def _standardize(s: str) -> str:
    return _STANDARDIZE_RE.sub("", s).lower().replace("'", '"')


def value_matches(value: Any, accepted: Any) -> bool:
    """BFCL-style equality of one argument value with one accepted value.

    Strings compare after BFCL's normalisation (case, spaces and ``,./-_*^`` ignored);
    numbers compare numerically (an int is accepted for a float, bools are not numbers);
    lists element-wise in order; dicts key-wise, where nested accepted values may be
    lists of alternatives as in BFCL's possible answers.
    """
    if isinstance(accepted, bool) or isinstance(value, bool):
        return isinstance(accepted, bool) and isinstance(value, bool) and accepted == value
    if isinstance(accepted, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(accepted)
    if isinstance(accepted, str):
        return isinstance(value, str) and _standardize(value) == _standardize(accepted)
    if isinstance(accepted, list):
        return isinstance(value, list) and len(value) == len(accepted) and all(
            value_matches(v, a) for v, a in zip(value, accepted)
        )
    if isinstance(accepted, dict):
        if not isinstance(value, dict):
            return False
        for key, alts in accepted.items():
            options = alts if isinstance(alts, list) else [alts]
            if key not in value:
                if "" not in options:
                    return False
            elif not any(value_matches(value[key], o) for o in options if o != ""):
                return False
        return set(value) <= set(accepted)
    return value == accepted


def param_ok(value: Any, options: list) -> bool:
    """A given argument is acceptable if it matches any non-empty accepted option."""
    return any(value_matches(value, o) for o in options if not (isinstance(o, str) and o == ""))


def call_matches(call: dict, expected: dict) -> bool:
    """BFCL AST check of one call against one ground-truth entry ``{name: {param: [options]}}``."""
    (name, params), = expected.items()
    if call["name"] != name:
        return False
    args = call["parameters"]
    if set(args) - set(params):
        return False  # an argument the function does not take
    for key, options in params.items():
        if key in args:
            if not param_ok(args[key], options):
                return False
        elif "" not in options:
            return False  # a required argument is missing
    return True


def _matching_exists(calls: list[dict], expected: list[dict]) -> bool:
    """Is there a one-to-one assignment of calls to expected entries that all pass?"""
    if len(calls) != len(expected):
        return False
    ok = [[call_matches(c, e) for e in expected] for c in calls]
    match: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in range(len(expected)):
            if ok[i][j] and j not in seen:
                seen.add(j)
                if j not in match or augment(match[j], seen):
                    match[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(calls)))


def strict_metrics(text: str, possible_answer: list[dict] | None) -> dict[str, bool]:
    """``valid_json``: the block parses into ≥1 call; ``count_correct``: as many calls as
    the ground truth (tells "stopped after one call" apart from "called the wrong tool");
    ``name_correct``: the multiset of called names equals the ground truth's;
    ``args_correct``: every call passes BFCL's check for a distinct ground-truth entry (same
    count); ``no_call``: no tool was called (the right behaviour on irrelevance tasks,
    which have no answer: count/name/args are False).
    """
    calls = parse_tool_calls(text)
    valid = bool(calls)
    no_call = not is_tool_call(text)
    if not possible_answer:
        return {"valid_json": valid, "count_correct": False, "name_correct": False, "args_correct": False, "no_call": no_call}
    gt_names = Counter(next(iter(e)) for e in possible_answer)
    count_ok = len(calls or []) == len(possible_answer)
    name_ok = valid and Counter(c["name"] for c in calls) == gt_names
    args_ok = valid and name_ok and _matching_exists(calls, possible_answer)
    return {"valid_json": valid, "count_correct": count_ok, "name_correct": name_ok, "args_correct": args_ok, "no_call": no_call}
