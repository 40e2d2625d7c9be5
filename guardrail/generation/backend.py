"""What a generation backend is: an engine that writes greedy completions, optionally patched."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from guardrail.generation.settings import GenerationSettings

Patch = torch.Tensor | None  # replacement for the last prompt token's residual, [d], or None


class Backend(Protocol):
    """Greedy completions of prompts on one model, each with an optional last-prompt-token patch.

    A patch rewrites the residual after ``layer`` at the prompt's last token once, during
    prefill (the paper's protocol); decode steps are untouched.
    """

    name: str

    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]: ...

    def generate_reading(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int) -> tuple[list[str], torch.Tensor]:
        """Unpatched greedy completions and the residual ``[N, d]`` after ``layer`` at each
        prompt's last token, read on the prefill that generated them (no second forward)."""
        ...

    def prompts_per_chunk(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, n_conditions: int) -> int:
        """How many prompts ``generate_conditions`` should run through all conditions at once."""
        ...


def check_patches(prompts: Sequence[str], patches: Sequence[Patch] | None, layer: int | None) -> bool:
    """Whether any prompt is patched; a wrong count, or a patch without a layer, is an error."""
    if patches is None:
        return False
    if len(patches) != len(prompts):
        raise ValueError(f"{len(patches)} patches for {len(prompts)} prompts")
    patched = any(p is not None for p in patches)
    if patched and layer is None:
        raise ValueError("patched generation needs the layer to patch")
    return patched
