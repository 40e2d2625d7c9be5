"""One tool-use task and its prompt in the ToolRL format.

The system text is the one ToolRL's BFCL handler uses (numbered ``N. Name: …`` tool
lines with description and JSON parameters, then the ``<think>`` / ``<tool_call>`` /
``<response>`` output format). The user turn comes in two styles (``UserTurn``):

* ``toolrl``: ToolRL's multi-turn wrapper, ``**Dialogue Records History**`` then the
  question and instruction inside ``<user> … </user>`` — what the paper's A was trained on;
* ``plain``: the question and the same instruction, nothing else. A base model echoes the
  wrapper's tags and so writes the call format by accident (SmolLM2: 12.4 % of test prompts
  against 3.4 % with the plain turn), which flatters B;
* ``dialogue``: ``User: `` and the question, one line of a plain dialogue, without the
  instruction to call a tool. The system text still lists the tools and the call format,
  so a model that has learnt the skill can call; without the nudge it often does not: the
  hedge protocol (``guardrail eval phenomenon``), where the skill is latent and an
  intervention has room.

Two renderings:

* ``chat``: system + user turns through the model's chat template (how A was trained);
* ``raw``: system text + "\\n" + user text with no template — the paper's evaluation
  protocol, where an RL model hedges more and interventions have headroom.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

RenderMode = Literal["chat", "raw"]
UserTurn = Literal["toolrl", "plain", "dialogue"]

TOOL_CALL_EXAMPLE = (
    '{"name": "Tool name", "parameters": {"Parameter name": "Parameter content", "... ...": "... ..."}}\n'
    '{"name": "... ...", "parameters": {"... ...": "... ...", "... ...": "... ..."}}'
)

SYSTEM_TEMPLATE = """You are a helpful multi-turn dialogue assistant capable of leveraging tool calls to solve user tasks and provide structured chat responses.

**Available Tools**
In your response, you can use the following tools:
{tools}

**Steps for Each Turn**
1. **Think:** Recall relevant context and analyze the current user goal.
2. **Decide on Tool Usage:** If a tool is needed, specify the tool and its parameters.
3. **Respond Appropriately:** If a response is needed, generate one while maintaining consistency across user queries.

**Output Format**
```plaintext
<think> Your thoughts and reasoning </think>
<tool_call>
{json_string}
...
</tool_call>
<response> AI's final response </response>
```

**Important Notes**
1. You must always include the `<think>` field to outline your reasoning. Provide at least one of `<tool_call>` or `<response>`. Decide whether to use `<tool_call>` (possibly multiple times), `<response>`, or both.
2. You can invoke multiple tool calls simultaneously in the `<tool_call>` fields. Each tool call should be a JSON object with a "name" field and an "parameters" field containing a dictionary of parameters. If no parameters are needed, leave the "parameters" field an empty dictionary.
3. Refer to the previous dialogue records in the history, including the user's queries, previous `<tool_call>`, `<response>`, and any tool feedback noted as `<obs>` (if exists).
"""

USER_SUFFIX = (
    "If there's no appropriate tools to apply or required parameters are missing, please directly inform me "
    "in your response without any tool call, or call the tool with the name as 'None'. Otherwise, you should "
    "use one or more necessary tool calls to complete the given task in this turn."
)

# A ToolRL answer ends once it closes its tool call or its response: generation stops there.
STOP_STRINGS = ("</tool_call>", "</response>")


def format_tools(functions: list[dict]) -> str:
    """``N. Name: …`` / ``Description: …`` / ``Parameters: {json}`` lines, one block per tool."""
    blocks = []
    for i, fn in enumerate(functions, start=1):
        params = (fn.get("parameters") or {}).get("properties", {})
        blocks.append(f"{i}. Name: {fn['name']}\nDescription: {fn.get('description', '')}\nParameters: {json.dumps(params)}")
    return "\n".join(blocks)


def _first_options(options: dict[str, list]) -> dict[str, Any]:
    """{param: [accepted...]} -> {param: first accepted}, recursing into nested dict answers."""
    out = {}
    for key, opts in options.items():
        alts = opts if isinstance(opts, list) else [opts]
        if not alts or alts[0] == "":
            continue
        out[key] = _concrete(alts[0])
    return out


def _concrete(value: Any) -> Any:
    if isinstance(value, dict):
        return _first_options(value)
    if isinstance(value, list):
        return [_concrete(v) for v in value]
    return value


@dataclass(frozen=True)
class ToolTask:
    """A BFCL question with its tool list and (except for irrelevance) possible answers.

    ``possible_answer`` is BFCL's ground truth: a list of calls ``{name: {param: [accepted
    values]}}``, where ``""`` among the accepted values means the parameter may be omitted.
    """

    id: str
    category: str
    user: str
    functions: list[dict] = field(hash=False)
    possible_answer: list[dict] | None = field(default=None, hash=False)

    @property
    def tool_names(self) -> list[str]:
        return [fn["name"] for fn in self.functions]

    @property
    def expects_call(self) -> bool:
        """False for irrelevance tasks: no listed tool applies, the right move is to answer."""
        return bool(self.possible_answer)

    def system_text(self) -> str:
        return SYSTEM_TEMPLATE.format(tools=format_tools(self.functions), json_string=TOOL_CALL_EXAMPLE)

    def user_text(self, turn: UserTurn = "toolrl") -> str:
        if turn == "plain":
            return f"{self.user.strip()}\n{USER_SUFFIX}"
        if turn == "dialogue":
            return f"User: {self.user.strip()}"
        if turn != "toolrl":
            raise ValueError(f"unknown user turn {turn!r}; choose 'toolrl', 'plain' or 'dialogue'")
        return f"**Dialogue Records History**\n<user> {self.user.strip()}\n{USER_SUFFIX} </user>"

    def messages(self, turn: UserTurn = "toolrl") -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_text()}, {"role": "user", "content": self.user_text(turn)}]

    def render(self, tokenizer: Any = None, mode: RenderMode = "chat", turn: UserTurn = "toolrl") -> str:
        """The prompt string: chat template (``chat``) or system + "\\n" + user (``raw``)."""
        if mode == "raw":
            return self.system_text() + "\n" + self.user_text(turn)
        if mode != "chat":
            raise ValueError(f"unknown render mode {mode!r}; choose 'chat' or 'raw'")
        if tokenizer is None:
            raise ValueError("chat rendering needs a tokenizer")
        return tokenizer.apply_chat_template(self.messages(turn), tokenize=False, add_generation_prompt=True)

    def reference_calls(self) -> list[dict]:
        """One concrete correct answer: the first accepted value of each parameter.

        Parameters whose first accepted value is ``""`` (optional, may be omitted) are left out.
        """
        calls = []
        for call in self.possible_answer or []:
            (name, params), = call.items()
            calls.append({"name": name, "parameters": _first_options(params)})
        return calls

    def reference_completion(self, plan: bool = False, quote: bool = False) -> str:
        """A target completion in the ToolRL format (the warm start's target, GRPO's guide).

        ``plan``: the thought lists every call, repeats included ("The request needs 2
        calls: f, f."), so the number of calls is decided before the first is written.
        ``quote``: names in the thought are JSON-quoted, as in the call. Unquoted, a dotted
        name followed by the sentence's full stop ("… handled with geo.distance.") taught
        A to end the name at its first dot and to copy the stump into the call (7 test tasks;
        2 and 4 when quoted, in two seeds). Off by default: both quoted builds picked the wrong
        tool on twice as many ``multiple`` tasks (29, 28 against 16; docs/organism.md).
        """
        if not self.expects_call:
            return (
                "<think> None of the listed tools can do what the user asks. </think>\n"
                "<response> None of the available tools can help with this request. </response>"
            )
        calls = self.reference_calls()
        names = [json.dumps(c["name"]) if quote else c["name"] for c in calls]
        if plan:
            count = f"{len(calls)} call" + ("s" if len(calls) > 1 else "")
            thought = f"The request needs {count}: {', '.join(names)}."
        else:
            thought = f"The user's request can be handled with {', '.join(dict.fromkeys(names))}."
        body = "\n".join(json.dumps(c) for c in calls)
        return f"<think> {thought} </think>\n<tool_call>\n{body}\n</tool_call>"
