"""Markdown pieces the reports share."""

from __future__ import annotations

import re


def code_block(text: str, lang: str = "text") -> list[str]:
    """Markdown lines of a fenced block that ``text`` cannot close: model outputs often
    contain ``` themselves, so the fence is one backtick longer than their longest run."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text, fence]
