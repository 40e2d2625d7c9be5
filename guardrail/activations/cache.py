"""A paired activation cache on disk: A's and B's residual stream at one site.

Layout of a cache folder::

    manifest.json            what was collected, from what, and which shards are complete
    shard_00000.safetensors  acts [n, 2, d] (0 = A, 1 = B) + row metadata + per-shard sums

A shard covers a fixed block of prompts and is written to a temporary name, then renamed,
then recorded in the manifest (also replaced atomically). A process killed at any point
leaves only complete, recorded shards; ``collect`` on the same folder resumes after them.
Normalisation statistics are sums over shards, so they never disagree with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from guardrail.fileio import sha256_file, write_atomic
from guardrail.residual.site import Site

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """The cache folder does not match the request, or its files are damaged."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    first_prompt: int
    n_prompts: int
    n_rows: int
    sha256: str


class CacheManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    model_a: str
    model_b: str
    layer: int
    site: Site
    d_model: int
    dtype: str = "float32"
    n_prompts: int
    n_tool_prompts: int
    data_hash: str
    shard_prompts: int
    max_length: int
    engine: str = "transformers"  # what read the site (caches written before vLLM collection were all transformers)
    shards: list[ShardInfo] = []
    complete: bool = False

    @property
    def positions(self) -> str:
        return self.site.positions

    @property
    def n_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    @property
    def prompts_done(self) -> int:
        return sum(s.n_prompts for s in self.shards)


def outlier_rows(acts: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Rows (bool ``[N]``) of ``acts [N, 2, d]`` where either model's norm exceeds ``max_ratio`` ×
    that model's median row norm.

    Attention-sink tokens (a prompt's first token) carry norms two orders of magnitude above
    the rest (≈ 25,000 against a median of 135 at SmolLM2-135M's layer 11, under 1 % of the
    rows of the last 32 prompt tokens): kept in training data they set the per-channel
    normalisation and most of the reconstruction loss, so a dictionary would be fitted to
    them rather than to the tokens it is used on. Dictionary training usually leaves them
    out (BOS exclusion).
    """
    norms = acts.float().norm(dim=-1)  # [N, 2]
    return (norms > max_ratio * norms.median(dim=0).values).any(dim=-1)


@dataclass
class PairedActivations:
    """Rows of paired activations with what each row is."""

    acts: torch.Tensor  # [N, 2, d]: index 0 = A, 1 = B
    is_tool: torch.Tensor  # bool [N]
    is_last: torch.Tensor  # bool [N]: the last prompt token of its prompt
    prompt_idx: torch.Tensor  # long [N]
    position: torch.Tensor  # long [N]: token position counted from the prompt's start

    def __len__(self) -> int:
        return self.acts.shape[0]

    def select(self, mask: torch.Tensor) -> "PairedActivations":
        return PairedActivations(self.acts[mask], self.is_tool[mask], self.is_last[mask], self.prompt_idx[mask], self.position[mask])

    def last_token(self) -> "PairedActivations":
        """One row per prompt: the protocol used for ranking and interventions."""
        return self.select(self.is_last)


class ActivationCache:
    """Read access to a cache folder (and the bookkeeping ``collect`` writes through)."""

    def __init__(self, root: Path, manifest: CacheManifest):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | Path) -> "ActivationCache":
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise CacheError(f"{root} is not an activation cache (no {MANIFEST})")
        try:
            manifest = CacheManifest.model_validate_json(path.read_text())
        except ValueError as exc:
            raise CacheError(f"{path} is not a valid cache manifest: {exc}") from exc
        return cls(root, manifest)

    def save_manifest(self) -> None:
        write_atomic(self.root / MANIFEST, self.manifest.model_dump_json(indent=2))

    def _shard(self, info: ShardInfo, verify: bool) -> dict[str, torch.Tensor]:
        path = self.root / info.name
        if not path.exists():
            raise CacheError(f"shard {info.name} listed in the manifest is missing from {self.root}")
        if verify and sha256_file(path) != info.sha256:
            raise CacheError(f"shard {info.name} does not match its recorded sha256: the file was modified or damaged")
        return load_file(path)

    def load(self, verify: bool = True) -> PairedActivations:
        """All complete shards concatenated, activations as float32."""
        if not self.manifest.shards:
            raise CacheError(f"cache {self.root} holds no complete shard yet")
        parts = [self._shard(s, verify) for s in self.manifest.shards]
        cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
        return PairedActivations(cat("acts").float(), cat("is_tool"), cat("is_last"), cat("prompt_idx"), cat("position"))

    @property
    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std [2, d] over every row, from the shards' exact sums."""
        total = torch.zeros(2, self.manifest.d_model, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for info in self.manifest.shards:
            shard = self._shard(info, verify=False)
            total += shard["sum"]
            total_sq += shard["sumsq"]
        n = max(self.manifest.n_rows, 1)
        mean = total / n
        var = (total_sq / n - mean**2).clamp(min=0) * n / max(n - 1, 1)
        return mean.float(), var.sqrt().clamp(min=1e-6).float()
