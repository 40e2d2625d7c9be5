"""Generation backends for the harness: batched greedy decoding with the paper's patch.

The paper's protocol: the intervention rewrites **only the last prompt token's activation at
one layer, once, during prefill**; decoding is greedy. The harness computes the new
activations with :mod:`guardrail.features.interventions` (the one intervention math) and
a backend writes them:

* :class:`TransformersBackend` — left-padded batches through ``generate``; the write is a
  forward hook (``guardrail.residual.hf.patch_residual``) that fires on the prefill pass
  only. With left padding, column −1 is every row's last prompt token.
* :class:`VLLMBackend` — vLLM (CPU build here) in-process; each request carries its
  replacement vector in ``SamplingParams.extra_args`` and a worker hook writes it at the
  request's last prompt token during its prefill.

``default_backend()`` picks vLLM when it is installed and the model is a local folder,
transformers otherwise. Greedy outputs of the two agree on the tiny pair
(``tests/test_eval_experiments.py``).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from guardrail.residual.hf import patch_residual, read_residual

Patch = torch.Tensor | None  # replacement for the last prompt token's residual, [d], or None


@dataclass
class GenerationSettings:
    """How to decode: greedy, ``max_new_tokens`` (the paper uses 200), prompt cap, batch size."""

    max_new_tokens: int = 200
    batch_size: int = 8
    max_prompt_tokens: int | None = None  # truncate from the left (keeps the last prompt token)
    stop: tuple[str, ...] = ()  # end a sequence once it has written one of these (kept in the output)


def trim_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to and including its earliest stop string (both backends end there)."""
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


class Backend(Protocol):
    name: str

    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]: ...

    def prompts_per_chunk(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, n_conditions: int) -> int:
        """How many prompts ``generate_conditions`` should run through all conditions at once."""
        ...


def _tokenize(tok: Any, texts: Sequence[str], max_prompt_tokens: int | None) -> dict[str, torch.Tensor]:
    side = tok.truncation_side
    tok.truncation_side = "left"
    try:
        kw: dict[str, Any] = {"truncation": True, "max_length": max_prompt_tokens} if max_prompt_tokens else {}
        return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False, **kw)
    finally:
        tok.truncation_side = side


def _decode(tok: Any, ids: list[int], eos_ids: set[int]) -> str:
    out = []
    for t in ids:
        if t in eos_ids:
            break
        out.append(t)
    pad = tok.pad_token_id
    while out and out[-1] == pad:
        out.pop()
    # Keep added tokens such as <tool_call> (some tokenizers mark them special).
    return tok.decode(out, skip_special_tokens=False)


def _eos_ids(loaded: Any) -> set[int]:
    ids: set[int] = set()
    gc = getattr(loaded.model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


def _batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices grouped by length (less padding per batch)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TransformersBackend:
    """Batched greedy ``generate`` with an optional one-shot prefill patch per row."""

    name = "transformers"

    def prompts_per_chunk(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, n_conditions: int) -> int:
        return max(len(prompts), 1)  # no prefix cache to fit: one chunk

    @torch.no_grad()
    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]:
        if patches is not None and len(patches) != len(prompts):
            raise ValueError(f"{len(patches)} patches for {len(prompts)} prompts")
        if patches is not None and any(p is not None for p in patches) and layer is None:
            raise ValueError("patched generation needs the layer to patch")
        tok, model = loaded.tokenizer, loaded.model
        eos = _eos_ids(loaded)
        out: list[str] = [""] * len(prompts)
        for idx in _batches(prompts, settings.batch_size):
            enc = _tokenize(tok, [prompts[i] for i in idx], settings.max_prompt_tokens)
            rows = [(j, patches[i]) for j, i in enumerate(idx) if patches is not None and patches[i] is not None]
            gen = self._generate_batch(model, tok, enc, settings, layer, rows)
            width = enc["input_ids"].shape[1]
            for j, i in enumerate(idx):
                out[i] = trim_at_stop(_decode(tok, gen[j, width:].tolist(), eos), settings.stop)
        return out

    @staticmethod
    def _generate_batch(model, tok, enc, settings, layer, rows) -> torch.Tensor:
        kwargs = dict(do_sample=False, max_new_tokens=settings.max_new_tokens, pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tok)
        if not rows:
            return model.generate(**enc, **kwargs)
        state = {"done": False}

        def write_once(hidden: torch.Tensor) -> torch.Tensor | None:
            if state["done"]:
                return None  # decode steps: untouched (the paper patches once, at prefill)
            state["done"] = True
            new = hidden.clone()
            for j, vec in rows:
                new[j, -1] = vec.to(new.dtype)
            return new

        with patch_residual(model, layer, write_once):
            return model.generate(**enc, **kwargs)


@torch.no_grad()
def last_token_residual(loaded: Any, prompts: Sequence[str], layer: int, *, batch_size: int = 8,
                        max_prompt_tokens: int | None = None) -> torch.Tensor:
    """One model's raw residual ``[N, d]`` after ``layer`` at each prompt's last token,
    tokenized (and left-truncated) exactly as the backends tokenize for generation."""
    rows: list[torch.Tensor | None] = [None] * len(prompts)
    for idx in _batches(prompts, batch_size):
        enc = _tokenize(loaded.tokenizer, [prompts[i] for i in idx], max_prompt_tokens)
        acts = read_residual(loaded.model, layer, enc["input_ids"], enc["attention_mask"])[:, -1].float()
        for j, i in enumerate(idx):
            rows[i] = acts[j]
    return torch.stack(rows)  # type: ignore[arg-type]


def last_token_activations(pair: Any, prompts: Sequence[str], layer: int, *, batch_size: int = 8,
                           max_prompt_tokens: int | None = None) -> torch.Tensor:
    """Raw residual ``[N, 2, d]`` of A (0) and B (1) at the last prompt token after ``layer``."""
    kw = dict(batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    return torch.stack([last_token_residual(pair.a, prompts, layer, **kw), last_token_residual(pair.b, prompts, layer, **kw)], dim=1)


# --------------------------------------------------------------------------- vLLM
def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


PATCH_KEY = "guardrail_eval_patch"


def _install_patch_hook(worker: Any, layer: int) -> bool:
    """Worker side: write ``extra_args[PATCH_KEY]`` over each request's last prompt token.

    vLLM decoder layers return ``(mlp_out, residual)`` over the flattened batch; the residual
    stream is their sum, so the new first element is ``target − residual``. The row is the
    request's token whose position is ``len(prompt) − 1``: it is present only in the step
    that prefills it, so the write happens once, during prefill, as in the paper.
    """
    from guardrail.residual.vllm_guard import batch_layout

    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    if getattr(model, "_guardrail_eval_hook", None) is not None:
        return True

    def hook(_module, inputs, output):
        mlp_out, residual = output
        positions = inputs[0]
        ids, qsl = batch_layout(runner)
        new = None
        for r, rid in enumerate(ids):
            state = runner.requests.get(rid)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            vec = extra.get(PATCH_KEY) if isinstance(extra, dict) else None
            if vec is None:
                continue
            last = len(state.prompt_token_ids) - 1
            rows = (positions[qsl[r] : qsl[r + 1]] == last).nonzero().flatten()
            if rows.numel() == 0:
                continue
            row = qsl[r] + int(rows[0])
            if new is None:
                new = mlp_out.clone()
            target = torch.tensor(vec, dtype=torch.float32, device=mlp_out.device)
            new[row] = (target - residual[row].float()).to(mlp_out.dtype)
        return None if new is None else (new, residual)

    model._guardrail_eval_hook = model.model.layers[layer].register_forward_hook(hook)
    return True


class VLLMBackend:
    """vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one engine per model folder."""

    name = "vllm"

    def __init__(self, dtype: str = "float32", kv_cache_bytes: int | None = None) -> None:
        if not vllm_available():
            raise RuntimeError("vLLM is not installed: `pip install guardrail[vllm]`, or use --backend transformers")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._engines: dict[str, Any] = {}
        self._hooked: set[tuple[str, int]] = set()
        self.kv_cache_bytes = kv_cache_bytes
        self.dtype = dtype

    def _engine(self, loaded: Any) -> Any:
        """One engine per model folder, both alive at once (A and B alternate in every experiment).

        On CPU each engine gets an explicit KV-cache size: vLLM's automatic sizing subtracts
        the whole process's memory (including the other engine) and refuses a second engine.
        On GPU the two engines split the memory.
        """
        path = model_folder(loaded)
        if path not in self._engines:
            from vllm import LLM

            from guardrail.residual.vllm_guard import engine_kwargs

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
        lens = _tokenize(loaded.tokenizer, prompts, settings.max_prompt_tokens)["attention_mask"].sum(1).tolist()
        mean_len = sum(lens) / max(len(lens), 1)
        capacity = 0.8 * self.kv_bytes(loaded) / kv_bytes_per_token(loaded, self.dtype)
        need = mean_len + n_conditions * (2 * BLOCK_TOKENS + settings.max_new_tokens)
        return max(1, int(capacity // need))

    def generate(self, loaded: Any, prompts: Sequence[str], settings: GenerationSettings, *, layer: int | None = None,
                 patches: Sequence[Patch] | None = None) -> list[str]:
        llm = self._engine(loaded)
        key = (model_folder(loaded), -1 if layer is None else layer)
        if patches is not None and any(p is not None for p in patches):
            if layer is None:
                raise ValueError("patched generation needs the layer to patch")
            if key not in self._hooked:
                llm.collective_rpc(_install_patch_hook, args=(layer,))
                self._hooked.add(key)
        extras = [{PATCH_KEY: p.float().tolist()} if p is not None else None for p in patches] if patches is not None else None
        return vllm_greedy(llm, loaded, prompts, settings, extras)


def vllm_greedy(llm: Any, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
                extras: Sequence[dict | None] | None = None, cache_salt: str | None = None) -> list[str]:
    """Greedy outputs of ``prompts`` on a vLLM engine serving ``loaded``'s weights, decoded and
    cut as the transformers backend does (added tokens such as ``<tool_call>`` kept).
    ``extras[i]``: ``SamplingParams.extra_args`` of prompt i (the patch hook reads them).
    ``cache_salt`` keeps these prompts' prefix-cache blocks apart from every other request's:
    needed when an edit acts on prompt tokens before the last one."""
    from vllm import SamplingParams

    tok = loaded.tokenizer
    enc = [_tokenize(tok, [p], settings.max_prompt_tokens)["input_ids"][0].tolist() for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=settings.max_new_tokens, extra_args=extras[i] if extras else None,
                             skip_special_tokens=False, stop=list(settings.stop) or None, include_stop_str_in_output=True)
              for i in range(len(prompts))]
    salt = {"cache_salt": cache_salt} if cache_salt else {}
    outs = llm.generate([{"prompt_token_ids": ids, **salt} for ids in enc], params, use_tqdm=False)
    eos = _eos_ids(loaded)
    return [trim_at_stop(_decode(tok, list(o.outputs[0].token_ids), eos), settings.stop) for o in outs]


PREFIX_TOKENS = 48_000  # default CPU KV cache: ~65 tool prompts of ~700 tokens held for reuse
BLOCK_TOKENS = 16


def kv_bytes_per_token(loaded: Any, dtype: str = "float32") -> int:
    """Bytes of keys and values one token occupies across all layers."""
    cfg = loaded.model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    width = 2 if dtype in ("bfloat16", "float16") else 4
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * width


def generate_conditions(backend: Backend, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
                        conditions: dict[str, Sequence[Patch] | None], *, layer: int | None = None,
                        progress: Callable[[int], None] | None = None) -> dict[str, list[str]]:
    """Greedy outputs of every condition (its per-prompt patches, or None) on every prompt.

    Prompts go in chunks that vLLM's prefix cache can hold while all conditions decode
    them: the first condition prefills and caches each prompt, the others (one batched
    call) recompute only the patched last token. Run condition by condition, each would
    prefill every ~700-token tool prompt again — most of an audit's time on a CPU.
    ``progress(n)`` is called with the number of prompts finished after each chunk.
    """
    names = list(conditions)
    chunk = backend.prompts_per_chunk(loaded, prompts, settings, len(names))
    out: dict[str, list[str]] = {n: [] for n in names}
    for s in range(0, len(prompts), chunk):
        sub = list(prompts[s : s + chunk])

        def part(name: str) -> list[Patch]:
            p = conditions[name]
            return [None] * len(sub) if p is None else list(p[s : s + chunk])

        out[names[0]] += backend.generate(loaded, sub, settings, layer=layer, patches=part(names[0]))
        if len(names) > 1:
            texts = backend.generate(loaded, sub * (len(names) - 1), settings, layer=layer,
                                     patches=[p for n in names[1:] for p in part(n)])
            for i, n in enumerate(names[1:]):
                out[n] += texts[i * len(sub) : (i + 1) * len(sub)]
        if progress is not None:
            progress(len(sub))
    return out


def generate_under_policies(backend: Backend, loaded: Any, prompts: Sequence[str], settings: GenerationSettings,
                            artifact: Any, policies: dict[str, Any]) -> dict[str, list[str]]:
    """Greedy outputs of every prompt under each named guard policy (acting wherever its rules say).

    vLLM: the policies are installed together on the engine (``guardrail.policy.install_guard``)
    and each request names its own; they are removed afterwards. A policy may edit every
    prompt token, so each call's requests get a fresh prefix-cache salt: blocks computed without
    the policy, or in another call (another policy of the same name), are never reused. Transformers: the
    :func:`guardrail.policy.guard` context manager per policy, ``settings.batch_size`` rows at a time.
    Either way the text is decoded and cut as :func:`vllm_greedy` does.
    """
    if isinstance(backend, VLLMBackend):
        from guardrail.policy import install_guard
        from guardrail.residual.vllm_guard import POLICY_KEY

        llm = backend._engine(loaded)
        handle = install_guard(llm, artifact, policies)
        try:
            return {name: vllm_greedy(llm, loaded, prompts, settings, [{POLICY_KEY: name}] * len(prompts), cache_salt=f"guardrail-{name}-{uuid.uuid4().hex}")
                    for name in policies}
        finally:
            handle.remove()
    return {name: _hf_guarded(loaded, prompts, settings, artifact, pol) for name, pol in policies.items()}


def _hf_guarded(loaded: Any, prompts: Sequence[str], settings: GenerationSettings, artifact: Any, policy: Any) -> list[str]:
    from guardrail.policy import guard

    tok, eos, out = loaded.tokenizer, _eos_ids(loaded), [""] * len(prompts)
    with guard(loaded, artifact, policy) as g:
        for idx in _batches(prompts, settings.batch_size):
            for i, res in zip(idx, g.generate([prompts[i] for i in idx], max_new_tokens=settings.max_new_tokens)):
                out[i] = trim_at_stop(_decode(tok, res.token_ids, eos), settings.stop)
    return out


def model_folder(loaded: Any) -> str:
    """A local HF folder holding ``loaded``'s weights (vLLM loads from disk); see
    :func:`guardrail.models.specs.weights_folder`."""
    from guardrail.models.specs import weights_folder

    return str(weights_folder(loaded))


def make_backend(name: str = "auto") -> Backend:
    """``auto`` (vLLM when installed, else transformers), ``vllm`` or ``transformers``."""
    if name == "transformers":
        return TransformersBackend()
    if name == "vllm":
        return VLLMBackend()
    if name == "auto":
        return VLLMBackend() if vllm_available() else TransformersBackend()
    raise ValueError(f"unknown backend {name!r}; choose auto, vllm or transformers")
