"""Training input: an activation cache, paired activations, or a raw [N, 2, d] tensor.

Everything becomes one normalised in-memory tensor plus the statistics used (stored in the
crosscoder and its manifest), a data hash, and a seeded batch order that depends only on
(seed, step) — so a resumed run draws exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class TrainingData:
    x: torch.Tensor  # normalised [N, 2, d]
    mean: torch.Tensor  # [2, d]
    std: torch.Tensor  # [2, d]
    data_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    stats_source: str = "training data"

    @property
    def d_model(self) -> int:
        return self.x.shape[-1]


def _tensor_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(t.shape)).encode())
    flat = t.detach().cpu().contiguous().view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].numpy().tobytes())
    return h.hexdigest()


def _channel_stats(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = acts.double()
    return a.mean(0).float(), a.std(0).clamp(min=1e-6).float()


def _cache_meta(manifest: Any) -> dict[str, Any]:
    meta = {}
    for key in ("model_a", "model_b", "layer", "positions", "d_model"):
        val = getattr(manifest, key, None)
        if val is not None:
            meta[key] = val
    return meta


def prepare_data(
    data: Any,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    max_norm_ratio: float | None = None,
) -> TrainingData:
    """Normalise ``data`` per channel; stats come from ``mean``/``std``, else the cache, else the data.

    ``max_norm_ratio`` leaves out rows above that many times the median norm
    (:func:`guardrail.activations.cache.outlier_rows`: attention sinks) before anything else,
    so a cache's own statistics, which include them, are recomputed from the rows kept.
    """
    if isinstance(data, TrainingData):
        if mean is not None or std is not None:
            raise ValueError("data is already normalised (TrainingData); do not pass mean/std again")
        applied = data.meta.get("max_norm_ratio")
        if max_norm_ratio != applied:
            raise ValueError(f"data is already normalised (TrainingData) with max_norm_ratio={applied}: its rows cannot be filtered by "
                             f"max_norm_ratio={max_norm_ratio} now; pass the cache or the raw activations")
        return data
    meta: dict[str, Any] = {}
    data_hash: str | None = None
    source = "training data"
    if isinstance(data, (str, Path)):
        from guardrail.activations import ActivationCache

        data = ActivationCache.open(data)
    if hasattr(data, "load") and hasattr(data, "stats"):  # an ActivationCache
        manifest = getattr(data, "manifest", None)
        meta = _cache_meta(manifest)
        data_hash = getattr(manifest, "data_hash", None)
        if mean is None and std is None:
            mean, std = data.stats
            source = "activation cache statistics"
        data = data.load()
    acts = data.acts if hasattr(data, "acts") else data
    if not isinstance(acts, torch.Tensor) or acts.dim() != 3 or acts.shape[1] != 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"training data must be paired activations [N, 2, d], got {shape}")
    if acts.shape[0] == 0:
        raise ValueError("training data is empty")
    acts = acts.float()
    if not bool(torch.isfinite(acts).all()):
        raise ValueError("training data contains NaN or inf")
    if max_norm_ratio is not None:
        acts, meta["outlier_rows_dropped"] = _without_outliers(acts, max_norm_ratio)
        meta["max_norm_ratio"] = max_norm_ratio
        if source == "activation cache statistics":
            mean = std = None
            source = "training data"
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is None:
        mean, std = _channel_stats(acts)
    elif source == "training data":
        source = "provided"
    mean, std = mean.float(), std.float()
    if mean.shape != acts.shape[1:] or std.shape != acts.shape[1:]:
        raise ValueError(f"stats must be {tuple(acts.shape[1:])}, got mean {tuple(mean.shape)}, std {tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise ValueError("normalisation std must be positive everywhere")
    if data_hash is None:
        data_hash = _tensor_hash(acts)
    else:
        data_hash = hashlib.sha256(f"{data_hash}:{acts.shape[0]}".encode()).hexdigest()
    x = (acts - mean) / std
    return TrainingData(x=x, mean=mean, std=std, data_hash=data_hash, meta=meta, stats_source=source)


def _without_outliers(acts: torch.Tensor, max_norm_ratio: float) -> tuple[torch.Tensor, int]:
    from guardrail.activations.cache import outlier_rows

    out = outlier_rows(acts, max_norm_ratio)
    if bool(out.all()):
        raise ValueError(f"every training row is above {max_norm_ratio:g}× the median norm")
    return acts[~out], int(out.sum())


def split_rows(n: int, eval_fraction: float, eval_max_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, eval rows); with too little data the eval rows are a sample of the training rows."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    n_eval = min(int(n * eval_fraction), eval_max_rows)
    if n_eval < 32 or n - n_eval < 32:
        return perm.sort().values, perm[: min(n, eval_max_rows)].sort().values
    return perm[n_eval:].sort().values, perm[:n_eval].sort().values


class BatchOrder:
    """Batch ``s`` is rows ``[s*B, (s+1)*B)`` of the concatenation of per-epoch seeded shuffles."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self._cached: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, self.rows[torch.randperm(len(self.rows), generator=g)])
        return self._cached[1]

    def batch(self, step: int) -> torch.Tensor:
        n = len(self.rows)
        start, end = step * self.batch_size, (step + 1) * self.batch_size
        out = []
        while start < end:
            epoch, off = divmod(start, n)
            take = min(end - start, n - off)
            out.append(self._perm(epoch)[off : off + take])
            start += take
        return torch.cat(out)
