"""Residual-stream sites and the transformers hooks that read and write them (vLLM's are in guardrail.vllm)."""

from guardrail.residual.site import Site
from guardrail.residual.hf import decoder_layers, patch_residual, read_residual

__all__ = ["Site", "decoder_layers", "patch_residual", "read_residual"]
