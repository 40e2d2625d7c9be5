"""BFCL loading, splits, rendering and the paper's lenient scorers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import guardrail

from guardrail.models.tiny import tiny_tokenizer
from guardrail.tasks.task import USER_SUFFIX
from guardrail.tasks import (
    CATEGORIES,
    DataNotFoundError,
    data_dir,
    format_accuracy,
    is_tool_call,
    load_tasks,
    overall_score,
    parse_tool_calls,
    plain_prompts,
    split_of,
    strict_metrics,
    tool_correctness,
    tool_names_from_prompt,
)

CALL = '<think> ok </think>\n<tool_call>\n{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5}}\n</tool_call>'


def test_splits_are_disjoint_and_cover_everything():
    tasks = load_tasks("all")
    by_split = {s: {t.id for t in load_tasks(s)} for s in ("train", "dev", "test")}
    assert sum(len(v) for v in by_split.values()) == len(tasks) == len({t.id for t in tasks})
    assert not (by_split["train"] & by_split["test"]) and not (by_split["dev"] & by_split["test"])
    assert not (by_split["train"] & by_split["dev"])
    assert len(by_split["test"]) >= 300
    assert {t.category for t in load_tasks("test")} == set(CATEGORIES)
    # deterministic: a function of the id only
    assert split_of("simple_python_0") == split_of("simple_python_0")


def test_irrelevance_has_no_answer_and_others_do():
    for t in load_tasks("dev"):
        assert t.expects_call == (t.category != "irrelevance")


def test_raw_render_is_system_newline_user_and_lists_tools():
    task = load_tasks("all", categories=["multiple"])[0]
    raw = task.render(mode="raw")
    assert raw == task.system_text() + "\n" + task.user_text()
    assert tool_names_from_prompt(raw) == task.tool_names
    assert "1. Name: " in raw and "Description: " in raw and "Parameters: {" in raw
    assert task.user in raw


def test_plain_user_turn_drops_only_the_toolrl_wrapper():
    task = load_tasks("all", categories=["simple_python"])[0]
    toolrl, plain = task.user_text(), task.user_text("plain")
    assert toolrl.startswith("**Dialogue Records History**\n<user> ") and toolrl.endswith(" </user>")
    assert plain == task.user.strip() + "\n" + USER_SUFFIX and "<user>" not in plain
    assert task.render(mode="raw", turn="plain") == task.system_text() + "\n" + plain
    with pytest.raises(ValueError, match="user turn"):
        task.user_text("chatml")  # type: ignore[arg-type]


def test_chat_render_uses_the_template():
    tok = tiny_tokenizer()
    task = load_tasks("all", categories=["simple_python"])[0]
    chat = task.render(tok, mode="chat")
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="render mode"):
        task.render(tok, mode="html")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokenizer"):
        task.render(None, mode="chat")


def test_data_dir_defaults_to_the_package(monkeypatch):
    monkeypatch.delenv("GUARDRAIL_DATA", raising=False)
    assert data_dir() == Path(guardrail.__file__).parent / "data"
    assert (data_dir() / "general" / "prompts.jsonl.gz").is_file()


def test_plain_and_gzipped_prompts_read_alike(monkeypatch, tmp_path):
    """``$GUARDRAIL_DATA`` may hold the plain ``prompts.jsonl`` (as upstream) or the packed copy."""
    monkeypatch.delenv("GUARDRAIL_DATA", raising=False)
    packed = plain_prompts(40, "test")
    (tmp_path / "general").mkdir()
    with gzip.open(data_dir() / "general" / "prompts.jsonl.gz", "rb") as src:
        (tmp_path / "general" / "prompts.jsonl").write_bytes(src.read())
    monkeypatch.setenv("GUARDRAIL_DATA", str(tmp_path))
    assert plain_prompts(40, "test") == packed


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARDRAIL_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="GUARDRAIL_DATA"):
        data_dir()
    monkeypatch.setenv("GUARDRAIL_DATA", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="missing data file"):
        load_tasks("all", categories=["parallel"])


def test_plain_prompts_balanced_and_deterministic():
    a = plain_prompts(33, "train", seed=1)
    assert [p.id for p in a] == [p.id for p in plain_prompts(33, "train", seed=1)]
    assert [p.id for p in a] != [p.id for p in plain_prompts(33, "train", seed=2)]
    counts = {}
    for p in a:
        counts[p.source] = counts.get(p.source, 0) + 1
    assert len(counts) == 11 and set(counts.values()) == {3}
    assert plain_prompts(3, "test")[0].render(mode="raw") == plain_prompts(3, "test")[0].text
    with pytest.raises(ValueError, match="split"):
        plain_prompts(3, "dev")  # type: ignore[arg-type]


def test_format_accuracy_paper_definition():
    assert format_accuracy(CALL)
    assert format_accuracy('<TOOL_CALL> {"name": "x"}')  # tag check is case-insensitive
    assert not format_accuracy('{"name": "calculate_triangle_area"}')  # no tag
    assert not format_accuracy("<tool_call> I would call the area tool </tool_call>")  # no name field
    assert not format_accuracy('<tool_call>\n{"name": ""}\n</tool_call>')  # empty name


def test_tool_correctness_lenient_substring_either_way():
    names = ["calculate_triangle_area", "math.hypot"]
    assert tool_correctness(CALL, names)
    assert tool_correctness('{"name": "Math.Hypot"}', names)
    assert tool_correctness('{"name": "triangle_area"}', names)  # called ⊂ listed
    assert tool_correctness('{"name": "scipy.math.hypot.v2"}', names)  # listed ⊂ called
    assert not tool_correctness('{"name": "fft"}', names)
    assert not tool_correctness("no call", names)


def test_overall_score_four_cases():
    names = ["calculate_triangle_area"]
    assert overall_score(CALL, names) == 2
    assert overall_score(CALL.replace("calculate_triangle_area", "other_tool"), names) == 0
    assert overall_score('{"name": "calculate_triangle_area"}', names) == 1
    assert overall_score("I cannot do that.", names) == -1


def test_parse_tool_calls_lines_list_and_failures():
    assert parse_tool_calls(CALL) == [{"name": "calculate_triangle_area", "parameters": {"base": 10, "height": 5}}]
    two = '<tool_call>\n[{"name": "a", "arguments": {"x": 1}}, {"name": "b"}]\n</tool_call>'
    assert parse_tool_calls(two) == [{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]
    assert parse_tool_calls("<tool_call>\n{name: a}\n</tool_call>") is None
    assert parse_tool_calls('<tool_call>\n{"name": "a"}') is None  # unclosed block
    assert parse_tool_calls('<tool_call>\n{"name": "None", "parameters": {}}\n</tool_call>') == []
    assert not is_tool_call('<tool_call>\n{"name": "None", "parameters": {}}\n</tool_call>')


def test_strict_metrics_against_bfcl_answers():
    answer = [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert strict_metrics(CALL, answer) == {"valid_json": True, "count_correct": True, "name_correct": True, "args_correct": True, "no_call": False}
    wrong_value = CALL.replace('"height": 5', '"height": 6')
    assert strict_metrics(wrong_value, answer)["name_correct"] and not strict_metrics(wrong_value, answer)["args_correct"]
    extra = CALL.replace('"height": 5', '"height": 5, "color": "red"')
    assert not strict_metrics(extra, answer)["args_correct"]
    missing = CALL.replace(', "height": 5', "")
    assert not strict_metrics(missing, answer)["args_correct"]
    unit = CALL.replace('"height": 5', '"height": 5.0, "unit": "Units"')  # float for int, case-insensitive string
    assert strict_metrics(unit, answer)["args_correct"]
    assert strict_metrics("prose", answer) == {"valid_json": False, "count_correct": False, "name_correct": False, "args_correct": False, "no_call": True}


def test_strict_metrics_parallel_any_order():
    answer = [{"f": {"x": [1]}}, {"f": {"x": [2]}}]
    calls = lambda *xs: "<tool_call>\n" + "\n".join(json.dumps({"name": "f", "parameters": {"x": x}}) for x in xs) + "\n</tool_call>"
    assert strict_metrics(calls(2, 1), answer)["args_correct"]
    assert not strict_metrics(calls(1, 1), answer)["args_correct"]
    assert not strict_metrics(calls(1), answer)["name_correct"] and not strict_metrics(calls(1), answer)["count_correct"]


def test_reference_completions_are_perfect_answers():
    from guardrail.tasks import toolrl_reward

    for task in load_tasks("dev"):
        text = task.reference_completion()
        reward = toolrl_reward(text, task)
        assert reward["format"] == 1.0
        if task.expects_call:
            assert reward["correctness"] == 3.0 and strict_metrics(text, task.possible_answer)["args_correct"]
        else:
            assert reward["correctness"] == 0.0 and not is_tool_call(text)
