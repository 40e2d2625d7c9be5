"""Where code lives: what the package ships, what its docstrings cite, how long its lines are.

These read files only; nothing here imports torch or a model.
"""

from __future__ import annotations

import ast
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
NOT_YET_IMPORTING: set[str] = set()


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


def _imports(path: Path) -> set[str]:
    """Every guardrail module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("guardrail")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("guardrail"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from guardrail.models import tiny`
    return out


def test_models_and_engines_import_no_organism_code():
    """The organism's adapter is package data to them (guardrail.models.packaged), not code."""
    folders = ("guardrail/models", "guardrail/residual", "guardrail/policy", "guardrail/features", "guardrail/dictionary")
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith("guardrail.organism"))
        for folder in folders
        for p in sorted((ROOT / folder).glob("*.py"))
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_model_modules_import_each_other_without_a_circle():
    modules = {f"guardrail.models.{p.stem}": p for p in (ROOT / "guardrail/models").glob("*.py") if p.stem != "__init__"}
    graph = {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join(path + (name,))}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())


def _shipped(pattern: str, folder: str = "guardrail") -> dict[str, int]:
    """Occurrences of ``pattern`` per Python file under ``folder`` (files with none left out)."""
    counts = {str(p.relative_to(ROOT)): len(re.findall(pattern, p.read_text(encoding="utf-8"))) for p in sorted((ROOT / folder).rglob("*.py"))}
    return {k: v for k, v in counts.items() if v}


def test_the_library_does_not_reach_into_the_harness():
    """``guardrail/`` is the library; the harness (``eval/``, imported as guardrail.eval) builds on it, never the other way."""
    assert _shipped(r"guardrail\.eval") == {}


def test_the_engines_import_no_organism_code():
    """Generation and the vLLM folder serve every model; the organism builds on them, never the other way."""
    for folder in ("guardrail/generation", "guardrail/vllm", "guardrail/models"):
        assert _shipped(r"(from|import) guardrail\.organism", folder) == {}, folder


def test_one_forward_hook_for_vllm_decoder_layers():
    """vLLM layers are hooked at one call site (the worker guard); the other sites hook transformers models."""
    assert _shipped(r"\.register_forward_hook\(", "guardrail/vllm") == {"guardrail/vllm/worker.py": 1}
    elsewhere = {k: v for k, v in _shipped(r"\.register_forward_hook\(").items() if not k.startswith("guardrail/vllm/")}
    assert elsewhere == {"guardrail/residual/hf.py": 2}, "forward hooks outside residual/hf.py (transformers) and vllm/worker.py"
    assert not any(_shipped(r"\.register_forward_hook\(", d) for d in ("eval", "cli"))


def _imports_vllm(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "vllm" or a.name.startswith("vllm.") for a in node.names)
    return isinstance(node, ast.ImportFrom) and node.level == 0 and bool(node.module) and (node.module == "vllm" or node.module.startswith("vllm."))


def test_vllm_is_imported_only_in_its_folder_and_only_where_used():
    """Only ``guardrail/vllm/`` imports vLLM, inside the functions that use it, so that the rest of
    guardrail (and ``import guardrail.vllm``) works where vLLM is not installed. Tests reach
    vLLM through ``pytest.importorskip``; benchmarks, run by hand, drive it directly."""
    files = [p for d in ("guardrail", "eval", "cli", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    trees = {str(p.relative_to(ROOT)): ast.parse(p.read_text(encoding="utf-8")) for p in files}
    outside = sorted(k for k, tree in trees.items() if not k.startswith("guardrail/vllm/") and any(_imports_vllm(n) for n in ast.walk(tree)))
    assert outside == []
    at_import = sorted(k for k, tree in trees.items() if k.startswith("guardrail/vllm/") and any(_imports_vllm(n) for n in tree.body))
    assert at_import == []


def test_vllm_internals_are_patched_in_one_module():
    """Assignments to vLLM's objects (its runner's and model's methods) happen in guardrail/vllm/patches.py only."""
    pattern = r"\b(runner|model|cls)\.(_update_states|compute_logits|load_model)\s*=(?!=)"
    assert set(_shipped(pattern)) <= {"guardrail/vllm/patches.py"}
    assert not _shipped(r"\._guardrail_\w+")  # guardrail keeps its state in its own objects, never on another library's
