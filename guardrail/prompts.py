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
    turn: str = "toolrl",
) -> list[PromptItem]:
    """Tool prompts (BFCL, answered categories) and ordinary prompts, shuffled together.

    ``mode="raw"`` is the paper's rendering (system + user text, no chat template), the
    distribution the interventions act on; ``turn`` is the tool prompts' user turn
    (:class:`guardrail.tasks.Task`'s). ``tool=None`` takes every task of the split;
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
    items = [PromptItem(t.id, t.render(tokenizer, mode, turn), True) for t in tasks]
    items += [PromptItem(p.id, p.render(tokenizer, mode), False) for p in plain_prompts(n_plain, plain_split, seed)]
    random.Random(seed + 1).shuffle(items)
    return items


def template_matched(
    irrelevance: int | None = None,
    plain: int | None = None,
    *,
    split: str = "train",
    mode: str = "raw",
    tokenizer=None,
    seed: int = 0,
) -> list[PromptItem]:
    """Negatives under the tool template: the same system text and user turn as a tool prompt, no tool applies.

    Two kinds, both labelled ``is_tool=False``:

    * BFCL irrelevance tasks: a real tool list and a question none of its tools can answer;
    * ordinary prompts asked under the tool list of a tool task of the same split (drawn
      with ``seed``), rendered exactly as that task would be with the prompt as its question.

    Contrasted with tool prompts (``guardrail.features.ranking.rank`` with a negatives
    cache), a feature that only marks the template (the tool list, the ``<user> … </user>``
    wrapper every such prompt ends with) no longer separates the groups; what still does
    is closer to "a listed tool applies". An ordinary prompt may by chance fit one of the
    listed tools; BFCL tool lists are narrow (``calculate_triangle_area``…), so that is rare.
    ``irrelevance=None`` takes every irrelevance task of the split; ``plain=None`` as many
    ordinary prompts as irrelevance tasks. With the same split and seed the ordinary
    prompts are the ones :func:`mixed` draws, so the two contrasts share those texts and
    differ only in the template around them.
    """
    import random

    from guardrail.tasks import ANSWERED_CATEGORIES, ToolTask, load_tasks, plain_prompts

    rng = random.Random(seed)
    irr = load_tasks(split, ("irrelevance",))
    if irrelevance is not None:
        if irrelevance > len(irr):
            raise ValueError(f"asked for {irrelevance} irrelevance prompts but the {split!r} split has {len(irr)}")
        irr = rng.sample(irr, irrelevance)
    n_plain = len(irr) if plain is None else plain
    hosts = load_tasks(split, ANSWERED_CATEGORIES)
    plain_split = "test" if split == "test" else "train"
    under = [
        ToolTask(id=f"{p.id}@tools:{host.id}", category="plain_under_tools", user=p.text, functions=host.functions)
        for p, host in zip(plain_prompts(n_plain, plain_split, seed), (rng.choice(hosts) for _ in range(n_plain)))
    ]
    items = [PromptItem(t.id, t.render(tokenizer, mode), False) for t in irr + under]
    random.Random(seed + 1).shuffle(items)
    return items
