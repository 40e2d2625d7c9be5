"""Which features separate tool prompts from prompts where no tool is called.

Ranking follows the paper: one activation per prompt (the last prompt token), features
from the joint encoding after the sparsity rule, and per feature Cohen's d (pooled SD)
and AUROC between tool prompts and negatives. A feature is *tool-signed* when it is more
active on tool prompts (d > 0).

Two contrasts, the same tool prompts as positives:

* ``plain`` (the paper's): ordinary prompts as bare text. A feature that only detects the
  tool template (the tool list, the ``</user>`` every tool prompt ends with) ranks top.
* ``template``: prompts under the same system text and user turn where no tool applies
  (:func:`guardrail.prompts.template_matched`: BFCL irrelevance tasks and ordinary prompts
  under a tool list). The template no longer separates the groups.

Both are saved beside the artifact in ``ranking.json`` (:class:`Rankings`) so policies can
select features by label and contrast (``ranked: tool``, ``negatives: template``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

if TYPE_CHECKING:
    from guardrail.activations import ActivationCache

RANKING_FILE = "ranking.json"
RANKING_FORMAT = "guardrail.ranking"
PartitionName = Literal["a_exclusive", "b_exclusive", "shared"]
Encoding = Literal["joint", "a_only", "b_only"]
Negatives = Literal["plain", "template"]


class FeatureStat(BaseModel):
    """One feature in one contrast; ``*_plain`` fields describe that contrast's negatives."""

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
    """One contrast: per-feature statistics plus ordered labels (``tool``: most tool-specific first).

    ``n_plain`` counts this contrast's negatives (ordinary or template-matched prompts).
    """

    model_config = ConfigDict(extra="forbid")
    encoding: Encoding
    negatives: Negatives = "plain"  # sidecars written before the template contrast are all plain
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

    @classmethod
    def load(cls, artifact_dir: str | Path, negatives: Negatives = "plain") -> "Ranking":
        """One contrast of the artifact's sidecar (either sidecar format)."""
        return Rankings.load(artifact_dir).get(negatives)


class Rankings(BaseModel):
    """The ``ranking.json`` sidecar: the plain contrast, and the template-matched one when ranked.

    A file written before the template contrast existed is a bare :class:`Ranking`; it
    loads as ``Rankings(plain=that)``.
    """

    model_config = ConfigDict(extra="forbid")
    format: Literal["guardrail.ranking"] = RANKING_FORMAT
    plain: Ranking
    template: Ranking | None = None

    @model_validator(mode="after")
    def _contrasts(self) -> "Rankings":
        for name in ("plain", "template"):
            r = getattr(self, name)
            if r is not None and r.negatives != name:
                raise ValueError(f"the {name} contrast holds a ranking with negatives={r.negatives!r}")
        if self.template is not None and self.template.encoding != self.plain.encoding:
            raise ValueError(f"the contrasts were encoded differently ({self.plain.encoding} vs {self.template.encoding})")
        return self

    def get(self, negatives: Negatives = "plain") -> Ranking:
        r = getattr(self, negatives, None) if negatives in ("plain", "template") else None
        if r is None:
            if negatives == "template":
                raise KeyError("this ranking has no template-matched contrast: run `guardrail rank` with --negatives-cache")
            raise KeyError(f"unknown negatives {negatives!r}; expected 'plain' or 'template'")
        return r

    def top(self, label: str = "tool", partition: PartitionName | None = None, n: int | None = None,
            negatives: Negatives = "plain") -> list[int]:
        """:meth:`Ranking.top` of one contrast (the plain one by default)."""
        return self.get(negatives).top(label, partition, n)

    def stat(self, index: int, negatives: Negatives = "plain") -> FeatureStat:
        return self.get(negatives).stat(index)

    def save(self, artifact_dir: str | Path) -> Path:
        path = Path(artifact_dir) / RANKING_FILE
        path.write_text(self.model_dump_json(indent=1, exclude_none=True))
        return path

    @classmethod
    def parse(cls, text: str) -> "Rankings":
        data = json.loads(text)
        if isinstance(data, dict) and "format" not in data:
            return cls(plain=Ranking.model_validate(data))
        return cls.model_validate(data)

    @classmethod
    def load(cls, artifact_dir: str | Path) -> "Rankings":
        path = Path(artifact_dir) / RANKING_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `guardrail rank` on this artifact first")
        try:
            return cls.parse(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid ranking sidecar: {exc}") from exc


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


def rank_features(cc, acts_raw: torch.Tensor, is_tool: torch.Tensor, encoding: Encoding = "joint", min_fire_rate: float = 0.01,
                  negatives: Negatives = "plain") -> Ranking:
    """Rank every feature of ``cc`` on last-token activations labelled tool / negative.

    Features that fire on fewer than ``min_fire_rate`` of the tool prompts are never
    tool-signed: a large d from a handful of activations is noise, not a switch.
    ``negatives`` only names the contrast the rows come from.
    """
    is_tool = is_tool.bool()
    if is_tool.all() or not is_tool.any():
        raise ValueError("ranking needs both tool prompts and negatives")
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
    return Ranking(encoding=encoding, negatives=negatives, n_tool=int(is_tool.sum()), n_plain=int((~is_tool).sum()),
                   features=stats, labels=labels)


def template_negative_rows(cache: ActivationCache, negatives_cache: ActivationCache) -> torch.Tensor:
    """Last-token rows [M, 2, d] of a template-matched negatives cache, checked against ``cache``.

    The negatives must come from the same models at the same layer (else the contrast
    compares sites, not prompts) and hold no tool prompt (else they are not negatives).
    """
    main, neg = cache.manifest, negatives_cache.manifest
    diffs = [f"{k} {getattr(neg, k)!r} != {getattr(main, k)!r}" for k in ("model_a", "model_b", "layer", "d_model") if getattr(neg, k) != getattr(main, k)]
    if diffs:
        raise ValueError(f"negatives cache {negatives_cache.root} was collected elsewhere than {cache.root}: {'; '.join(diffs)}")
    if neg.n_tool_prompts:
        raise ValueError(f"negatives cache {negatives_cache.root} holds {neg.n_tool_prompts} tool prompts; collect it from "
                         "guardrail.prompts.template_matched (`guardrail collect --prompts template-negatives`)")
    return negatives_cache.load().last_token().acts


def rank(artifact_dir: str | Path, cache: ActivationCache, encoding: Encoding = "joint", save: bool = True,
         negatives_cache: ActivationCache | None = None) -> Rankings:
    """Load an artifact, rank its features on a cache's last-token rows, save the sidecar.

    The plain contrast uses the cache's own tool / ordinary rows. With ``negatives_cache``
    the template contrast is ranked too: the same tool rows against that cache's rows.
    The template-matched negatives live in a cache of their own rather than in the training
    collection: the training data (and every artifact trained on it) stays as it was, a
    cache row has one tool / ordinary label and the two kinds of negatives must not mix,
    and an existing artifact is re-ranked by collecting only the negatives' last tokens (a
    few hundred prompts), not its training data again.
    """
    from guardrail.dictionary import load_artifact

    cc = load_artifact(artifact_dir)
    data = cache.load().last_token()
    template = None
    if negatives_cache is not None:
        pos, neg = data.acts[data.is_tool], template_negative_rows(cache, negatives_cache)
        labels = torch.cat([torch.ones(len(pos), dtype=torch.bool), torch.zeros(len(neg), dtype=torch.bool)])
        template = rank_features(cc, torch.cat([pos, neg]), labels, encoding, negatives="template")
    rankings = Rankings(plain=rank_features(cc, data.acts, data.is_tool, encoding), template=template)
    if save:
        rankings.save(artifact_dir)
    return rankings


def summary(ranking: Ranking, n: int = 10) -> list[dict]:
    """The top tool-signed features of each partition, for reports and the CLI."""
    rows = []
    for part in ("a_exclusive", "b_exclusive", "shared"):
        for i in ranking.top("tool", part, n):
            rows.append(json.loads(ranking.stat(i).model_dump_json()))
    return rows
