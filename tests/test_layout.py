"""Where code lives: what the package ships, what its docstrings cite, how long its lines are.

These read files only; nothing here imports torch or a model.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("guardrail", "eval", "cli", "tests", "benchmarks")


def _python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_line_meets_the_configured_length():
    limit = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]
    long = [
        f"{p.relative_to(ROOT)}:{i} ({len(line)})"
        for p in _python_files()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > limit
    ]
    assert not long, f"lines over [tool.ruff] line-length = {limit}: {long}"


def test_test_oracles_are_not_shipped():
    """The dense paper DFC and the synthetic pair check the package; they are not part of it."""
    assert not (ROOT / "guardrail/dictionary/reference.py").exists()
    assert not (ROOT / "guardrail/training/synthetic.py").exists()
    assert {"paper_dfc.py", "synthetic.py"} <= {p.name for p in (ROOT / "tests/oracles").iterdir()}
    shipped = [p for p in _python_files() if p.parts[len(ROOT.parts)] in ("guardrail", "eval", "cli")]
    users = [str(p.relative_to(ROOT)) for p in shipped if re.search(r"\boracles\b", p.read_text(encoding="utf-8"))]
    assert not users, f"shipped modules importing test oracles: {users}"


def test_docs_cited_by_the_code_exist():
    """``docs/…`` references resolve, and nothing cites the design notes that never were in the repository."""
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in _python_files() if p.name != "test_layout.py"}
    design = sorted(where for where, text in texts.items() if "DESIGN.md" in text)
    assert not design, f"DESIGN.md is not in the repository (docs/architecture.md is): {design}"
    cited = {(where, m.group(0)) for where, text in texts.items() for m in re.finditer(r"docs/[\w.-]+\.md", text)}
    missing = sorted((where, doc) for where, doc in cited if not (ROOT / doc).exists())
    assert not missing, f"cited documents not in the repository: {missing}"


# The demo keeps its own copies until it imports guardrail.paper.
NOT_YET_IMPORTING = {"guardrail/demo.py"}


def _files_containing(pattern: str) -> set[str]:
    return {
        str(p.relative_to(ROOT))
        for p in _python_files()
        if p.parts[len(ROOT.parts)] != "tests" and re.search(pattern, p.read_text(encoding="utf-8"), re.MULTILINE)
    }


def test_the_paper_constants_are_written_once():
    """The relative depth, the α values and the model indices live in guardrail/paper.py; the rest import them."""
    assert _files_containing(r"13 / 36") - NOT_YET_IMPORTING == set()
    assert _files_containing(r"1\.0, 6\.0, 16\.0, 32\.0, 64\.0") - NOT_YET_IMPORTING == {"guardrail/paper.py"}
    assert _files_containing(r"^MODEL_[AB] = ") == {"guardrail/paper.py"}
