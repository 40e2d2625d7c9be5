"""Settings of the in-process vLLM engines guardrail builds: CPU-safe kwargs, KV-cache sizes, model folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from guardrail.paths import home

PREFIX_TOKENS = 48_000  # default CPU KV cache: ~65 tool prompts of ~700 tokens held for reuse
BLOCK_TOKENS = 16


def keep_torch_threads() -> None:
    """Pin ``OMP_NUM_THREADS`` to this process's cores unless the user set it.

    An in-process vLLM CPU engine drops torch to one intra-op thread when the variable is
    unset, then replaces ``torch.set_num_threads`` with a no-op: every transformers step
    after the first engine (activation reads, guarded generation) would run on one core
    for the rest of the process.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """``LLM(...)`` settings that work on this CPU and keep the guard exact (and the
    process's torch threads, see :func:`keep_torch_threads`).

    Prefix caching is off: a cached prefix would skip the hook and reuse KV computed under
    another policy. Callers whose edits touch only the last prompt token may turn it on.
    """
    keep_torch_threads()
    kw = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, enable_prefix_caching=False, seed=0,
              use_tqdm_on_load=False)
    kw.update(overrides)
    return kw


def kv_bytes_per_token(loaded: Any, dtype: str = "float32") -> int:
    """Bytes of keys and values one token occupies across all layers."""
    cfg = loaded.model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    width = 2 if dtype in ("bfloat16", "float16") else 4
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * width


def model_folder(loaded: Any) -> str:
    """A local HF folder holding ``loaded``'s weights (vLLM loads from disk); see
    :func:`guardrail.models.specs.weights_folder`."""
    from guardrail.models.specs import weights_folder

    return str(weights_folder(loaded))


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def truncated_folder(loaded: Any, n_layers: int) -> str:
    """A folder of ``loaded``'s first ``n_layers`` decoder layers (the model's own folder when that is all of them).

    vLLM has no early exit: an engine built from this folder stops after layer ``n_layers − 1``,
    which is exact for reading that layer (no layer above it affects it in a causal forward
    pass) and saves the layers above, as ``read_residual`` does in transformers. The final
    norm and the head run on that layer's output, so what such an engine samples is
    meaningless: it serves reads, not generation. Written once under ``$GUARDRAIL_HOME/vllm/truncated``,
    named by the source folder's weights and the layer count; the copy holds the kept layers' tensors only.
    """
    src = Path(model_folder(loaded))
    config = json.loads((src / "config.json").read_text())
    if n_layers >= int(config["num_hidden_layers"]):
        return str(src)
    weights = sorted(src.glob("*.safetensors"))
    stamp = [str(src.resolve()), n_layers] + [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    out = home() / "vllm" / "truncated" / f"{src.name}-{n_layers}-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        _write_truncated(src, config, weights, n_layers, out)
    return str(out)


def _write_truncated(src: Path, config: dict[str, Any], weights: list[Path], n_layers: int, out: Path) -> None:
    """The copy :func:`truncated_folder` describes, written to a temporary folder then renamed (a killed write leaves none)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, generation config, chat template
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    kept = {}
    for w in weights:
        with safe_open(str(w), framework="pt") as fh:
            for name in fh.keys():
                m = _LAYER_KEY.search(name)
                if m is None or int(m.group(1)) < n_layers:
                    kept[name] = fh.get_tensor(name)
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config, num_hidden_layers=n_layers)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:n_layers]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
