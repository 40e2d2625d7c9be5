"""What every rendered page must show a reader, read back with the stdlib's HTML parser.

Independent of the renderer: the Markdown is read line by line (headings, table delimiter
rows, fences) and the HTML by ``html.parser``, and the two must agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

from guardrail.pages import FOLD_LINES

FENCE = re.compile(r"^(`{3,})")
DELIMITER_ROW = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+\s*$")


@dataclass
class Fence:
    lines: int


@dataclass
class MarkdownOutline:
    """The blocks of a report's Markdown a page must keep, read without a Markdown parser."""

    h1: int = 0
    h2: int = 0
    tables: int = 0
    images: int = 0
    fences: list[Fence] = field(default_factory=list)


def markdown_outline(md: str) -> MarkdownOutline:
    out, fence, body = MarkdownOutline(), "", []
    for line in md.splitlines():
        if fence:
            if line.strip().startswith(fence) and set(line.strip()) == {"`"}:
                out.fences.append(Fence(len("\n".join(body).rstrip().splitlines())))  # trailing blank lines do not count
                fence = ""
            else:
                body.append(line)
            continue
        if m := FENCE.match(line):
            fence, body = m.group(1), []
        elif line.startswith("# "):
            out.h1 += 1
        elif line.startswith("## "):
            out.h2 += 1
        elif DELIMITER_ROW.match(line):
            out.tables += 1
        elif line.startswith("!["):
            out.images += 1
    return out


class PageOutline(HTMLParser):
    """The page's elements in order, the text a reader sees outside code, and where each code block sits."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []  # start tags in document order
        self.stack: list[str] = []
        self.text: list[str] = []  # text outside <pre> and <code>, one entry per text node
        self.pre_in_details: list[bool] = []  # per <pre>: inside a <details>?
        self.pre_has_code: list[bool] = []
        self.img_src: list[str] = []
        self.title = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "code" and self.stack and self.stack[-1] == "pre":
            self.pre_has_code[-1] = True
        if tag == "pre":
            self.pre_in_details.append("details" in self.stack)
            self.pre_has_code.append(False)
        if tag == "img":
            self.img_src.append(dict(attrs).get("src") or "")
        self.order.append(tag)
        if tag not in ("img", "br", "meta", "hr"):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if "title" in self.stack:
            self.title += data
        elif "body" in self.stack and not {"pre", "code", "style"} & set(self.stack):
            self.text.append(data)


def outline(page: str) -> PageOutline:
    parser = PageOutline()
    parser.feed(page)
    parser.close()
    return parser


def assert_readable(page: str, md: str) -> None:
    """The page shows the Markdown as a person reads it: headings, tables, code, folded long blocks, inline plots, verdict first."""
    want, seen = markdown_outline(md), outline(page)
    count = seen.order.count
    assert seen.title.strip(), "the page has no title"
    assert (count("h1"), count("h2")) == (want.h1, want.h2), "every Markdown heading is an HTML heading"
    assert count("table") == want.tables, "every Markdown table is a <table>"
    assert count("pre") == len(want.fences) and all(seen.pre_has_code), "every fenced block is <pre><code>"
    assert seen.pre_in_details == [f.lines > FOLD_LINES for f in want.fences], f"blocks over {FOLD_LINES} lines fold, the others do not"
    assert count("img") == want.images and all(s.startswith("data:image/png;base64,") for s in seen.img_src), "plots are inline data URIs"
    shown = "".join(seen.text)
    assert "```" not in shown and "**" not in shown and "|---" not in shown, "Markdown marks leak into the text"
    assert not [ln for ln in shown.splitlines() if re.match(r"^#{1,3} ", ln)], "a heading left as '# ' text"
    first_img = seen.order.index("img") if "img" in seen.order else len(seen.order)
    assert seen.order.index("h1") < first_img and "p" in seen.order[:first_img], "the title and the first paragraph come before any plot"
