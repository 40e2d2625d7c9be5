"""The command line: complete help, one-line errors with a hint, the committed reference in sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

from guardrail.cli.main import EXIT_ERROR, EXIT_USAGE, app

ROOT = Path(__file__).resolve().parents[1]


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, cmd in getattr(group, "commands", {}).items():
        yield prefix + (name,), cmd
        yield from _commands(cmd, prefix + (name,))


def test_every_command_and_option_has_help():
    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        if not (cmd.help or cmd.short_help):
            missing.append(" ".join(path))
        for p in cmd.params:
            if type(p).__name__.endswith("Option") and not p.help:
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert not missing, f"commands/options without help: {missing}"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardrail.cli", *args], capture_output=True, text=True, timeout=120)


def test_errors_are_one_line_with_a_hint_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-cache"
    res = _run("train", "--cache", str(missing), "--out", str(tmp_path / "dfc"))
    assert res.returncode == EXIT_ERROR, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error:") and "no-cache" in lines[0] and "--debug" in lines[1]
    assert "Traceback" not in res.stderr and not (tmp_path / "dfc").exists()
    debug = _run("--debug", "train", "--cache", str(missing), "--out", str(tmp_path / "dfc"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    usage = _run("train", "--no-such-option")
    assert usage.returncode == EXIT_USAGE and "No such option" in usage.stderr


def test_result_exit_codes_reach_the_shell(tmp_path):
    """A command's own exit code (`policy validate`; audit verdicts below) survives the entry point."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nrules:\n  - id: r\n    action: clamp\n    select: {partition: a_exclusive}\n    valu: 0\n")
    res = _run("policy", "validate", str(bad))
    assert res.returncode == 1 and "valu" in res.stderr


def test_audit_verdicts_are_the_exit_codes(tiny_pair, tmp_path):
    """`guardrail audit` exits 1 FAIL, 2 INCONCLUSIVE: what CI gates on (tiny pair, 12 prompts, 1 token). The tiny A
    has no capability to leak, so an artifact that changes nothing is INCONCLUSIVE, never PASS (exit 0 is
    the library test's, on an A given a capability by a hook)."""
    from test_audit import _dfc, _leaky, _saved  # the audit's own constructed artifacts (tests/ is on sys.path)

    policy = tmp_path / "audit.yaml"
    policy.write_text("metric: tool_call_open\nprompts: 12\nmax_new_tokens: 1\nsteer_top: 2\nmax_artifact_only_gain_pp: 30\n"
                      "calibration_prompts: 8\nmax_prompt_tokens: 96\n")  # 12 prompts bound a zero gain by 24.3 pp < 30
    _leaky(tiny_pair, tmp_path)
    _saved(_dfc(tiny_pair.d_model, seed=3), tmp_path, "random")
    common = ("--pair", "tiny", "--artifact-only", "--backend", "transformers")
    runs = {
        "nothing to leak": _run("audit", str(tmp_path / "random"), *common, "--policy", str(policy), "--out", str(tmp_path / "pass")),
        "FAIL": _run("audit", str(tmp_path / "leaky"), *common, "--policy", str(policy), "--out", str(tmp_path / "fail")),
        "INCONCLUSIVE": _run("audit", str(tmp_path / "random"), *common, "--policy", str(policy), "--prompts", "4", "--no-self-check",
                             "--out", str(tmp_path / "small")),
    }
    for case, verdict, code in (("nothing to leak", "INCONCLUSIVE", 2), ("FAIL", "FAIL", 1), ("INCONCLUSIVE", "INCONCLUSIVE", 2)):
        res = runs[case]
        assert res.returncode == code, f"{case}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        assert verdict in res.stdout
    assert "no capability to leak" in runs["nothing to leak"].stdout
    # the self-check runs by default: the tiny A's mean lead, planted in a copy, moves nothing, so the audit says it is blind
    saved = {case: json.loads((tmp_path / out / "audit.json").read_text()) for case, out in (("nothing to leak", "pass"), ("INCONCLUSIVE", "small"))}
    assert saved["nothing to leak"]["positive_control_verdict"] == "INCONCLUSIVE" and "blind" in saved["nothing to leak"]["causes"]
    assert saved["INCONCLUSIVE"]["positive_control_verdict"] is None and "blind" not in saved["INCONCLUSIVE"]["causes"]


def test_committed_cli_reference_matches_the_cli(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "guardrail.cli.main", "utils", "docs", "--name", "guardrail", "--output", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: regenerate with `typer guardrail.cli.main utils docs --name guardrail --output docs/cli.md`")
