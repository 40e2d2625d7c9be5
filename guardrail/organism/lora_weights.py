"""The LoRA's weights during a build: snapshots in memory, adapter folders on disk.

Snapshots let the warm start undo an overshooting chunk of steps and let GRPO's dev
selection keep an earlier step's adapter; folders are what ``load_model(adapter=...)`` reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LoraState = dict[str, torch.Tensor]


def lora_state(model) -> LoraState:
    """A copy of the trainable (LoRA) parameters."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_lora_state(model, state: LoraState) -> None:
    """Put a :func:`lora_state` copy back into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_adapter(model, folder: Path, base: str) -> None:
    """Write the PEFT adapter to ``folder``, whole or not at all (written beside it, then moved in).

    The config names the base by its guardrail spec (``base``, e.g. ``smollm2``), not by this
    machine's cache path, so the folder loads anywhere.
    """
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2))
    (tmp / "README.md").unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        shutil.move(str(f), folder / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def load_adapter_weights(model, folder: Path) -> None:
    """Load a saved adapter's weights into the model's LoRA (which must have the same shape)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    res = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"adapter {folder} does not fit this LoRA: unexpected {res.unexpected_keys[:3]}")
