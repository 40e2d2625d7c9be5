"""Activation collection on vLLM: ``collect(pair, prompts, site, out, engine="vllm")``.

Each shard's prompts go to vLLM in one ``generate`` call per model (``max_tokens=1``), so its
scheduler batches them as it batches any traffic: no padding, long prompts prefilled in
chunks beside short ones. Every request carries a read payload (``guardrail_read``,
:mod:`guardrail.vllm.requests`) and the worker's one hook (:mod:`guardrail.vllm.worker`)
keeps its rows at the site's positions as they pass; the reader assembles them by
position (:class:`~guardrail.vllm.layout.ReadRows`) and checks that every asked position
arrived. Prompts are tokenized by :func:`~guardrail.generation.tokenize.encode_prompts`, as
the transformers reader tokenizes them, so both caches hold the same rows in the same order.

Each model gets one in-process engine built from a copy of its first ``layer + 1`` layers
(:func:`~guardrail.vllm.engine.truncated_folder`): vLLM's counterpart of the early exit.
Prefix caching is off: a prompt block served from the cache skips the forward pass, so its
positions would never reach the hook (only a prompt's last token is always recomputed).
A unique ``cache_salt`` per request would be exact too, but would fill the cache with
blocks nobody reuses; off says what is meant.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from guardrail.activations.collect import SiteRows
from guardrail.generation.tokenize import encode_prompts
from guardrail.models.pair import ModelPair
from guardrail.residual.site import Site
from guardrail.vllm.engine import engine_kwargs, kv_bytes_per_token, truncated_folder
from guardrail.vllm.layout import ReadRows
from guardrail.vllm.requests import ReadRequest

CPU_BATCHED_TOKENS = 4096  # vLLM's default max_num_batched_tokens for the LLM class on CPU


def read_for(site: Site) -> tuple[dict[str, Any], ReadRequest]:
    """The read payload of a site's positions (collection reads prompts: ``all`` is ``prompt``), and its record."""
    want = ReadRequest(site.layer) if site.positions == "last_prompt" else ReadRequest(site.layer, "prompt", site.last_n)
    return want.extra_args(), want


def prompt_ids(tok: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Each prompt's token ids, exactly as the transformers reader's left-padded batches hold them."""
    enc = encode_prompts(tok, texts, max_length)
    return [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


class VLLMReader:
    """Reads a pair at a site on vLLM, one in-process engine per model (both alive at once).

    ``max_num_batched_tokens``: tokens per engine step (vLLM's default when None); a prompt
    longer than that is prefilled in chunks. ``kv_cache_tokens``: the CPU KV cache per engine
    (default: four steps' worth, at least two of the longest prompts). ``tensor_parallel_size``,
    ``data_parallel_size`` and ``engine_options`` go to ``vllm.LLM`` as they are (GPU; not
    tested here, where there is no GPU). vLLM 0.32's ``LLM`` refuses ``data_parallel_size > 1``
    in one process unless launched with ``distributed_executor_backend="external_launcher"``.
    """

    name = "vllm"

    def __init__(self, *, dtype: str = "float32", max_num_batched_tokens: int | None = None, kv_cache_tokens: int | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1, **engine_options: Any) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the hook lives in this process
        self.dtype = dtype
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_tokens = kv_cache_tokens
        self.parallel = {k: v for k, v in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)) if v != 1}
        self.engine_options = engine_options
        self._engines: dict[tuple[str, int], Any] = {}

    def max_model_len(self, loaded: Any, max_length: int) -> int:
        """The longest prompt plus the one sampled token, within the model's positions."""
        return min(max_length + 1, int(getattr(loaded.model.config, "max_position_embeddings", max_length + 1)))

    def engine(self, loaded: Any, layer: int, max_model_len: int) -> Any:
        """The engine reading ``loaded`` after ``layer`` (made on first use, reads enabled)."""
        folder = truncated_folder(loaded, layer + 1)
        key = (folder, max_model_len)
        if key not in self._engines:
            from vllm import LLM

            from guardrail.vllm.driver import enable_patches

            llm = LLM(model=folder, max_model_len=max_model_len, **self._kwargs(loaded, layer, max_model_len))
            enable_patches(llm, layer)
            self._engines[key] = llm
        return self._engines[key]

    def _kwargs(self, loaded: Any, layer: int, max_model_len: int) -> dict[str, Any]:
        batched = {"max_num_batched_tokens": self.max_num_batched_tokens} if self.max_num_batched_tokens else {}
        if torch.cuda.is_available():
            return dict(dtype=self.dtype, gpu_memory_utilization=0.4, enforce_eager=False, enable_prefix_caching=False, seed=0,
                        **batched, **self.parallel, **self.engine_options)
        tokens = self.kv_cache_tokens or max(4 * (self.max_num_batched_tokens or CPU_BATCHED_TOKENS), 2 * max_model_len)
        per_token = kv_bytes_per_token(loaded, self.dtype) * (layer + 1) // loaded.n_layers  # the kept layers only
        return engine_kwargs(dtype=self.dtype, kv_cache_memory_bytes=tokens * per_token, enable_prefix_caching=False,
                             **batched, **self.parallel, **self.engine_options)

    def read(self, pair: ModelPair, site: Site, texts: list[str], max_length: int, done: Callable[[int], None]) -> SiteRows:
        """Both models' rows of ``texts`` at ``site``, prompt by prompt, positions ascending."""
        ids = prompt_ids(pair.tokenizer, texts, max_length)
        payload, want = read_for(site)
        limit = self.max_model_len(pair.a, max_length)
        too_long = max(len(i) for i in ids)
        if too_long >= limit:
            raise ValueError(f"a prompt of {too_long} tokens leaves vLLM no position for the token it samples (max_model_len {limit}): "
                             f"collect with max_length <= {limit - 1} (--max-length), or with engine='transformers'")
        reads = [self._read_model(m, site.layer, limit, ids, payload) for m in (pair.a, pair.b)]
        done(len(texts))
        return _paired(ids, reads, want)

    def _read_model(self, loaded: Any, layer: int, max_model_len: int, ids: list[list[int]], payload: dict[str, Any]) -> list[ReadRows | None]:
        """One ``generate`` call over every non-empty prompt; what each read (None for an empty prompt)."""
        from vllm import SamplingParams

        from guardrail.vllm.driver import take_reads

        llm = self.engine(loaded, layer, max_model_len)
        submit = [i for i, x in enumerate(ids) if x]
        params = SamplingParams(temperature=0.0, max_tokens=1, extra_args=payload)
        outs = llm.generate([{"prompt_token_ids": ids[i]} for i in submit], params, use_tqdm=False)
        got = dict(zip(submit, take_reads(llm, [o.request_id for o in outs])))
        return [got.get(i) for i in range(len(ids))]


def _paired(ids: list[list[int]], reads: list[list[ReadRows | None]], want: ReadRequest) -> SiteRows:
    """A's and B's reads side by side, after checking each holds exactly the positions asked for."""
    acts, prompt, position = [], [], []
    for i, (n, a, b) in enumerate(zip((len(x) for x in ids), *reads)):
        if n == 0:
            continue  # an empty prompt has no row (as in transformers)
        expected = torch.arange(want.first_position(n), n)
        for model, got in (("A", a), ("B", b)):
            if got is None or not torch.equal(got.position, expected):
                seen = "nothing" if got is None else f"{len(got.position)} positions"
                raise RuntimeError(f"vLLM read {seen} of prompt {i} on model {model}, not its {len(expected)} positions {int(expected[0])}..{n - 1}: "
                                   "was the prompt served from a prefix cache?")
        acts.append(torch.stack([a.rows, b.rows], dim=1))
        prompt.append(torch.full((len(expected),), i, dtype=torch.long))
        position.append(expected)
    return SiteRows(torch.cat(acts), torch.cat(prompt), torch.cat(position))
