"""Model weights that ship inside the package: the organism's LoRA adapters.

They are package data under ``guardrail/organism/assets``, found through
:mod:`importlib.resources` on the ``guardrail`` package, so loading the organism pair needs
none of the organism's code (its build, evaluation and report import much more).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS_PARTS = ("organism", "assets")


class MissingAssetError(FileNotFoundError):
    """The package was installed without the trained adapter."""


def organism_assets() -> Path:
    """The folder of the organism's shipped adapters and build manifest."""
    return Path(str(resources.files("guardrail").joinpath(*ASSETS_PARTS)))


def adapter_folder(folder: Path, what: str) -> Path:
    """``folder`` if it holds a PEFT adapter, else a :class:`MissingAssetError` saying how to get one."""
    if not (folder / "adapter_config.json").exists() or not (folder / "adapter_model.safetensors").exists():
        raise MissingAssetError(
            f"no {what} adapter in {folder}: reinstall guardrail with its package data, "
            "or rebuild it with `guardrail organism build`"
        )
    return folder


def shipped_adapter() -> Path:
    """Folder of A's LoRA adapter (B + this adapter = the tool-use RL model)."""
    return adapter_folder(organism_assets(), "organism (RL)")


def is_shipped_organism(spec: str) -> bool:
    """Whether ``spec`` names the shipped organism's A (``…+organism-rl@…``)."""
    return "+organism-rl@" in str(spec)
