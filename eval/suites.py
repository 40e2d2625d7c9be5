"""Evaluation prompt suites: tool prompts (BFCL test split) and ordinary prompts.

* ``tool``: BFCL tasks with ground truth from the *test* split of the tool-task layer
  (never trained on), rendered the paper's way by default (``raw``: system + "\\n" + user,
  no chat template).
* ``plain``: ordinary prompts — the general corpus' test split, BFCL ``chatable`` questions
  (asked without tools) and BFCL ``irrelevance`` tasks (tools listed, none applies). The
  right behaviour on all of them is not to call a tool.

Sampling is seeded; a suite records how it was drawn so a run can be repeated exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from guardrail.tasks import ANSWERED_CATEGORIES, data_dir, load_tasks, plain_prompts, split_of, tool_names_from_prompt

Kind = Literal["tool", "general", "chatable", "irrelevance"]
PLAIN_KINDS: tuple[str, ...] = ("general", "chatable", "irrelevance")
DEFAULT_PLAIN_MIX: dict[str, float] = {"general": 0.5, "chatable": 0.25, "irrelevance": 0.25}


@dataclass(frozen=True)
class EvalItem:
    """One prompt to generate from, with what its output is scored against."""

    id: str
    kind: str
    text: str
    tool_names: list[str] = field(default_factory=list, hash=False)
    possible_answer: list[dict] | None = field(default=None, hash=False)
    category: str = ""
    question: str = ""

    @property
    def is_tool(self) -> bool:
        """Label for feature ranking: a prompt that asks for a tool call."""
        return self.kind == "tool"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Suite:
    """A named list of items plus the recipe that produced it."""

    name: str
    items: list[EvalItem]
    recipe: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def texts(self) -> list[str]:
        return [i.text for i in self.items]

    def by_kind(self, *kinds: str) -> "Suite":
        return Suite(f"{self.name}[{','.join(kinds)}]", [i for i in self.items if i.kind in kinds], dict(self.recipe, kinds=list(kinds)))

    def digest(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.id}\x1f{it.kind}\x1f{it.text}\x1e".encode())
        return h.hexdigest()[:16]


def _render(task, mode: str, tokenizer, turn: str = "toolrl") -> str:
    return task.render(tokenizer, mode, turn)


def tool_suite(n: int, seed: int = 0, *, split: str = "test", categories: tuple[str, ...] | list[str] = ANSWERED_CATEGORIES,
               mode: str = "raw", tokenizer: Any = None, turn: str = "toolrl") -> Suite:
    """``n`` BFCL tasks with ground truth, sampled with ``seed`` from ``split`` (test by default),
    their user turn in ``turn``'s style (:class:`guardrail.tasks.UserTurn`)."""
    tasks = load_tasks(split, tuple(categories))
    if n > len(tasks):
        raise ValueError(f"asked for {n} tool prompts but the BFCL {split!r} split of {list(categories)} has {len(tasks)}")
    chosen = random.Random(seed).sample(tasks, n)
    items = [EvalItem(t.id, "tool", _render(t, mode, tokenizer, turn), t.tool_names, t.possible_answer, t.category, t.user)
             for t in chosen]
    return Suite("tool", items, {"kind": "tool", "n": n, "seed": seed, "split": split, "categories": list(categories), "mode": mode, "turn": turn})


def chatable_questions(split: str = "test") -> list[tuple[str, str]]:
    """(id, question) of BFCL chatable (no tools, no ids in the file: ids are ``chatable_<line>``)."""
    path = data_dir() / "bfcl" / "BFCL_v4_chatable.json"
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    out = [(f"chatable_{i}", r["question"]) for i, r in enumerate(rows)]
    return [(i, q) for i, q in out if split == "all" or split_of(i) == split]


def _split_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    bad = set(mix) - set(PLAIN_KINDS)
    if bad:
        raise ValueError(f"unknown plain prompt kinds {sorted(bad)}; choose from {PLAIN_KINDS}")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("plain prompt mix must have a positive weight")
    counts = {k: int(n * w / total) for k, w in mix.items()}
    for k in sorted(mix, key=lambda k: -mix[k]):  # hand the remainder to the heaviest kinds
        if sum(counts.values()) >= n:
            break
        counts[k] += 1
    return counts


def plain_suite(n: int, seed: int = 0, *, mix: dict[str, float] | None = None, mode: str = "raw", tokenizer: Any = None,
                exclude_questions: set[str] | None = None) -> Suite:
    """``n`` ordinary prompts mixed from the general corpus, chatable and irrelevance (test splits).

    ``exclude_questions`` drops chatable questions that are word for word a question of the
    tool suite (195 of 200 chatable questions are simple_python questions), so the same
    text never sits on both sides of a comparison.
    """
    counts = _split_counts(n, mix or DEFAULT_PLAIN_MIX)
    rng = random.Random(seed)
    items: list[EvalItem] = []
    if counts.get("general"):
        items += [EvalItem(p.id, "general", p.render(tokenizer, mode), category=p.source) for p in plain_prompts(counts["general"], "test", seed)]
    if counts.get("chatable"):
        pool = [(i, q) for i, q in chatable_questions("test") if q.strip() not in (exclude_questions or set())]
        if counts["chatable"] > len(pool):
            raise ValueError(f"asked for {counts['chatable']} chatable prompts but only {len(pool)} are available")
        for i, q in rng.sample(pool, counts["chatable"]):
            text = q if mode == "raw" else tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            items.append(EvalItem(i, "chatable", text, category="chatable", question=q))
    if counts.get("irrelevance"):
        tasks = load_tasks("test", ("irrelevance",))
        if counts["irrelevance"] > len(tasks):
            raise ValueError(f"asked for {counts['irrelevance']} irrelevance prompts but the test split has {len(tasks)}")
        for t in rng.sample(tasks, counts["irrelevance"]):
            items.append(EvalItem(t.id, "irrelevance", _render(t, mode, tokenizer), t.tool_names, None, t.category, t.user))
    return Suite("plain", items, {"kind": "plain", "n": n, "seed": seed, "mix": mix or DEFAULT_PLAIN_MIX, "mode": mode})


def mixed_suite(n_tool: int, n_plain: int, seed: int = 0, *, mode: str = "raw", tokenizer: Any = None,
                mix: dict[str, float] | None = None, turn: str = "toolrl") -> Suite:
    """Tool suite followed by a plain suite (for ranking and spillover checks)."""
    tool = tool_suite(n_tool, seed, mode=mode, tokenizer=tokenizer, turn=turn)
    questions = {i.question.strip() for i in tool.items}
    plain = plain_suite(n_plain, seed, mix=mix, mode=mode, tokenizer=tokenizer, exclude_questions=questions)
    return Suite("mixed", tool.items + plain.items, {"tool": tool.recipe, "plain": plain.recipe})


def prompt_tool_names(item: EvalItem) -> list[str]:
    """Tool names the paper's scorer sees: the ``N. Name:`` lines of the rendered prompt."""
    return tool_names_from_prompt(item.text) or list(item.tool_names)
