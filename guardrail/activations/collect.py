"""Run both models of a pair over prompts and store their activations at a site."""

from __future__ import annotations

from pathlib import Path

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
from guardrail.models.pair import ModelPair
from guardrail.prompts import PromptItem, prompts_hash
from guardrail.residual.hf import read_residual
from guardrail.residual.site import Site


def _check_resumable(cache: ActivationCache, fresh: CacheManifest) -> None:
    old = cache.manifest
    keys = ("model_a", "model_b", "layer", "site", "d_model", "data_hash", "shard_prompts", "max_length", "dtype")
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


def _rows(pair: ModelPair, site: Site, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations [n, 2, d] at the site, plus each row's batch index and position."""
    tok = pair.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    acts = [read_residual(m.model, site.layer, ids, mask) for m in (pair.a, pair.b)]
    select = site.prompt_mask(mask)
    batch_idx, tok_idx = select.nonzero(as_tuple=True)
    pad = (mask == 0).sum(1)
    paired = torch.stack([acts[0][batch_idx, tok_idx], acts[1][batch_idx, tok_idx]], dim=1)
    return paired, batch_idx, tok_idx - pad[batch_idx]


def _shard_tensors(pair, site, prompts, first, batch_size, max_length, dtype, bar) -> dict[str, torch.Tensor]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].text))  # less padding per batch
    chunks = {k: [] for k in ("acts", "prompt_idx", "position")}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        acts, bi, pos = _rows(pair, site, [prompts[i].text for i in idx], max_length)
        chunks["acts"].append(acts)
        chunks["prompt_idx"].append(torch.tensor(idx, dtype=torch.long)[bi] + first)
        chunks["position"].append(pos)
        bar.update(len(idx))
    acts = torch.cat(chunks["acts"]).float()
    prompt_idx = torch.cat(chunks["prompt_idx"])
    position = torch.cat(chunks["position"])
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
) -> ActivationCache:
    """Collect A/B activations for ``prompts`` at ``site`` into ``out``; resumes if interrupted."""
    if not prompts:
        raise ValueError("no prompts to collect")
    if site.positions == "generated":
        raise ValueError("collection reads prompts; positions='generated' has nothing to read")
    site.validate_for(pair.n_layers)
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
    )
    cache = _open_or_create(Path(out), fresh)
    done = cache.manifest.prompts_done
    bar = tqdm(total=len(prompts), initial=done, desc="collect", unit="prompt", disable=not progress)
    for first in range(done, len(prompts), shard_prompts):
        block = prompts[first : first + shard_prompts]
        tensors = _shard_tensors(pair, site, block, first, batch_size, max_length, dtype, bar)
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
