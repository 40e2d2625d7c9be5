"""A vLLM engine that mirrors a LoRA model under training: greedy checks and GRPO rollouts.

The warm start checks format accuracy the way ``organism eval`` scores it: greedy, up to
256 new tokens. Most rows of a weak model never close a tool call and run to the cap, and
transformers' padded batch decoding paid ~1.4 s a step for 16 such rows here (363 s per
check); on vLLM a check of 32 such rows took 108 s.

GRPO can draw its groups here too (``rollout_backend="vllm"``, as TRL's ``use_vllm``): a
step's groups of 8 go in one call, each prompt prefilled once for its rows by the prefix
cache. That decoded ×2.8 the tokens per second of transformers drawing them group by
group (``benchmarks/bench_grpo_rollouts.py``: 45.6 s against 131.9 s for 4 steps).

The engine loads the base once; :meth:`MirrorEngine.sync` copies the LoRA-merged
projection weights into it and drops the prefix cache, whose keys and values the old
weights computed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from guardrail.generation.decode import vllm_stop_kwargs
from guardrail.generation.settings import GenerationSettings
from guardrail.vllm.engine import engine_kwargs, kv_bytes_per_token, model_folder
from guardrail.vllm.generation import greedy

SampledRows = tuple[list[list[int]], list[bool]]  # one prompt's sampled token rows, and which ran out of tokens


def merged_weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights with the LoRA merged, under the base's own parameter names."""
    merge = getattr(model, "merge_adapter", None)
    if merge is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.merge_adapter()
    try:
        state = model.get_base_model().state_dict()
        return {k.replace(".base_layer", ""): v.detach().clone() for k, v in state.items() if "lora_" not in k}
    finally:
        model.unmerge_adapter()


def _set_linear(linear: torch.nn.Module, weight: torch.Tensor) -> None:
    """Replace a vLLM linear layer's weight, re-packing it where the CPU backend packed it."""
    if hasattr(linear, "cpu_linear"):  # CPU: the weight was packed for oneDNN / sgl and emptied
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        linear.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        dispatch_cpu_unquantized_gemm(linear, remove_weight=True)
        return
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))


def _push(vllm_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy a HF Llama/Qwen2 state into vLLM's fused projections (qkv, o, gate_up, down)."""
    for i, layer in enumerate(vllm_model.model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        _set_linear(attn.qkv_proj, torch.cat([state[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        _set_linear(attn.o_proj, state[p + "self_attn.o_proj.weight"])
        _set_linear(mlp.gate_up_proj, torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]))
        _set_linear(mlp.down_proj, state[p + "mlp.down_proj.weight"])


class MirrorEngine:
    """In-process vLLM engine on ``loaded``'s base folder, kept in step with a training model.

    Only the decoder layers' projections are synced: the LoRA targets of a build must lie
    among them (embeddings and norms stay the base's).
    """

    def __init__(self, loaded: Any, max_prompt_tokens: int | None = None, kv_cache_bytes: int = 512 << 20) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model must reach the module
        from vllm import LLM

        self.loaded = loaded
        self.max_prompt_tokens = max_prompt_tokens
        max_len = getattr(loaded.model.config, "max_position_embeddings", 4096)
        # vLLM refuses a cache that cannot hold one sequence of max_len; beyond that, fewer
        # rows decode at once (512 MiB held ~11k tokens of SmolLM2: a check of 32 in 108 s)
        kv = max(kv_cache_bytes, int(1.1 * kv_bytes_per_token(loaded) * max_len))
        # the prefix cache lets a group's rows share their prompt's prefill; sync() empties it
        self.llm = LLM(model=model_folder(loaded), max_model_len=max_len,
                       **engine_kwargs(kv_cache_memory_bytes=kv, enable_prefix_caching=True))

    def sync(self, model) -> None:
        """Load ``model``'s current weights (LoRA merged) into the engine."""
        state = merged_weights(model)
        self.llm.apply_model(lambda m: _push(m, state))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight sync: cached prompts would use the old weights")

    def sample(self, prompt_ids: Sequence[Sequence[int]], n: int, max_new_tokens: Sequence[int], temperature: float,
               stop: Sequence[str]) -> list[SampledRows]:
        """``n`` sampled completions of each prompt (token ids): a row ends at EOS or on a stop
        string, and rows that hit their ``max_new_tokens[i]`` are marked truncated (the caller
        closes them into rollouts, e.g. :func:`guardrail.organism.rl.close_rollouts`)."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, max_tokens=budget, skip_special_tokens=False, **vllm_stop_kwargs(stop))
                  for budget in max_new_tokens]
        outs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        return [([list(c.token_ids) for c in o.outputs], [c.finish_reason == "length" for c in o.outputs]) for o in outs]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        """Greedy completions, decoded and cut at the first stop string as ``organism eval``'s are."""
        settings = GenerationSettings(max_new_tokens=max_new_tokens, max_prompt_tokens=self.max_prompt_tokens, stop=tuple(stop))
        return greedy(self.llm, self.loaded, prompts, settings)

    def close(self) -> None:
        """Free the engine (its KV cache and weights) once the build's checks are done."""
        import gc

        del self.llm
        gc.collect()
