"""The HTML pages: one renderer, read back with the stdlib's parser, and once in a real browser when one is installed."""

from __future__ import annotations

import html
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from page_checks import assert_readable, markdown_outline, outline

from guardrail.markdown import code_block
from guardrail.pages import FOLD_LINES, folder_images, render_page, write_page

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
# the committed pages and the Markdown each is rendered from (quick-tiny has no page: its Markdown predates the renderer)
PAGES = {"demo": "report.md", "phenomenon": "report.md", "audit-organism": "audit.md", "quick-organism": "report.md"}
CHROMIUM = Path("/usr/bin/chromium")

SAMPLE = "\n".join([
    "# guardrail audit: **PASS**", "", "The verdict, first.", "Second line of the same paragraph.", "",
    "| threat | gain \\| CI |", "|---|---|", "| `b_only_splice` | +0.0 pp |", "",
    "## Outputs", "", *code_block("<tool_call>\n{\"name\": \"f\"}\n</tool_call>"), "",
    *code_block("\n".join(f"line {i} ```" for i in range(FOLD_LINES + 5)), "json"), "",
    "![plot](plot.png)", "", "- one <b>item</b>", "",
])
PNG = b"\x89PNG\r\n\x1a\n"


def test_the_sample_reads_as_a_page():
    page = render_page(SAMPLE, {"plot.png": PNG})
    assert_readable(page, SAMPLE)
    seen = outline(page)
    assert seen.title == "guardrail audit: PASS" and "<strong>PASS</strong>" in page
    assert "The verdict, first.<br />" in page  # a line the report wrote stays a line
    assert "<td>+0.0 pp</td>" in page and "gain | CI" in page and '<div class="table-wrap">' in page
    assert "&lt;tool_call&gt;" in page and "<tool_call>" not in page  # model output shown, never interpreted
    assert "<b>item</b>" not in page and "&lt;b&gt;item&lt;/b&gt;" in page
    assert f"json, {FOLD_LINES + 5} lines" in page and '<code class="language-json">' in page


def test_a_missing_plot_says_so_instead_of_a_broken_link():
    page = render_page("# t\n\ntext\n\n![plot](gone.png)\n")
    assert "<img" not in page and "gone.png is not in this folder" in page


def test_the_checks_reject_a_page_that_shows_the_markdown_source():
    """The old pages: the Markdown inside one <pre>, or lines copied into <p> with their backticks and pipes."""
    with pytest.raises(AssertionError):
        assert_readable(f"<html><head><title>t</title></head><body><pre>{html.escape(SAMPLE)}</pre></body></html>", SAMPLE)
    lines = "".join(f"<p>{html.escape(ln)}</p>" for ln in SAMPLE.splitlines() if ln)
    with pytest.raises(AssertionError):
        assert_readable(f"<html><head><title>t</title></head><body><h1>t</h1><h2>o</h2>{lines}</body></html>", SAMPLE)


@pytest.mark.parametrize("name", sorted(PAGES))
def test_committed_pages_are_the_renderers_output_and_read_as_pages(name):
    """Each committed page is its Markdown and PNGs through the renderer: regenerate it when the renderer changes."""
    folder = RESULTS / name
    md = (folder / PAGES[name]).read_text()
    page = (folder / PAGES[name]).with_suffix(".html").read_text()
    assert page == render_page(md, folder_images(folder)), f"{name}: page not regenerated after a renderer change"
    assert_readable(page, md)


def test_committed_markdown_is_rendered_again_from_the_results_alone():
    """The demo and phenomenon pages come from their results.json (and the demo's result.json), no cache or model needed."""
    from guardrail.eval.demo import DemoResult, demo_sections
    from guardrail.eval.phenomenon.report import render_markdown

    res = json.loads((RESULTS / "phenomenon" / "results.json").read_text())
    assert render_markdown(res) == (RESULTS / "phenomenon" / "report.md").read_text()
    saved = json.loads((RESULTS / "demo" / "result.json").read_text())
    demo = DemoResult(json.loads((RESULTS / "demo" / "results.json").read_text()), saved["live"], saved["audit"], saved["timings"],
                      saved["notices"], saved["cached"])
    assert render_markdown(demo.phenomenon, demo_sections(demo)) == (RESULTS / "demo" / "report.md").read_text()


def test_committed_audit_page_is_rendered_again_from_audit_json():
    from guardrail.audit.report import AuditReport

    report = AuditReport.from_json((RESULTS / "audit-organism" / "audit.json").read_text())
    assert report.to_markdown() == (RESULTS / "audit-organism" / "audit.md").read_text()


def test_write_page_renders_a_folder_again(tmp_path):
    (tmp_path / "report.md").write_text(SAMPLE)
    (tmp_path / "plot.png").write_bytes(PNG)
    page = write_page(tmp_path / "report.md")
    assert page == tmp_path / "report.html"
    assert_readable(page.read_text(), SAMPLE)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                               *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian's chromium package); CI may not have it")
def test_a_browser_shows_the_page(tmp_path):
    """The committed demo page in headless Chromium: its headings and folds are in the DOM and the screenshot is not blank."""
    from PIL import Image

    url = (RESULTS / "demo" / "report.html").as_uri()
    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    want = markdown_outline((RESULTS / "demo" / "report.md").read_text())
    assert "<h1>The phenomenon on" in dom.stdout and dom.stdout.count("<h2>") == want.h2 and "<details>" in dom.stdout
    shot = tmp_path / "page.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    grey = Image.open(shot).convert("L")
    dark = sum(grey.histogram()[:128])
    assert grey.size == (1280, 2000) and dark > 0.01 * 1280 * 2000, "the page rendered blank"


def test_every_committed_page_of_the_organism_names_the_shipped_adapter():
    """A page made with a retired A is regenerated or removed: each names the sha256 of the adapter that ships."""
    from guardrail.models.packaged import shipped_adapter

    from guardrail.fileio import sha256_file

    sha = sha256_file(shipped_adapter() / "adapter_model.safetensors")
    for folder in ("demo", "phenomenon", "audit-organism", "quick-organism"):
        held = [json.loads(p.read_text()) for p in (RESULTS / folder).glob("*.json")]
        named = {h.get("adapter_sha256") for h in held} | {(h.get("meta") or {}).get("adapter_sha256") for h in held}
        assert sha in named, f"{folder}: names no adapter sha256, or a retired one ({named - {None}})"
