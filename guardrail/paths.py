"""Where guardrail keeps what it derives (dequantised weights, trained artifacts)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$GUARDRAIL_HOME`` or ``~/.cache/guardrail``; created on first use."""
    root = Path(os.environ.get("GUARDRAIL_HOME", Path.home() / ".cache" / "guardrail")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
