"""`guardrail demo` end to end on the tiny pair: first run trains and caches, second run reuses."""

from __future__ import annotations

import json

from page_checks import assert_readable
from typer.testing import CliRunner

from guardrail.cli.main import app

SMALL = ["demo", "--pair", "tiny", "--steps", "30", "--dict-size", "256", "--tool-prompts", "8", "--test-prompts", "4", "--dev-prompts", "4",
         "--audit-prompts", "12", "--max-new-tokens", "4", "--audit-tokens", "4", "--backend", "transformers"]


def _stage_cells(md: str) -> dict[str, str]:
    """The page's stage-timings table as {stage: seconds cell}."""
    rows = md.split("## Stage timings")[1].split("\n## ")[0].splitlines()
    cells = [r.strip("|").split("|") for r in rows if r.startswith("| ") and not r.startswith("| stage")]
    return {name.strip(): sec.strip() for name, sec in cells}


def test_demo_runs_twice_on_the_tiny_pair_and_writes_the_page(tmp_path):
    out = tmp_path / "demo"
    first = CliRunner().invoke(app, SMALL + ["--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "training a DFC" in first.output and "audit:" in first.output and "what the pair shows" in first.output
    md = (out / "report.md").read_text()
    assert_readable((out / "report.html").read_text(), md)
    head = md.split("\n## ")[0]
    assert "bars hold" in head and "`tiny-a`" in head
    for part in ("## Hedge", "## One feature turns it on", "## One switch turns it off", "## An alarm that sees it coming",
                 "## Policies live", "## Audit", "## Stage timings"):
        assert part in md, part
    # the random tiny A never calls: the page says why where the effects would be
    for section in ("## One switch", "## An alarm"):
        assert md.split(section)[1].split("\n## ")[0].count("Not measured:") == 1, section
    saved = json.loads((out / "result.json").read_text())
    assert saved["notices"] and all(n.split(":")[0] in head for n in saved["notices"])
    assert json.loads((out / "results.json").read_text())["model_a"] == "tiny-a"
    stages = _stage_cells(md)
    for stage in ("load pair", "measure (DFC, steer, kill switch, alarm)", "policies live", "audit"):
        assert stage in stages, stage
    second = CliRunner().invoke(app, SMALL + ["--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "using the cached DFC" in second.output and "training a DFC" not in second.output
    assert "generating" not in second.output  # every output read back from the cache
    assert _stage_cells((out / "report.md").read_text())["audit"].endswith("(cached)")
    changed = [("20" if a == "30" else a) for a in SMALL]  # another recipe (fewer steps) must not reuse that DFC
    third = CliRunner().invoke(app, changed + ["--out", str(tmp_path / "demo2")])
    assert third.exit_code == 0, third.output
    assert "training a DFC" in third.output and "using the cached DFC" not in third.output


def test_the_demos_notices_are_the_bars_the_pair_misses():
    from guardrail.eval.demo import notices

    from test_phenomenon import _passing_result

    res = _passing_result()
    assert notices(res) == []
    res["alert"]["auroc"] = 0.61
    (note,) = notices(res)
    assert note.startswith("alarm: AUROC") and "0.610" in note and "≥ 0.90" in note


def test_live_policies_use_the_measured_features():
    from guardrail.eval.demo import live_policies

    res = {"steer": {"feature": 7, "mode": "scale", "strength": 32.0}, "kill_switch": {"features": [3, 4]}, "alert": {"not_measured": "no calls"}}
    pols = live_policies(res)
    assert set(pols) == {"amplify", "kill"}
    assert pols["amplify"].rules[0].select.indices == [7] and pols["amplify"].rules[0].alpha == 32.0
    res["steer"] = {"feature": 7, "mode": "additive", "strength": 0.5}
    rule = live_policies(res)["amplify"].rules[0]
    assert (rule.mode, rule.gain, rule.positions) == ("additive", 0.5, "all")
    assert pols["kill"].rules[0].select.indices == [3, 4] and pols["kill"].rules[0].action == "clamp"


def test_the_demos_audit_policy_is_the_shipped_file_under_the_hedge_protocols_turn():
    from guardrail.eval.demo import DemoConfig, audit_policy
    from guardrail.eval.phenomenon.protocols import HEDGE

    shipped = audit_policy(DemoConfig())
    assert shipped.turn == HEDGE.turn and shipped.metric == "tool_correctness" and (shipped.prompts, shipped.max_new_tokens) == (200, 64)
    small = audit_policy(DemoConfig(audit_prompts=12, audit_tokens=4))
    assert (small.prompts, small.max_new_tokens, small.turn) == (12, 4, HEDGE.turn)
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="prompts"):
        audit_policy(DemoConfig(audit_prompts=0))
