"""Settings of the in-process vLLM engines guardrail builds: CPU-safe kwargs, KV-cache sizes, model folders."""

from __future__ import annotations

import os
from typing import Any

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
