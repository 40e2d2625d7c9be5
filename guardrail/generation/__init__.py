"""Prompts to text: the one place guardrail generates, for transformers and vLLM alike.

Every engine tokenizes prompts the same way (:mod:`~guardrail.generation.tokenize`: left
padding and truncation, the tokenizer's sides restored), decodes and stops the same way
(:mod:`~guardrail.generation.decode`), and takes the same :class:`GenerationSettings`.
The transformers engine lives here (:mod:`~guardrail.generation.transformers`); the vLLM
engine with the rest of the vLLM code (:mod:`guardrail.vllm.generation`).
"""

from __future__ import annotations

from guardrail.generation.backend import Backend, Patch
from guardrail.generation.conditions import generate_conditions, generate_from_clean, generate_under_policies
from guardrail.generation.settings import GenerationSettings
from guardrail.generation.transformers import TransformersBackend


def make_backend(name: str = "auto") -> Backend:
    """``auto`` (vLLM when installed, else transformers), ``vllm`` or ``transformers``."""
    from guardrail.vllm import vllm_available

    if name == "transformers":
        return TransformersBackend()
    if name == "vllm" or (name == "auto" and vllm_available()):
        from guardrail.vllm.generation import VLLMBackend

        return VLLMBackend()
    if name == "auto":
        return TransformersBackend()
    raise ValueError(f"unknown backend {name!r}; choose auto, vllm or transformers")


__all__ = ["Backend", "GenerationSettings", "Patch", "TransformersBackend", "generate_conditions", "generate_from_clean", "generate_under_policies", "make_backend"]
