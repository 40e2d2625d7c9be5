"""Tool-use tasks: BFCL loading and splits, ToolRL prompt rendering, scorers, ToolRL reward.

>>> from guardrail.tasks import load_tasks, format_accuracy
>>> test = load_tasks("test", categories=["simple_python"])     # doctest: +SKIP
>>> prompt = test[0].render(tokenizer, mode="chat")             # doctest: +SKIP
"""

from guardrail.tasks.data import (
    ANSWERED_CATEGORIES,
    CATEGORIES,
    SPLITS,
    DataNotFoundError,
    HeldOutSplit,
    PlainPrompt,
    data_dir,
    load_category,
    load_tasks,
    plain_prompts,
    split_hash,
    split_of,
)
from guardrail.tasks.reward import correctness_reward, format_reward, match_score, toolrl_reward
from guardrail.tasks.scoring import (
    called_name,
    format_accuracy,
    is_tool_call,
    overall_score,
    parse_tool_calls,
    strict_metrics,
    tool_correctness,
    tool_names_from_prompt,
    value_matches,
)
from guardrail.tasks.task import STOP_STRINGS, RenderMode, ToolTask, UserTurn, format_tools

__all__ = [
    "ANSWERED_CATEGORIES", "CATEGORIES", "SPLITS", "STOP_STRINGS", "DataNotFoundError", "HeldOutSplit", "PlainPrompt", "RenderMode", "ToolTask", "UserTurn",
    "called_name", "correctness_reward", "data_dir", "format_accuracy", "format_reward", "format_tools",
    "is_tool_call", "load_category", "load_tasks", "match_score", "overall_score", "parse_tool_calls",
    "plain_prompts", "split_hash", "split_of", "strict_metrics", "tool_correctness", "tool_names_from_prompt",
    "toolrl_reward", "value_matches",
]
