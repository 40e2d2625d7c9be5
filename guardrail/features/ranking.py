"""Which features separate tool prompts from ordinary prompts.

Ranking follows the paper: one activation per prompt (the last prompt token), features
from the joint encoding after the sparsity rule, and per feature Cohen's d (pooled SD)
and AUROC between tool and ordinary prompts. A feature is *tool-signed* when it is more
active on tool prompts (d > 0). The result is saved beside the artifact as
``ranking.json`` so policies can select features by label (``ranked: tool``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

RANKING_FILE = "ranking.json"
PartitionName = Literal["a_exclusive", "b_exclusive", "shared"]
Encoding = Literal["joint", "a_only", "b_only"]


class FeatureStat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    partition: PartitionName
    cohens_d: float
    auroc: float
    fire_rate_tool: float
    fire_rate_plain: float
    mean_tool: float
    mean_plain: float
    tool_signed: bool


class Ranking(BaseModel):
    """Per-feature statistics plus ordered labels (``tool``: most tool-specific first)."""

    model_config = ConfigDict(extra="forbid")
    encoding: Encoding
    n_tool: int
    n_plain: int
    features: list[FeatureStat]
    labels: dict[str, list[int]]

    def top(self, label: str = "tool", partition: PartitionName | None = None, n: int | None = None) -> list[int]:
        """Feature indices under ``label``, optionally within one partition, best first."""
        if label not in self.labels:
            raise KeyError(f"ranking has no label {label!r}; it has {sorted(self.labels)}")
        by_index = {f.index: f for f in self.features}
        ordered = [i for i in self.labels[label] if partition is None or by_index[i].partition == partition]
        return ordered if n is None else ordered[:n]

    def stat(self, index: int) -> FeatureStat:
        return self.features[index]

    def save(self, artifact_dir: str | Path) -> Path:
        path = Path(artifact_dir) / RANKING_FILE
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, artifact_dir: str | Path) -> "Ranking":
        path = Path(artifact_dir) / RANKING_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `guardrail rank` on this artifact first")
        return cls.model_validate_json(path.read_text())


def partition_names(cc) -> list[str]:
    """Partition of every feature index ("shared" everywhere for a standard crosscoder)."""
    D = cc.W_enc.shape[-1]
    names = ["shared"] * D
    part = getattr(cc.config, "partition", None)
    if part is not None:
        for i in part.a_exclusive:
            names[i] = "a_exclusive"
        for i in part.b_exclusive:
            names[i] = "b_exclusive"
    return names


@torch.no_grad()
def encode_rows(cc, acts_raw: torch.Tensor, encoding: Encoding = "joint", batch: int = 4096) -> torch.Tensor:
    """Features [N, D] of raw paired activations [N, 2, d] under one encoding mode."""
    out = []
    for start in range(0, acts_raw.shape[0], batch):
        x = cc.normalize(acts_raw[start : start + batch])
        if encoding == "joint":
            out.append(cc.encode(x))
        else:
            model = 0 if encoding == "a_only" else 1
            out.append(cc.encode_single(x[:, model], model=model))
    return torch.cat(out)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-column AUROC (Mann-Whitney U / n_pos·n_neg) with average ranks for ties."""
    both = torch.cat([pos, neg]).double()
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    from scipy.stats import rankdata

    ranks = torch.from_numpy(rankdata(both.numpy(), axis=0))
    u = ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per-column Cohen's d with pooled standard deviation (0 where both groups are constant)."""
    n1, n2 = pos.shape[0], neg.shape[0]
    v1, v2 = pos.double().var(0, unbiased=True), neg.double().var(0, unbiased=True)
    pooled = (((n1 - 1) * v1 + (n2 - 1) * v2) / max(n1 + n2 - 2, 1)).sqrt()
    diff = pos.double().mean(0) - neg.double().mean(0)
    d = torch.where(pooled > 0, diff / pooled.clamp(min=1e-12), torch.zeros_like(diff))
    return d.float()


def rank_features(cc, acts_raw: torch.Tensor, is_tool: torch.Tensor, encoding: Encoding = "joint", min_fire_rate: float = 0.01) -> Ranking:
    """Rank every feature of ``cc`` on last-token activations labelled tool / plain.

    Features that fire on fewer than ``min_fire_rate`` of the tool prompts are never
    tool-signed: a large d from a handful of activations is noise, not a switch.
    """
    is_tool = is_tool.bool()
    if is_tool.all() or not is_tool.any():
        raise ValueError("ranking needs both tool and ordinary prompts")
    f = encode_rows(cc, acts_raw, encoding)
    pos, neg = f[is_tool], f[~is_tool]
    d, auc = cohens_d(pos, neg), auroc(pos, neg)
    fire_t, fire_p = (pos > 0).float().mean(0), (neg > 0).float().mean(0)
    names = partition_names(cc)
    signed = (d > 0) & (fire_t >= min_fire_rate)
    stats = [
        FeatureStat(
            index=i, partition=names[i], cohens_d=float(d[i]), auroc=float(auc[i]),
            fire_rate_tool=float(fire_t[i]), fire_rate_plain=float(fire_p[i]),
            mean_tool=float(pos[:, i].mean()), mean_plain=float(neg[:, i].mean()), tool_signed=bool(signed[i]),
        )
        for i in range(f.shape[1])
    ]
    plain_signed = (d < 0) & (fire_p >= min_fire_rate)
    labels = {
        "tool": [int(i) for i in torch.argsort(d, descending=True) if signed[i]],
        "plain": [int(i) for i in torch.argsort(d) if plain_signed[i]],
    }
    return Ranking(encoding=encoding, n_tool=int(is_tool.sum()), n_plain=int((~is_tool).sum()), features=stats, labels=labels)


def rank(artifact_dir: str | Path, cache, encoding: Encoding = "joint", save: bool = True) -> Ranking:
    """Load an artifact, rank its features on a cache's last-token rows, save the sidecar."""
    from guardrail.dictionary import load_artifact

    cc = load_artifact(artifact_dir)
    data = cache.load().last_token()
    ranking = rank_features(cc, data.acts, data.is_tool, encoding)
    if save:
        ranking.save(artifact_dir)
    return ranking


def summary(ranking: Ranking, n: int = 10) -> list[dict]:
    """The top tool-signed features of each partition, for reports and the CLI."""
    rows = []
    for part in ("a_exclusive", "b_exclusive", "shared"):
        for i in ranking.top("tool", part, n):
            rows.append(json.loads(ranking.stat(i).model_dump_json()))
    return rows
