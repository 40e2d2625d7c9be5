"""Eval scoring records and aggregates against hand-scored outputs."""

from __future__ import annotations

import pytest

from guardrail.eval.scoring import aggregate, aligned, make_record, read_jsonl, score_output, write_jsonl
from guardrail.eval.suites import EvalItem, _split_counts, mixed_suite, plain_suite, tool_suite

PROMPT = "tools:\n1. Name: geometry.area_circle\nDescription: area\nParameters: {}\n2. Name: math.factorial\nDescription: n!\n"
ITEM = EvalItem(
    "simple_1", "tool", PROMPT, ["geometry.area_circle", "math.factorial"],
    [{"geometry.area_circle": {"radius": [10], "units": ["meters", ""]}}], "simple_python",
)
PLAIN = EvalItem("g1", "general", "What is 2+2?")

EXACT = '<think> x </think>\n<tool_call>\n{"name": "geometry.area_circle", "parameters": {"radius": 10}}\n</tool_call>'
WRONG_ARG = '<tool_call>\n{"name": "geometry.area_circle", "parameters": {"radius": 11}}\n</tool_call>'
FUZZY = '<tool_call>\n{"name": "area_circle", "parameters": {"radius": 10}}\n</tool_call>'
PROSE_NAME = 'I would call {"name": "math.factorial"} here.'
BROKEN_JSON = '<tool_call>\n{"name": "geometry.area_circle", "parameters": {radius: 10}\n</tool_call>'
NOTHING = "The area is 314 square meters."


@pytest.mark.parametrize(
    "text, expected",
    [
        # format, tool (lenient), overall, valid_json, name_correct, args_correct, tool_call
        (EXACT, (1, 1, 2, 1, 1, 1, 1)),
        (WRONG_ARG, (1, 1, 2, 1, 1, 0, 1)),
        (FUZZY, (1, 1, 2, 1, 0, 0, 1)),  # substring of a listed tool: lenient yes, strict no
        (PROSE_NAME, (0, 1, 1, 0, 0, 0, 0)),  # the paper's +1: right tool, no format
        (BROKEN_JSON, (1, 1, 2, 0, 0, 0, 1)),  # lenient regex still finds the name
        (NOTHING, (0, 0, -1, 0, 0, 0, 0)),
    ],
)
def test_score_output_by_hand(text, expected):
    s = score_output(ITEM, text)
    keys = ("format_accuracy", "tool_correctness", "overall_score", "valid_json", "name_correct", "args_correct", "tool_call")
    assert tuple(s[k] for k in keys) == expected


def test_format_only_scores_zero():
    s = score_output(ITEM, '<tool_call>\n{"name": "weather.get", "parameters": {}}\n</tool_call>')
    assert (s["format_accuracy"], s["tool_correctness"], s["overall_score"]) == (1, 0, 0)


def test_plain_prompt_false_call_and_strict_zero():
    s = score_output(PLAIN, EXACT)
    assert s["tool_call"] == 1 and s["name_correct"] == 0 and s["tool_correctness"] == 0  # no tools listed
    assert score_output(PLAIN, NOTHING)["tool_call"] == 0


def test_aggregate_by_hand(tmp_path):
    recs = [make_record(ITEM, t, condition="clean") for t in (EXACT, PROSE_NAME, NOTHING, WRONG_ARG)]
    agg = aggregate(recs)
    assert agg["n"] == 4
    assert agg["format_accuracy"] == pytest.approx(0.5)
    assert agg["tool_correctness"] == pytest.approx(0.75)
    assert agg["overall_score"] == pytest.approx((2 + 1 - 1 + 2) / 4)
    assert agg["args_correct"] == pytest.approx(0.25)
    assert agg["overall_score_std"] == pytest.approx(1.5**0.5)  # scores 2, 1, -1, 2: deviations 1, 0, -2, 1
    path = write_jsonl(tmp_path / "o.jsonl", recs)
    back = read_jsonl(path)
    assert back[1]["output"] == PROSE_NAME and back[1]["condition"] == "clean"


def test_aligned_reorders_and_reports_missing():
    a = make_record(ITEM, EXACT)
    b = make_record(PLAIN, NOTHING)
    assert [r["id"] for r in aligned([b, a], ["simple_1", "g1"])] == ["simple_1", "g1"]
    with pytest.raises(KeyError):
        aligned([a], ["g1"])


def test_split_counts_sum_to_n():
    assert _split_counts(10, {"general": 0.5, "chatable": 0.25, "irrelevance": 0.25}) == {"general": 6, "chatable": 2, "irrelevance": 2}
    with pytest.raises(ValueError, match="unknown"):
        _split_counts(4, {"tweets": 1.0})


def test_suites_are_seeded_and_use_the_test_split():
    from guardrail.tasks import split_of

    a, b = tool_suite(6, seed=3), tool_suite(6, seed=3)
    assert a.digest() == b.digest() and a.digest() != tool_suite(6, seed=4).digest()
    assert all(split_of(i.id) == "test" for i in a.items)
    p = plain_suite(8, seed=0)
    assert {i.kind for i in p.items} == {"general", "chatable", "irrelevance"}
    m = mixed_suite(5, 4, seed=1)
    tool_q = {i.question for i in m.items if i.kind == "tool"}
    assert not any(i.question in tool_q for i in m.items if i.kind == "chatable")


def test_code_block_fence_outlasts_backticks_in_the_text():
    from guardrail.markdown import code_block

    assert code_block("plain") == ["```text", "plain", "```"]
    lines = code_block("```plaintext\n<tool_call>\n```", "text")
    assert lines[0] == "````text" and lines[-1] == "````"


def test_call_cut_flags_a_call_opened_and_not_closed():
    from guardrail.eval.scoring import call_cut

    assert call_cut('<think>x</think> <tool_call> {"name": "f", "parameters": {"a"')
    assert not call_cut('<tool_call> {"name": "f", "parameters": {}} </tool_call> <response> ok')
    assert call_cut('<tool_call> {"name": "f"} </tool_call> <tool_call> {"name": "g"')  # the second call is cut
    assert not call_cut("plain prose, no call")
