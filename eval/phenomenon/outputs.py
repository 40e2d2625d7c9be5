"""Greedy outputs per named condition, generated once and kept on disk.

A condition is a list of per-prompt patches of the last prompt token (``None`` = clean) or a
guard policy acting at every token. Each finished condition is written to
``<folder>/<name>-<prompts>.json`` at once, so an interrupted run keeps what it finished and
a re-run generates only what is missing. Names carry everything the outputs depend on
besides the artifact and the prompts (split, protocol, feature, α, seed); ``<prompts>`` is
a digest of the prompt ids, so runs on different samples (the demo's, the eval's) share a
folder without overwriting each other; the folder is the artifact's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from guardrail.generation import Backend, GenerationSettings, generate_conditions
from guardrail.eval.scoring import score_all
from guardrail.eval.suites import EvalItem

SAFE_NAME = re.compile(r"^[A-Za-z0-9_.=+\-]+$")


def ids_digest(items: Sequence[EvalItem]) -> str:
    return hashlib.sha256("\x1f".join(i.id for i in items).encode()).hexdigest()[:8]


class OutputStore:
    """Outputs of one model, per condition name, cached as JSON.

    Patched and guarded conditions depend on the dictionary and live in ``folder``; clean
    ones (no patch) depend only on the model, the prompts and the decoding, and live in
    ``clean_folder`` (default ``folder``), where every dictionary trained on the same
    activations finds them.
    """

    def __init__(self, folder: Path, backend: Backend, loaded: Any, settings: GenerationSettings, layer: int,
                 say: Callable[[str], None] = print, clean_folder: Path | None = None) -> None:
        self.folder, self.backend, self.loaded, self.settings, self.layer, self.say = Path(folder), backend, loaded, settings, layer, say
        self.clean_folder = Path(clean_folder) if clean_folder is not None else self.folder
        self._clean: set[str] = set()
        for f in (self.folder, self.clean_folder):
            f.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, items: Sequence[EvalItem]) -> Path:
        if not SAFE_NAME.match(name):
            raise ValueError(f"condition name {name!r} must be a plain file name")
        return (self.clean_folder if name in self._clean else self.folder) / f"{name}-{ids_digest(items)}.json"

    def _read(self, name: str, items: Sequence[EvalItem]) -> list[str] | None:
        path = self._path(name, items)
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        if [i.id for i in items] != stored["ids"]:
            raise ValueError(f"{path} holds outputs of other prompts; delete it to regenerate")
        return stored["outputs"]

    def _write(self, name: str, items: Sequence[EvalItem], outs: Sequence[str]) -> None:
        path = self._path(name, items)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps({"ids": [i.id for i in items], "outputs": list(outs)}, ensure_ascii=False))
        tmp.replace(path)

    def patched(self, items: Sequence[EvalItem], conditions: dict[str, Sequence[torch.Tensor | None] | None]) -> dict[str, list[str]]:
        """Outputs of every condition; the missing ones decode together (one prefill per prompt)."""
        self._clean.update(n for n, p in conditions.items() if p is None)
        out = {n: self._read(n, items) for n in conditions}
        todo = {n: conditions[n] for n, o in out.items() if o is None}
        if todo:
            self.say(f"  generating {len(todo)} condition(s) × {len(items)} prompts: {', '.join(todo)}")
            made = generate_conditions(self.backend, self.loaded, [i.text for i in items], self.settings, todo, layer=self.layer)
            for n, texts in made.items():
                self._write(n, items, texts)
                out[n] = texts
        return out  # type: ignore[return-value]

    def guarded(self, name: str, items: Sequence[EvalItem], make: Callable[[Sequence[str]], list[str]]) -> list[str]:
        """Outputs of a condition produced by ``make(texts)`` (a guard acting at every token)."""
        have = self._read(name, items)
        if have is not None:
            return have
        self.say(f"  generating {name} × {len(items)} prompts")
        texts = make([i.text for i in items])
        self._write(name, items, texts)
        return texts


def scored(items: Sequence[EvalItem], texts: Sequence[str], condition: str) -> list[dict[str, Any]]:
    """Score records (``guardrail.eval.scoring``), one per prompt, in the items' order."""
    return score_all(items, texts, condition=condition)
