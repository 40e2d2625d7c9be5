"""A fresh clone finds its data in the package: no ``../shared`` beside it, no ``GUARDRAIL_DATA``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "guardrail" / "organism" / "assets" / "manifest.json"

# Run inside the clone, with the clone first on sys.path: it must not see this checkout.
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import guardrail
from guardrail.pages import render_page
from guardrail.tasks import CATEGORIES, data_dir, load_tasks, plain_prompts, split_hash
assert guardrail.__file__.startswith(sys.argv[1]), guardrail.__file__
print(json.dumps({
    "data_dir": str(data_dir()),
    "tasks": {s: len(load_tasks(s)) for s in ("train", "dev", "test")},
    "all": len(load_tasks("all")),
    "plain": {s: len(plain_prompts(n, s)) for s, n in (("train", 200), ("test", 50))},
    "split_hash": split_hash(CATEGORIES),
    "page": "<h1>x</h1>" in render_page("# x"),
}))
"""


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout to clone")
def test_fresh_clone_loads_packaged_data(tmp_path):
    clone = tmp_path / "guardrail"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "GUARDRAIL_DATA"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(clone)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["data_dir"]) == clone / "guardrail" / "data"
    assert all(n > 0 for n in seen["tasks"].values()) and sum(seen["tasks"].values()) == seen["all"] == 1240
    assert seen["plain"] == {"train": 200, "test": 50}
    assert seen["page"], "the page template (guardrail/templates) is not found in the clone"
    # the split the shipped organism was trained and evaluated on
    assert seen["split_hash"] == json.loads(MANIFEST.read_text())["split_hash"]
