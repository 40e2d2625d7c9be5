"""Where guardrail keeps what it derives (dequantised weights, trained artifacts)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$GUARDRAIL_HOME`` or ``~/.cache/guardrail``; created on first use."""
    root = Path(os.environ.get("GUARDRAIL_HOME", Path.home() / ".cache" / "guardrail")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def shown(path: str | Path) -> str:
    """``path`` as a report prints it: under ``$GUARDRAIL_HOME`` it is written from there, so a
    committed page names the artifact the same way on every machine."""
    p, root = Path(path).expanduser().resolve(), home().resolve()
    return f"$GUARDRAIL_HOME/{p.relative_to(root)}" if p.is_relative_to(root) else str(path)
