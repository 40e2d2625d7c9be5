"""Hot reload by the watcher thread: changed files are compiled off the caller's thread and
swapped in whole; a file that fails to load leaves the last good policy active."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from guard_fixtures import build_artifact
from guardrail.policy import GuardError, Policy, PolicyError, PolicyStore, compile_policy
from guardrail.policy.watch import FileSignature, PolicyWatcher

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.fixture(scope="module")
def art(tiny_pair, tmp_path_factory):
    path, info = build_artifact(tiny_pair, tmp_path_factory.mktemp("watch") / "dfc")
    return {"path": path, **info}


def _policy_text(threshold: float) -> str:
    return f"name: p\ntelemetry: {{otel: false}}\nrules:\n  - {{id: look, action: alert, select: {{partition: a_exclusive}}, threshold: {threshold}}}\n"


def _rewrite(path: Path, text: str, step: int) -> None:
    """Write and move the mtime forward by ``step`` seconds, so the change is seen at any clock resolution."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + step * 1_000_000_000))


class _Guard:
    """The part of a guard the watcher talks to: a store and a reload that never raises."""

    def __init__(self, art_path: Path) -> None:
        self.store = PolicyStore()
        self.art = art_path
        self.threads: list[str] = []

    def reload(self, name: str, path: str, artifact) -> dict:
        self.threads.append(threading.current_thread().name)
        try:
            self.store.set(name, compile_policy(Policy.load(path), self.art))
        except (PolicyError, GuardError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True}


def test_watcher_swaps_changed_policy_and_keeps_last_good(art, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(_policy_text(0.5))
    guard = _Guard(art["path"])
    guard.reload("p", str(path), None)
    first = guard.store.get("p")
    watcher = PolicyWatcher(guard.reload, interval=60)
    watcher.watch("p", path)
    assert watcher.poll() == []  # unchanged: nothing reloaded

    _rewrite(path, _policy_text(0.25), 1)
    (outcome,) = watcher.poll()
    assert outcome.ok and guard.store.get("p") is not first
    assert guard.store.get("p").rules[0].rule.threshold == 0.25
    good = guard.store.get("p")

    for step, broken in enumerate(("name: p\nrules:\n  - {id: look, action: alert, select: {partition: nowhere}}\n", BOMB, "\x00garbage"), start=2):
        _rewrite(path, broken, step)
        (outcome,) = watcher.poll()
        assert not outcome.ok and outcome.error
        assert guard.store.get("p") is good  # the last good policy stays active
    assert "anchor" in watcher.outcomes[-2].error  # the bomb was refused, not expanded
    assert watcher.poll() == []  # a refused file is not retried until it changes again

    path.unlink()
    assert watcher.poll() == [] and guard.store.get("p") is good  # a vanished file keeps the policy
    _rewrite(path, _policy_text(0.75), 10)
    (outcome,) = watcher.poll()
    assert outcome.ok and guard.store.get("p").rules[0].rule.threshold == 0.75


def test_watcher_thread_reloads_off_the_callers_thread(art, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(_policy_text(0.5))
    done = threading.Event()
    guard = _Guard(art["path"])

    def reload(name, p, artifact):
        res = guard.reload(name, p, artifact)
        done.set()
        return res

    watcher = PolicyWatcher(reload, interval=0.05)
    watcher.watch("p", path, signature=FileSignature.of(path))
    watcher.start()
    try:
        _rewrite(path, _policy_text(0.25), 1)
        assert done.wait(timeout=60), "the watcher thread never reloaded the changed file"
    finally:
        watcher.stop()
    assert not watcher.running
    assert guard.threads == ["guardrail-policy-watch"]
    assert guard.store.get("p").rules[0].rule.threshold == 0.25


def test_watcher_survives_a_reload_that_raises(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("x")

    def explode(name, p, artifact):
        raise RuntimeError("disk on fire")

    watcher = PolicyWatcher(explode, interval=60)
    watcher.watch("p", path)
    _rewrite(path, "y", 1)
    (outcome,) = watcher.poll()
    assert not outcome.ok and "disk on fire" in outcome.error
    with pytest.raises(ValueError, match="positive"):
        PolicyWatcher(explode, interval=0)
