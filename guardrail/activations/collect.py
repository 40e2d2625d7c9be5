"""Run both models of a pair over prompts and store their activations at a site.

Two engines read the site: transformers (the reference: left-padded batches, each forward
pass stopped after the site's layer) and vLLM (:mod:`guardrail.vllm.collection`: each
shard's prompts submitted at once and batched by vLLM's scheduler). Both tokenize with
:func:`~guardrail.generation.tokenize.encode_prompts` and write the same rows in the same
order to the same cache, so the two caches compare row for row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from guardrail.activations.cache import (
    ActivationCache,
    CacheError,
    CacheManifest,
    ShardInfo,
)
from guardrail.fileio import fsync_replace, sha256_file
from guardrail.generation.tokenize import encode_prompts
from guardrail.models.pair import ModelPair
from guardrail.prompts import PromptItem, prompts_hash
from guardrail.residual.hf import read_residual
from guardrail.residual.site import Site


def _check_resumable(cache: ActivationCache, fresh: CacheManifest) -> None:
    old = cache.manifest
    keys = ("model_a", "model_b", "layer", "site", "d_model", "data_hash", "shard_prompts", "max_length", "dtype", "engine")
    diffs = [k for k in keys if getattr(old, k) != getattr(fresh, k)]
    if diffs:
        raise CacheError(
            f"{cache.root} holds a different collection ({', '.join(diffs)} differ); "
            "use another --out folder or delete this one"
        )


def _open_or_create(out: Path, fresh: CacheManifest) -> ActivationCache:
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        cache = ActivationCache.open(out)
        _check_resumable(cache, fresh)
    else:
        cache = ActivationCache(out, fresh)
        cache.save_manifest()
    recorded = {s.name for s in cache.manifest.shards}
    for stray in out.glob("shard_*"):  # written or half-written by a killed run, never recorded
        if stray.name not in recorded:
            stray.unlink()
    return cache


@dataclass
class SiteRows:
    """Both models' rows at a site for a list of prompts, and which prompt and position each row is.

    Rows come prompt by prompt in the order the prompts were given, each prompt's positions
    ascending: every engine writes the same rows in the same order, so two caches of the same
    collection compare row for row.
    """

    acts: torch.Tensor  # [n, 2, d]: index 0 = A, 1 = B
    prompt: torch.Tensor  # long [n]: index into the prompts read
    position: torch.Tensor  # long [n]: token position counted from the prompt's start

    @classmethod
    def cat(cls, parts: list["SiteRows"], offsets: list[int]) -> "SiteRows":
        """Parts read from consecutive slices of the prompts (slice i starts at ``offsets[i]``)."""
        return cls(torch.cat([p.acts for p in parts]), torch.cat([p.prompt + o for p, o in zip(parts, offsets)]), torch.cat([p.position for p in parts]))


class SiteReader(Protocol):
    """An engine that reads both models of a pair at a site (``collect(..., engine=...)``)."""

    name: str  # recorded in the cache manifest: a cache is resumed by the engine that began it

    def read(self, pair: ModelPair, site: Site, texts: list[str], max_length: int, done: Callable[[int], None]) -> SiteRows:
        """Rows of ``texts`` (tokenized by :func:`~guardrail.generation.tokenize.encode_prompts`); ``done(n)`` as n prompts finish."""
        ...


class TransformersReader:
    """The reference engine: left-padded batches in transformers, each stopped after the site's layer."""

    name = "transformers"

    def __init__(self, batch_size: int = 8) -> None:
        self.batch_size = batch_size

    def read(self, pair: ModelPair, site: Site, texts: list[str], max_length: int, done: Callable[[int], None]) -> SiteRows:
        parts, starts = [], list(range(0, len(texts), self.batch_size))
        for start in starts:
            batch = texts[start : start + self.batch_size]
            parts.append(self._rows(pair, site, batch, max_length))
            done(len(batch))
        return SiteRows.cat(parts, starts)

    @staticmethod
    def _rows(pair: ModelPair, site: Site, texts: list[str], max_length: int) -> SiteRows:
        enc = encode_prompts(pair.tokenizer, texts, max_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        acts = [read_residual(m.model, site.layer, ids, mask) for m in (pair.a, pair.b)]
        batch_idx, tok_idx = site.prompt_mask(mask).nonzero(as_tuple=True)
        pad = (mask == 0).sum(1)
        paired = torch.stack([acts[0][batch_idx, tok_idx], acts[1][batch_idx, tok_idx]], dim=1)
        return SiteRows(paired, batch_idx, tok_idx - pad[batch_idx])


def site_reader(engine: "str | SiteReader", batch_size: int = 8, **engine_options: Any) -> SiteReader:
    """``"transformers"`` (the reference), ``"vllm"`` (a :class:`guardrail.vllm.collection.VLLMReader`
    made with ``engine_options``, e.g. ``tensor_parallel_size``), or a reader itself."""
    if not isinstance(engine, str):
        return engine
    if engine == "transformers":
        if engine_options:
            raise ValueError(f"the transformers engine takes no engine options: {sorted(engine_options)}")
        return TransformersReader(batch_size)
    if engine == "vllm":
        from guardrail.vllm import vllm_available

        if not vllm_available():
            raise RuntimeError("vLLM is not installed: `pip install guardrail[vllm]`, or collect with engine='transformers'")
        from guardrail.vllm.collection import VLLMReader

        return VLLMReader(**engine_options)
    raise ValueError(f"unknown collection engine {engine!r}: transformers or vllm")


def _shard_tensors(reader: SiteReader, pair: ModelPair, site: Site, prompts: list[PromptItem], first: int, max_length: int, dtype: str,
                   bar: Any) -> dict[str, torch.Tensor]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].text))  # less padding per batch
    got = reader.read(pair, site, [prompts[i].text for i in order], max_length, bar.update)
    acts = got.acts.float()
    prompt_idx = torch.tensor(order, dtype=torch.long)[got.prompt] + first
    position = got.position
    last_pos = {}
    for p, q in zip(prompt_idx.tolist(), position.tolist()):
        last_pos[p] = max(last_pos.get(p, -1), q)
    is_last = torch.tensor([last_pos[p] == q for p, q in zip(prompt_idx.tolist(), position.tolist())], dtype=torch.bool)
    is_tool = torch.tensor([prompts[p - first].is_tool for p in prompt_idx.tolist()], dtype=torch.bool)
    stored = acts.to(getattr(torch, dtype))
    acc = stored.double()  # stats of what is stored, so normalisation matches the data exactly
    return {
        "acts": stored.contiguous(),
        "is_tool": is_tool,
        "is_last": is_last,
        "prompt_idx": prompt_idx,
        "position": position,
        "sum": acc.sum(0),
        "sumsq": (acc**2).sum(0),
    }


@torch.no_grad()
def collect(
    pair: ModelPair,
    prompts: list[PromptItem],
    site: Site,
    out: str | Path,
    *,
    batch_size: int = 8,
    shard_prompts: int = 256,
    max_length: int = 1024,
    dtype: str = "float32",
    progress: bool = True,
    engine: "str | SiteReader" = "transformers",
) -> ActivationCache:
    """Collect A/B activations for ``prompts`` at ``site`` into ``out``; resumes if interrupted.

    ``engine``: ``"transformers"`` (the reference; ``batch_size`` prompts per forward pass),
    ``"vllm"`` (each shard's prompts in one ``generate`` call, batched by vLLM; ``batch_size``
    is unused), or a reader made beforehand, such as a :class:`guardrail.vllm.collection.VLLMReader`
    with engine settings (tensor parallel on GPU) whose engines serve several collections.
    The manifest records the engine, and a cache is resumed only by the engine that began it:
    the engines agree to float precision, not bit for bit, and a cache's rows come from one.
    """
    if not prompts:
        raise ValueError("no prompts to collect")
    if site.positions == "generated":
        raise ValueError("collection reads prompts; positions='generated' has nothing to read")
    site.validate_for(pair.n_layers)
    reader = site_reader(engine, batch_size)
    fresh = CacheManifest(
        model_a=pair.a.spec,
        model_b=pair.b.spec,
        layer=site.layer,
        site=site,
        d_model=pair.d_model,
        dtype=dtype,
        n_prompts=len(prompts),
        n_tool_prompts=sum(p.is_tool for p in prompts),
        data_hash=prompts_hash(prompts),
        shard_prompts=shard_prompts,
        max_length=max_length,
        engine=reader.name,
    )
    cache = _open_or_create(Path(out), fresh)
    done = cache.manifest.prompts_done
    bar = tqdm(total=len(prompts), initial=done, desc="collect", unit="prompt", disable=not progress)
    for first in range(done, len(prompts), shard_prompts):
        block = prompts[first : first + shard_prompts]
        tensors = _shard_tensors(reader, pair, site, block, first, max_length, dtype, bar)
        name = f"shard_{len(cache.manifest.shards):05d}.safetensors"
        tmp = cache.root / (name + ".partial")
        save_file(tensors, str(tmp))
        fsync_replace(tmp, cache.root / name)
        info = ShardInfo(name=name, first_prompt=first, n_prompts=len(block), n_rows=len(tensors["acts"]), sha256=sha256_file(cache.root / name))
        cache.manifest.shards.append(info)
        cache.save_manifest()
    bar.close()
    cache.manifest.complete = True
    cache.save_manifest()
    return cache
