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
