"""The vLLM generation backend: greedy completions on in-process engines, one per model folder.

Each patched request carries its replacement vector in ``SamplingParams.extra_args``
(:func:`guardrail.vllm.requests.patch_args`) and the worker's one hook
(:mod:`guardrail.vllm.worker`) writes it at the request's last prompt token during its
prefill. Texts are decoded and cut by :mod:`guardrail.generation.decode`, so greedy outputs
agree with the transformers backend (``tests/test_eval_experiments.py``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Sequence

import torch

from guardrail.generation.backend import Patch, check_patches
from guardrail.generation.decode import decode_completion, eos_ids, vllm_stop_kwargs
from guardrail.generation.settings import GenerationSettings
from guardrail.generation.tokenize import encode_prompts
from guardrail.vllm import vllm_available
from guardrail.vllm.engine import BLOCK_TOKENS, PREFIX_TOKENS, engine_kwargs, kv_bytes_per_token, model_folder
from guardrail.vllm.requests import POLICY_KEY, patch_args, read_args


class VLLMBackend:
    """vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per model folder."""

    name = "vllm"

    def __init__(self, dtype: str = "float32", kv_cache_bytes: int | None = None) -> None:
        if not vllm_available():
            raise RuntimeError("vLLM is not installed: `pip install guardrail[vllm]`, or use --backend transformers")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._engines: dict[str, Any] = {}
        self._patched: set[tuple[str, int]] = set()
        self.kv_cache_bytes = kv_cache_bytes
        self.dtype = dtype

    def engine(self, loaded: Any) -> Any:
        """One engine per model folder, both alive at once (A and B alternate in every experiment).

        On CPU each engine gets an explicit KV-cache size: vLLM's automatic sizing subtracts
        the whole process's memory (including the other engine) and refuses a second engine.
        On GPU the two engines split the memory.
        """
        path = model_folder(loaded)
        if path not in self._engines:
            from vllm import LLM

            # Prefix caching is exact here: the patch touches only the last prompt token, and vLLM
            # never serves the block holding a prompt's last token from the cache (it recomputes
            # it for the logits), so every condition re-runs that token with its own patch while
            # the shared prompt prefix is computed once per model.
            if torch.cuda.is_available():
                kw: dict[str, Any] = dict(dtype="bfloat16", gpu_memory_utilization=0.4, enforce_eager=False, enable_prefix_caching=True, seed=0)
            else:
                kw = engine_kwargs(dtype=self.dtype, kv_cache_memory_bytes=self.kv_bytes(loaded), enable_prefix_caching=True)
            self._engines[path] = LLM(model=path, max_model_len=getattr(loaded.model.config, "max_position_embeddings", 4096), **kw)
        return self._engines[path]

    def kv_bytes(self, loaded: Any) -> int:
        """KV-cache size on CPU: ``PREFIX_TOKENS`` tokens of this model (64 MiB–2 GiB) unless set."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        return int(min(max(kv_bytes_per_token(loaded, self.dtype) * PREFIX_TOKENS, 64 << 20), 2 << 30))

    def prompts_per_chunk(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, n_conditions: int) -> int:
        """How many prompts fit in the prefix cache together with the decode blocks of
        ``n_conditions`` patched copies of each (with a 20% margin against eviction)."""
        if torch.cuda.is_available():
            return max(len(prompts), 1)
        lens = encode_prompts(loaded.tokenizer, prompts, settings.max_prompt_tokens)["attention_mask"].sum(1).tolist()
        mean_len = sum(lens) / max(len(lens), 1)
        capacity = 0.8 * self.kv_bytes(loaded) / kv_bytes_per_token(loaded, self.dtype)
        need = mean_len + n_conditions * (2 * BLOCK_TOKENS + settings.max_new_tokens)
        return max(1, int(capacity // need))

    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]:
        llm = self.engine(loaded)
        if check_patches(prompts, patches, layer):
            self._enable_patches(llm, loaded, layer)
        extras = [patch_args(p.float().tolist(), layer) if p is not None else None for p in patches] if patches is not None else None
        return greedy(llm, loaded, prompts, settings, extras)

    def generate_reading(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int) -> tuple[list[str], torch.Tensor]:
        """Each request keeps its last-prompt-token row in the worker's hook as its prefill
        passes (``guardrail_read``), so a read costs no forward pass of its own: on a prompt in
        the prefix cache only that token is recomputed."""
        from guardrail.vllm.driver import take_reads

        llm = self.engine(loaded)
        self._enable_patches(llm, loaded, layer)
        ids: list[str] = []
        texts = greedy(llm, loaded, prompts, settings, [read_args(layer)] * len(prompts), request_ids=ids)
        rows = take_reads(llm, ids)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise RuntimeError(f"vLLM did not prefill the last prompt token of {len(missing)} request(s) at layer {layer}: nothing was read")
        return texts, torch.stack([r.rows[-1] for r in rows])

    def _enable_patches(self, llm: Any, loaded: Any, layer: int) -> None:
        from guardrail.vllm.driver import enable_patches

        key = (model_folder(loaded), layer)
        if key not in self._patched:
            enable_patches(llm, layer)
            self._patched.add(key)

    def under_policies(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, artifact: Any,
                       policies: dict[str, Any]) -> dict[str, list[str]]:
        """Greedy outputs of every prompt under each named guard policy.

        The policies are installed together on the engine and each request names its own;
        they are removed afterwards. A policy may edit every prompt token, so each call's
        requests get a fresh prefix-cache salt: blocks computed without the policy, or in
        another call (another policy of the same name), are never reused.
        """
        from guardrail.vllm.driver import install_guard

        llm = self.engine(loaded)
        with install_guard(llm, artifact, policies):
            return {name: greedy(llm, loaded, prompts, settings, [{POLICY_KEY: name}] * len(prompts), cache_salt=f"guardrail-{name}-{uuid.uuid4().hex}")
                    for name in policies}


def greedy(llm: Any, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
           extras: Sequence[dict | None] | None = None, cache_salt: str | None = None, request_ids: list[str] | None = None) -> list[str]:
    """Greedy outputs of ``prompts`` on a vLLM engine serving ``loaded``'s weights, decoded by
    :mod:`guardrail.generation.decode` as the transformers backend's are.
    ``extras[i]``: ``SamplingParams.extra_args`` of prompt i (what the worker's hook reads).
    ``cache_salt`` keeps these prompts' prefix-cache blocks apart from every other request's:
    needed when an edit acts on prompt tokens before the last one. ``request_ids``, when
    given, receives each prompt's vLLM request id, in order."""
    from vllm import SamplingParams

    tok = loaded.tokenizer
    enc = [encode_prompts(tok, [p], settings.max_prompt_tokens)["input_ids"][0].tolist() for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, extra_args=extras[i] if extras else None,
                             skip_special_tokens=False, **vllm_stop_kwargs(settings.stop))
              for i in range(len(prompts))]
    salt = {"cache_salt": cache_salt} if cache_salt else {}
    outs = llm.generate([{"prompt_token_ids": ids, **salt} for ids in enc], params, use_tqdm=False)
    eos = eos_ids(loaded.model, tok)
    if request_ids is not None:
        request_ids += [o.request_id for o in outs]
    return [decode_completion(tok, list(o.outputs[0].token_ids), eos, settings.stop) for o in outs]
