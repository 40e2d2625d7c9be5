"""One renderer for every page guardrail writes: a report's Markdown → one self-contained HTML file.

The reports (``guardrail eval reproduce``, ``guardrail eval phenomenon``, ``guardrail demo``,
``guardrail audit``) write Markdown first, for diffs and for reading in a terminal; the HTML
page is that Markdown parsed by a CommonMark parser (markdown-it-py, with its table rule)
and placed in one Jinja2 template, so every page reads the same way:

- each line the report wrote stays a line (``breaks``): the writers put one statement per line;
- plots are embedded as PNG data URIs, so the page is one file to send or open offline;
- a fenced block longer than :data:`FOLD_LINES` lines (model outputs, alert logs, static
  checks) is folded into ``<details>`` with a summary line, so the verdict is not buried;
- tables sit in a horizontally scrollable box instead of pushing the page wider;
- raw HTML in the Markdown is shown as text, never interpreted: model outputs contain tags.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, Template
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token

FOLD_LINES = 15  # a fenced block longer than this is folded: a screen holds about 40 lines beside the text around it
SUMMARY_CHARS = 90  # how much of a folded block's first line its summary shows


def _code(self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """A fenced or indented block as ``<pre><code>``, folded into ``<details>`` when long."""
    token = tokens[idx]
    lang = token.info.strip().split()[0] if token.info.strip() else ""
    cls = f' class="language-{escapeHtml(lang)}"' if lang else ""
    block = f"<pre><code{cls}>{escapeHtml(token.content)}</code></pre>\n"
    lines = token.content.rstrip().splitlines()  # trailing blank lines do not make a block long
    return block if len(lines) <= FOLD_LINES else _folded(block, lang, lines)


def _folded(block: str, lang: str, lines: list[str]) -> str:
    """``block`` inside ``<details>``; the summary gives its size and its first line that says something."""
    first = next((ln.strip() for ln in lines if any(c.isalnum() for c in ln)), "")  # a JSON block's "{" says nothing
    first = first if len(first) <= SUMMARY_CHARS else first[: SUMMARY_CHARS - 1] + "…"
    label = f"{lang or 'text'}, {len(lines)} lines"
    return f"<details><summary>{escapeHtml(label)}: <code>{escapeHtml(first)}</code></summary>\n{block}</details>\n"


def _table_open(self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    return '<div class="table-wrap">\n' + self.renderToken(tokens, idx, options, env)


def _table_close(self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    return self.renderToken(tokens, idx, options, env) + "</div>\n"


def _image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """An image becomes a PNG data URI of the bytes passed for its file name; one without bytes says so
    in place of a broken link (the page must stand alone)."""
    token = tokens[idx]
    name = Path(str(token.attrGet("src") or "")).name
    data = env.get("images", {}).get(name)
    if data is None:
        return f'<span class="missing">(plot {escapeHtml(name)} is not in this folder)</span>'
    token.attrSet("src", "data:image/png;base64," + base64.b64encode(data).decode())
    return RendererHTML.image(self, tokens, idx, options, env)


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
    for name, rule in (("fence", _code), ("code_block", _code), ("table_open", _table_open), ("table_close", _table_close), ("image", _image)):
        md.add_render_rule(name, rule)
    return md


@lru_cache(maxsize=1)
def _template() -> Template:
    text = resources.files("guardrail").joinpath("templates", "page.html.j2").read_text(encoding="utf-8")
    return Environment(autoescape=True, keep_trailing_newline=True).from_string(text)


def _title(tokens: Sequence[Token]) -> str:
    """The first heading's text without its Markdown marks: the browser tab says what the page is."""
    for i, token in enumerate(tokens[:-1]):
        if token.type == "heading_open":
            return "".join(c.content for c in tokens[i + 1].children or [] if c.type in ("text", "code_inline")) or "guardrail"
    return "guardrail"


def render_page(markdown: str, images: Mapping[str, bytes] | None = None) -> str:
    """The HTML page of a report's Markdown; ``images`` maps a PNG file name (as the Markdown links it) to its bytes."""
    md = _parser()
    env = {"images": dict(images or {})}
    tokens = md.parse(markdown, env)
    body = md.renderer.render(tokens, md.options, env)
    return _template().render(title=_title(tokens), body=body)


def folder_images(folder: str | Path) -> dict[str, bytes]:
    """The PNGs in a report folder by file name, as the report's Markdown links them."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def write_page(markdown_path: str | Path, html_name: str | None = None) -> Path:
    """Render ``report.md`` (or ``audit.md``) beside it as HTML with the folder's PNGs embedded.

    A page can be rendered again from its folder alone: the Markdown and the plots are the inputs.
    """
    src = Path(markdown_path)
    dest = src.with_name(html_name or src.with_suffix(".html").name)
    dest.write_text(render_page(src.read_text(encoding="utf-8"), folder_images(src.parent)), encoding="utf-8")
    return dest
