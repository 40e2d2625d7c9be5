"""What every model loader returns, and the transformers loader for folders and hub ids.

Which spec strings exist and which loader each one takes is :mod:`guardrail.models.specs`;
this module is the leaf the loaders share (the tiny pair and the GGUF build on it).
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
    # sha256 of the LoRA adapter merged into the weights (None: none was): what results made with it name it by
    adapter_sha256: str | None = None

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


def load_hf(spec: str, dtype: torch.dtype) -> LoadedModel:
    """A local Hugging Face folder, or a hub id read from the local cache only."""
    path = Path(spec).expanduser()
    local = path.exists()
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
