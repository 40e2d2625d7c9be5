"""`guardrail demo` end to end on the tiny pair: first run trains and caches, second run reuses."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from guardrail.cli.main import app

SMALL = ["demo", "--pair", "tiny", "--steps", "60", "--dict-size", "256", "--tool-prompts", "16", "--curve-prompts", "3",
         "--audit-prompts", "12", "--max-new-tokens", "6", "--audit-tokens", "6", "--backend", "transformers"]


def _stage_cells(md: str) -> dict[str, str]:
    """The page's stage-timings table as {stage: seconds cell}."""
    rows = md.split("## Stage timings")[1].split("\n## ")[0].splitlines()
    cells = [r.strip("|").split("|") for r in rows if r.startswith("| ") and not r.startswith("| stage")]
    return {name.strip(): sec.strip() for name, sec in cells}


def test_demo_runs_twice_on_the_tiny_pair_and_writes_the_page(tmp_path):
    out = tmp_path / "demo"
    first = CliRunner().invoke(app, SMALL + ["--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "training a DFC" in first.output and "audit:" in first.output
    md = (out / "report.md").read_text()
    for part in ("B (base)", "A (RL)", "kill switch", "Saturation (n=3)", "α", "| format accuracy |", "| tool correctness |"):
        assert part in md, part
    assert (out / "report.html").read_text().count("<img") >= 1 and (out / "saturation.png").stat().st_size > 1000
    assert "Models: A = `tiny-a`, B = `tiny-b`" in md.split("## ")[0]
    stages = md.split("## Stage timings")[1]
    for stage in ("load pair", "collect activations", "train DFC", "rank features", "saturation curve", "pick prompts",
                  "policies live", "audit", "**total**"):
        assert f"| {stage} |" in stages, stage
    notices = json.loads((out / "result.json").read_text())["notices"]
    assert all(f"> **Note:** {n}" in md.split("## ")[0] for n in notices)  # before the first panel
    second = CliRunner().invoke(app, SMALL + ["--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "using the cached DFC" in second.output and "training a DFC" not in second.output
    again = _stage_cells((out / "report.md").read_text())
    assert "collect activations" not in again  # nothing collected: no such stage
    for stage in ("DFC (collect, train, rank)", "saturation curve", "pick prompts", "audit"):
        assert again[stage].endswith("(cached)"), (stage, again)
    assert not again["policies live"].endswith("(cached)")  # the policies run live every time
    table = lambda text: text.split("## Saturation")[1].split("\n## ")[0]  # noqa: E731
    assert table((out / "report.md").read_text()) == table(md)
    changed = [("40" if a == "60" else a) for a in SMALL]  # another recipe (fewer steps) must not reuse that DFC
    third = CliRunner().invoke(app, changed + ["--out", str(tmp_path / "demo2")])
    assert third.exit_code == 0, third.output
    assert "training a DFC" in third.output and "using the cached DFC" not in third.output


def test_demo_trains_the_quick_grids_free_exclusive_dfc():
    from guardrail.demo import quick_grid_dfc

    c = quick_grid_dfc(576)  # SmolLM2's width: the paper's D=8192, k=45 at d=2048, scaled
    assert (c.dict_size, c.k, c.lambda_excl, c.lambda_shared, c.penalty_form) == (2304, 13, 0.0, 1e-3, "paper")


def test_the_page_steers_at_the_curves_best_alpha():
    from guardrail.demo import best_alpha

    curve = {"alpha": [1.0, 6.0, 16.0, 32.0, 64.0], "tool_correctness": [0.9, 0.2, 0.5, 0.5, 0.1]}
    assert best_alpha(curve) == 16.0  # α=1 is no steering; a tie goes to the smaller α


def test_the_page_says_first_when_the_pair_shows_no_call_or_no_hedge():
    from guardrail.demo import _notices

    assert _notices("hedge", "call", 16) == []
    (no_call,) = _notices("hedge", None, 64)
    assert "no tool call on any of the 64" in no_call
    (no_hedge,) = _notices(None, "call", 16)
    assert "all 16" in no_hedge
