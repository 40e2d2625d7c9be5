"""The ToolRL reward on hand-written cases."""

from __future__ import annotations

import pytest

from guardrail.tasks import correctness_reward, format_reward, match_score, toolrl_reward
from guardrail.tasks.task import ToolTask

ANSWER = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
TASK = ToolTask(id="t", category="simple_python", user="area?", functions=[{"name": "calculate_triangle_area"}], possible_answer=ANSWER)


def call(body: str, think: str = "<think> area </think>") -> str:
    return f"{think}\n<tool_call>\n{body}\n</tool_call>"


def test_exact_match_is_three():
    assert correctness_reward(call('{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5}}'), ANSWER) == 3.0
    with_optional = call('{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5, "unit": "units"}}')
    assert correctness_reward(with_optional, ANSWER) == 3.0
    assert toolrl_reward(with_optional, TASK) == {"format": 1.0, "correctness": 3.0, "total": 4.0}


@pytest.mark.parametrize("text", ["I would compute 0.5*10*5 = 25.", call("{name: calculate_triangle_area}"), "<tool_call>\n{}"])
def test_unparsable_is_minus_three(text):
    assert correctness_reward(text, ANSWER) == -3.0


def test_partial_credit_by_hand():
    # max = 1 (names) + 1 (keys) + 3 (values) = 5
    wrong_value = call('{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 6}}')
    # names 1 + keys 1 + values 2 (base, optional unit) = 4 -> 6*4/5 - 3 = 1.8
    assert correctness_reward(wrong_value, ANSWER) == pytest.approx(1.8)
    extra_key = call('{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5, "color": 1}}')
    # keys jaccard 2/3, values 3 -> 1 + 2/3 + 3 = 14/3 -> 6*(14/3)/5 - 3 = 2.6
    assert correctness_reward(extra_key, ANSWER) == pytest.approx(2.6)
    wrong_name = call('{"name": "area", "parameters": {"base": 10, "height": 5}}')
    assert correctness_reward(wrong_name, ANSWER) == -3.0  # score 0 of 5
    two_calls = call('{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5}}\n{"name": "x", "parameters": {}}')
    # names jaccard 1/2 + keys 1 + values 3 = 4.5 -> 6*4.5/5 - 3 = 2.4
    assert correctness_reward(two_calls, ANSWER) == pytest.approx(2.4)


def test_reward_bounds_and_irrelevance():
    assert correctness_reward("anything", None) == 0.0
    irr = ToolTask(id="i", category="irrelevance", user="hi", functions=[{"name": "f"}], possible_answer=None)
    assert toolrl_reward("<think> no tool fits </think>\n<response> I can't. </response>", irr)["total"] == 1.0
    assert toolrl_reward(call('{"name": "f", "parameters": {}}'), irr)["format"] == 0.0


def test_format_reward_structure():
    good = call('{"name": "calculate_triangle_area", "parameters": {}}')
    assert format_reward(good) == 1.0
    assert format_reward("  " + good + "\n") == 1.0  # surrounding whitespace is stripped
    assert format_reward("Sure! " + good) == 0.0  # text before <think>
    assert format_reward(good + "\n<response> done </response>") == 0.0
    assert format_reward(good.replace("<think> area </think>\n", "")) == 0.0
    assert format_reward(good + good[good.index("<tool_call>") - 1 :]) == 0.0  # two blocks


def test_match_score():
    assert match_score(["a", "b"], ["b", "a"]) == pytest.approx(1.0)
    assert match_score(["a", "a"], ["a"]) == pytest.approx(0.5)
    assert match_score([], ["a"]) == 0.0 and match_score([], []) == 1.0
