"""Hot reload of policy files on a thread of its own, never in the model's forward pass.

A guard that watches its policy files hands them to a :class:`PolicyWatcher`. The watcher's
thread polls each file's signature (mtime, size, inode) every ``interval`` seconds; when one
changes it calls the guard's ``reload(name, path, artifact)``, which parses, validates and
compiles the new policy (reading the artifact from disk if it must) and then swaps it in
with one reference assignment. The forward hook only ever reads the compiled policy that
is current, so a slow disk, a large artifact or a hostile file delays the reload, not the
requests. A reload that fails leaves the last good policy active; the guard's ``reload``
reports why, and the watcher logs it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("guardrail.policy")

DEFAULT_INTERVAL = 2.0

# (name, path, artifact) -> {"ok": bool, "error": str | None}; must not raise for a bad file
ReloadFn = Callable[[str, str, Any], dict[str, Any]]


@dataclass(frozen=True)
class FileSignature:
    """What changes when a file is rewritten in place or replaced by a rename."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: str | Path) -> "FileSignature | None":
        try:
            st = os.stat(path)
        except OSError:
            return None  # missing for now (an editor's rename in progress): keep the old policy
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class WatchedFile:
    name: str
    path: str
    artifact: Any
    signature: FileSignature | None


@dataclass(frozen=True)
class ReloadOutcome:
    """One reload the watcher attempted."""

    name: str
    path: str
    ok: bool
    error: str | None = None


class PolicyWatcher:
    """Polls watched policy files and reloads the changed ones through ``reload``."""

    def __init__(self, reload: ReloadFn, interval: float = DEFAULT_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"watch interval must be positive, got {interval}")
        self._reload = reload
        self.interval = float(interval)
        self._files: dict[str, WatchedFile] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outcomes: list[ReloadOutcome] = []  # most recent last, bounded
        self.keep_outcomes = 100

    def watch(self, name: str, path: str | Path, artifact: Any = None, signature: FileSignature | None = None) -> None:
        """Watch ``path`` for policy ``name``; ``signature`` is the file as it was when loaded."""
        with self._lock:
            self._files[name] = WatchedFile(name, str(path), artifact, signature if signature is not None else FileSignature.of(path))

    def unwatch(self, name: str) -> None:
        """Stop watching policy ``name``'s file (a no-op when it is not watched)."""
        with self._lock:
            self._files.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._files)

    def poll(self) -> list[ReloadOutcome]:
        """Reload every watched file whose signature changed since the last look (one pass)."""
        with self._lock:
            files = list(self._files.values())
        outcomes = []
        for wf in files:
            current = FileSignature.of(wf.path)
            if current is None or current == wf.signature:
                continue
            wf.signature = current  # a file that fails stays refused until it changes again
            outcomes.append(self._reload_one(wf))
        return outcomes

    def _reload_one(self, wf: WatchedFile) -> ReloadOutcome:
        try:
            res = self._reload(wf.name, wf.path, wf.artifact)
            outcome = ReloadOutcome(wf.name, wf.path, bool(res.get("ok")), res.get("error"))
        except Exception as exc:  # noqa: BLE001 - the watcher outlives any one bad reload
            outcome = ReloadOutcome(wf.name, wf.path, False, f"{type(exc).__name__}: {exc}")
        if outcome.ok:
            log.info("guardrail: reloaded policy %s from %s", wf.name, wf.path)
        else:
            log.warning("guardrail: reload of policy %s from %s refused, last good policy kept: %s", wf.name, wf.path, (outcome.error or "")[:500])
        self.outcomes = (self.outcomes + [outcome])[-self.keep_outcomes :]
        return outcome

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="guardrail-policy-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("guardrail: policy watcher pass failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


__all__ = ["DEFAULT_INTERVAL", "FileSignature", "PolicyWatcher", "ReloadOutcome"]
