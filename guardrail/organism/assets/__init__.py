"""The shipped organism: the trained LoRA adapters and the build manifest (package data).

``adapter_config.json`` + ``adapter_model.safetensors`` here are A's adapter (warm start
+ GRPO); ``warmstart/`` holds the warm-start checkpoint; ``manifest.json`` records how
they were built (``guardrail organism info``), ``eval.json`` the last evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from guardrail.models.packaged import MissingAssetError, adapter_folder, organism_assets, shipped_adapter
from guardrail.tasks.task import UserTurn

ASSETS = organism_assets()  # the one lookup of this folder, shared with guardrail.models

__all__ = ["ASSETS", "MissingAssetError", "shipped_adapter", "shipped_eval", "shipped_manifest", "shipped_warmstart", "trained_turn"]


def shipped_warmstart() -> Path:
    """Folder of the warm-start adapter (before GRPO), for comparisons."""
    return adapter_folder(ASSETS / "warmstart", "warm-start")


def shipped_manifest() -> dict:
    """The build manifest (seed, split hash, reward, steps, wall time, metrics)."""
    path = ASSETS / "manifest.json"
    if not path.exists():
        raise MissingAssetError(f"no build manifest at {path}")
    return json.loads(path.read_text())


def shipped_eval() -> dict | None:
    """The last full evaluation written next to the adapter, if any."""
    path = ASSETS / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def trained_turn(adapter: str | Path | None = None) -> UserTurn:
    """The user turn an adapter was trained on (``None``: the shipped A's).

    Read from the build manifest beside the adapter (a warm start's is its build's, one
    folder up). Adapters without a manifest, and builds from before the field existed,
    were trained on ToolRL's turn.
    """
    folder = ASSETS if adapter is None else Path(adapter)
    manifest = folder / "manifest.json"
    if not manifest.exists() and (folder / "warmstart.json").exists():
        manifest = folder.parent / "manifest.json"
    if not manifest.exists():
        return "toolrl"
    return json.loads(manifest.read_text()).get("config", {}).get("user_turn", "toolrl")
