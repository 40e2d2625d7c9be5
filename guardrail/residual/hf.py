"""Read and write the residual stream of a transformers model through forward hooks.

Reading stops the forward pass right after the hooked layer (nothing above it is computed);
writing is a context manager that removes its hook on exit, leaving the model exactly as it
was. The residual stream "at layer L" is the output of decoder layer L, i.e.
``output_hidden_states[L + 1]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class _StopForward(Exception):
    """Raised inside a hook to skip the layers above the one being read."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of common causal-LM architectures."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as ``generate`` uses: batching never moves a token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def read_residual(model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Residual stream [B, T, d] after decoder layer ``layer``, computing no layer above it."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range 0..{len(layers) - 1}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_hidden(output).detach())
        raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer} did not run during the forward pass")
    return captured[0]


PatchFn = Callable[[torch.Tensor], "torch.Tensor | None"]


@contextmanager
def patch_residual(model: nn.Module, layer: int, fn: PatchFn) -> Iterator[None]:
    """Call ``fn(hidden [B, T, d])`` on layer ``layer``'s output at every forward pass.

    ``fn`` returns a replacement tensor or None (read only). The hook is removed on exit,
    including on error, so the model is restored bit for bit.
    """
    layers = decoder_layers(model)

    def hook(_module, _inputs, output):
        new = fn(_hidden(output))
        return None if new is None else _replace(output, new)

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

