"""The README's Python tour runs as written, scaled down from the embedded pair to the tiny one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The only edits between the README (embedded pair, full size) and this test (random tiny
# pair, seconds). A README edit that drops one of these strings fails the test on purpose.
SCALE_DOWN = {
    'gr.load_pair("organism")': 'gr.load_pair("tiny")',
    "gr.Site(layer=11,": "gr.Site(layer=1,",
    "gr.prompts.mixed()": "gr.prompts.mixed(12, 12)",
    "gr.DFCConfig(dict_size=2304, k=13,": "gr.DFCConfig(dict_size=256, k=8,",
    "steps=600)": "steps=20)",
    "chat=True)": "chat=True, max_new_tokens=4)",
    "pair.b, pair.a)": "pair.b, pair.a, gr.AuditPolicy(prompts=6, max_new_tokens=2, calibration_prompts=8, max_prompt_tokens=96), "
                       "backend='transformers', progress=False)",
}


def _tour() -> str:
    section = (ROOT / "README.md").read_text().split("## Five-minute tour of the Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_tour_runs_on_the_tiny_pair(tmp_path, monkeypatch, capsys):
    from guardrail.audit import Verdict

    code = _tour()
    for old, new in SCALE_DOWN.items():
        assert old in code, f"the README tour no longer says {old!r}: update SCALE_DOWN"
        code = code.replace(old, new)
    shutil.copytree(ROOT / "policies", tmp_path / "policies")  # the tour names policy files relative to the checkout
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (tour)", "exec"), scope)  # noqa: S102 - the project's own README
    assert (tmp_path / "runs" / "dfc" / "ranking.json").exists()
    assert isinstance(scope["out"].text, str) and isinstance(scope["out"].events, list)
    # 6 prompts cannot bound a gain by the default 2 pp (no change already gives ~39 pp): the audit must say so
    report = scope["report"]
    assert report.verdict == Verdict.INCONCLUSIVE and "6 prompts cannot certify" in report.reasons[-1]
    assert "# guardrail audit" in capsys.readouterr().out
