"""Residual-stream sites and the engine adapters that read and write them."""

from guardrail.residual.site import Site
from guardrail.residual.hf import decoder_layers, patch_residual, read_residual

__all__ = ["Site", "decoder_layers", "patch_residual", "read_residual"]
