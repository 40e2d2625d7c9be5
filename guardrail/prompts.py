"""Prompt sets for collection and ranking: tool prompts versus ordinary prompts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptItem:
    """One rendered prompt; ``is_tool`` is the label feature ranking contrasts on."""

    id: str
    text: str
    is_tool: bool


def prompts_hash(prompts: list[PromptItem]) -> str:
    """Identity of a prompt list: a resumed collection must see the same one."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.id}\x1f{int(p.is_tool)}\x1f{p.text}\x1e".encode())
    return h.hexdigest()


def mixed(
    tool: int | None = None,
    plain: int | None = None,
    *,
    split: str = "train",
    mode: str = "raw",
    tokenizer=None,
    seed: int = 0,
    categories: tuple[str, ...] | None = None,
) -> list[PromptItem]:
    """Tool prompts (BFCL, answered categories) and ordinary prompts, shuffled together.

    ``mode="raw"`` is the paper's rendering (system + user text, no chat template), the
    distribution the interventions act on. ``tool=None`` takes every task of the split;
    ``plain=None`` takes as many ordinary prompts as tool prompts. BFCL's dev split has no
    counterpart in the general prompts, which are drawn from their train split then.
    """
    import random

    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks, plain_prompts

    tasks = load_tasks(split, categories or ANSWERED_CATEGORIES)
    if tool is not None:
        if tool > len(tasks):
            raise ValueError(f"asked for {tool} tool prompts but the {split!r} split has {len(tasks)}")
        tasks = random.Random(seed).sample(tasks, tool)
    n_plain = len(tasks) if plain is None else plain
    plain_split = "test" if split == "test" else "train"
    items = [PromptItem(t.id, t.render(tokenizer, mode), True) for t in tasks]
    items += [PromptItem(p.id, p.render(tokenizer, mode), False) for p in plain_prompts(n_plain, plain_split, seed)]
    random.Random(seed + 1).shuffle(items)
    return items
