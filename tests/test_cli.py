"""The command line: complete help, one-line errors with a hint, the committed reference in sync."""

from __future__ import annotations

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
    """A command's own exit code (audit verdicts, `policy validate`) survives the entry point."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nrules:\n  - id: r\n    action: clamp\n    select: {partition: a_exclusive}\n    valu: 0\n")
    res = _run("policy", "validate", str(bad))
    assert res.returncode == 1 and "valu" in res.stderr


def test_committed_cli_reference_matches_the_cli(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "guardrail.cli.main", "utils", "docs", "--name", "guardrail", "--output", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: regenerate with `typer guardrail.cli.main utils docs --name guardrail --output docs/cli.md`")
