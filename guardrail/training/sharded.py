"""A dictionary too large for one device: its features split over the ranks.

Each rank holds one contiguous slice of the features, ``[lo, hi)``: its encoder columns,
encoder biases and decoder rows. The decoder bias is whole on every rank, and so is the
batch. A slice of a DFC is itself a DFC, because slicing keeps the partition's order
(A-exclusive, B-exclusive, shared). So each rank's masks, and the zeroing of their
gradients, run unchanged on its slice.

One step goes like this. Each rank computes its pre-activations and its own top-k. The
k best of all ranks' candidates are chosen: every rank gathers k values and indices per row
from every rank. Each rank decodes the chosen features it holds, and the partial
reconstructions are summed over ranks (:class:`_SumOverRanks`), as are the partition sums
of the penalties. Every rank then has the whole dictionary's loss. Its gradient on the
rank's own slice is exact, and the decoder bias gets the same gradient everywhere.
Gradient clipping uses the norm over all slices.

Checkpoints and the artifact hold the whole dictionary in the format of an unsharded run.
Every rank takes part in gathering them; rank 0 writes them. Each rank resumes by slicing
the whole checkpoint.

AuxK revival works the same way: dead features are counted over every rank, and the top
``k_aux`` of them are chosen across ranks. Limits, checked at the start: only the joint
top-k (not BatchTopK, L1 or the per-partition top-k), and ``dict_size`` must divide evenly
by the world size. The
initialisation is drawn whole (then sliced), so that it equals a single process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.dictionary.partition import Partition
from guardrail.dictionary.sparse import Codes
from guardrail.training.checkpoint import optimizer_tensors, save_checkpoint
from guardrail.training.config import TrainingConfig
from guardrail.training.data import TrainingData
from guardrail.training.distributed import Comm
from guardrail.training.objective import StepResult, compute_loss
from guardrail.training.trainer import Trainer, _checkpoint_meta, _State, load_state, read_checkpoint

FEATURE_DIM = {"W_enc": 2, "b_enc": 0, "W_dec": 0, "threshold": 0}  # the rest (b_dec, normalisation) is whole on every rank


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose gradient is the identity: every rank computes the same loss from the sum."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def _overlap(a: range, b: range) -> int:
    return max(0, min(a.stop, b.stop) - max(a.start, b.start))


@dataclass
class FeatureShard:
    """This rank's features ``[lo, hi)`` of a dictionary of ``partition.dict_size`` and how they meet the others'."""

    comm: Comm
    lo: int
    hi: int
    k: int
    partition: Partition

    @classmethod
    def of(cls, cfg: CrosscoderConfig, comm: Comm) -> "FeatureShard":
        check_shardable(cfg, comm.world_size)
        size = cfg.dict_size // comm.world_size
        return cls(comm, comm.rank * size, (comm.rank + 1) * size, int(cfg.k or 0), cfg.resolved_partition())

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def local_config(self, cfg: CrosscoderConfig) -> CrosscoderConfig:
        """The config of this rank's slice: its own sizes and the slice of the partition."""
        p, mine = self.partition, range(self.lo, self.hi)
        local = Partition(dict_size=self.size, n_a=_overlap(mine, p.a_exclusive), n_b=_overlap(mine, p.b_exclusive))
        return cfg.model_copy(update={"dict_size": self.size, "k": min(self.k, self.size), "partition": local if cfg.partition else None})

    def select(self, cc: Crosscoder, pre: torch.Tensor) -> Codes:
        """This rank's part of the whole dictionary's per-row top-k."""
        return self.top(pre, 0, self.k)

    def top(self, cand: torch.Tensor, offset: int, k: int) -> Codes:
        """This rank's part of the per-row top-``k`` over every rank's ``cand`` (columns ``offset...`` of each slice).

        Each rank offers its own best ``k`` (padded with -inf where its slice has fewer), so
        the gathered candidates always hold the whole top-k.
        """
        n, width = cand.shape
        vals, idx = cand.topk(min(k, width), dim=-1, sorted=False)
        ids = idx + offset + self.lo
        if vals.shape[1] < k:
            pad = k - vals.shape[1]
            vals = torch.cat([vals, vals.new_full((n, pad), float("-inf"))], dim=1)
            ids = torch.cat([ids, ids.new_full((n, pad), -1)], dim=1)
        all_vals, all_ids = self.gather(vals, 1), self.gather(ids, 1)
        best = all_vals.topk(k, dim=-1, sorted=False)
        chosen = all_ids.gather(1, best.indices)  # [N, k] feature ids of the whole dictionary
        mine = (chosen >= self.lo) & (chosen < self.hi) & torch.isfinite(best.values)
        mask = torch.zeros(n, self.size, dtype=torch.bool, device=cand.device)
        rows = torch.arange(n, device=cand.device).unsqueeze(1).expand_as(chosen)
        mask[rows[mine], chosen[mine] - self.lo] = True
        return Codes.from_mask(mask)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(t)

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim``, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.comm.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    def piece(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.narrow(dim, self.lo, self.size).clone()


def check_shardable(cfg: CrosscoderConfig, world_size: int) -> None:
    """Refuse what the feature-sharded step does not compute (yet), naming it."""
    problems = []
    if cfg.sparsity != "topk" or cfg.k_exclusive is not None:
        problems.append(f"sparsity={cfg.sparsity!r}{' with k_exclusive' if cfg.k_exclusive is not None else ''} (only the joint top-k merges over ranks)")
    if cfg.dict_size % world_size:
        problems.append(f"dict_size {cfg.dict_size} does not divide by the world size {world_size}")
    if problems:
        raise ValueError("a feature-sharded dictionary does not support " + "; ".join(problems))


def _param_dims(cc: Crosscoder) -> list[int | None]:
    """The feature axis of each parameter in optimiser order (None: whole on every rank)."""
    return [FEATURE_DIM.get(name) for name, _ in cc.named_parameters()]


class ShardedTrainer(Trainer):
    """The trainer of one rank's feature slice: the same step, loss and bookkeeping, with the slice's collectives."""

    splits_batch = False  # every rank reads every whole batch

    def __init__(self, whole: Crosscoder, td: TrainingData, tc: TrainingConfig, comm: Comm) -> None:
        self.whole_config = whole.config
        self.shard = FeatureShard.of(whole.config, comm)
        local = Crosscoder(self.shard.local_config(whole.config), seed=None)
        local.load_state_dict(self._slice_model(whole.state_dict()))
        super().__init__(local, td, tc, comm)

    def _slice_model(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.shard.piece(v, FEATURE_DIM[k]) if k in FEATURE_DIM else v.clone() for k, v in sd.items()}

    def _make_objective(self) -> Callable[[torch.Tensor, torch.Tensor | None], StepResult]:
        return lambda x, dead: compute_loss(self.cc, x, dead, self.shard)

    def batch(self, step: int) -> torch.Tensor:
        return self.td.x[self.order.batch(step)].to(self.comm.device)  # every rank reads the whole batch

    def _fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        return fired  # each rank counts its own features

    def _clip(self, max_norm: float) -> None:
        """``clip_grad_norm_`` over the whole dictionary: slices' squared norms summed over ranks, the bias once."""
        sliced, whole = [], []
        for (name, p) in self.cc.named_parameters():
            if p.grad is not None:
                (sliced if name in FEATURE_DIM else whole).append(p.grad)
        sq = torch.stack([g.pow(2).sum() for g in sliced]).sum()
        dist.all_reduce(sq)
        sq = sq + torch.stack([g.pow(2).sum() for g in whole]).sum()
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g in sliced + whole:
            g.mul_(coef)

    # ── the whole dictionary: results and checkpoints ──────────────────────

    def _whole_model(self) -> dict[str, torch.Tensor]:
        return {k: self.shard.gather(v, FEATURE_DIM[k]) if k in FEATURE_DIM else v for k, v in self.cc.state_dict().items()}

    def _whole_tensors(self) -> tuple[dict[str, torch.Tensor], list]:
        tensors = {f"model.{k}": v.cpu() for k, v in self._whole_model().items()}
        opt_t, groups = optimizer_tensors(self.opt)
        dims = _param_dims(self.cc)
        for name, t in opt_t.items():
            dim = dims[int(name.split(".")[1])]
            tensors[name] = self.shard.gather(t, dim) if dim is not None and t.dim() > 0 else t
        tensors["state.steps_since_fired"] = self.shard.gather(self.state.steps_since_fired, 0).cpu()
        return tensors, groups

    def result(self) -> tuple[Crosscoder, _State]:
        whole = Crosscoder(self.whole_config, seed=None)
        whole.load_state_dict({k: v.cpu() for k, v in self._whole_model().items()})
        state = _State(whole.dict_size)
        state.steps_since_fired = self.shard.gather(self.state.steps_since_fired, 0).cpu()
        state.threshold_set, state.history = self.state.threshold_set, self.state.history
        return whole, state

    def provenance(self) -> dict[str, Any]:
        return {"world_size": self.comm.world_size, "feature_shards": self.comm.world_size}

    def save(self, folder: Path, step: int) -> None:
        tensors, groups = self._whole_tensors()  # a collective: every rank gathers
        if self.comm.is_main:
            save_checkpoint(folder, step, tensors, _checkpoint_meta(self.whole_config, self.tc, self.td, self.state, groups))
        self.comm.barrier()

    def resume(self, folder: Path) -> int:
        found = read_checkpoint(folder, self.whole_config, self.tc, self.td)
        start = 0 if found is None else load_state(self._slice_checkpoint(found[0]), found[1], self.cc, self.opt, self.state)
        if self.comm.broadcast(start) != start:
            raise RuntimeError(f"rank {self.comm.rank} found another checkpoint in {folder} than rank 0")
        return start

    def _slice_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dims = _param_dims(self.cc)
        out = {}
        for name, t in tensors.items():
            if name.startswith("model."):
                key = name[len("model.") :]
                out[name] = self.shard.piece(t, FEATURE_DIM[key]) if key in FEATURE_DIM else t
            elif name.startswith("opt."):
                dim = dims[int(name.split(".")[1])]
                out[name] = self.shard.piece(t, dim) if dim is not None and t.dim() > 0 else t
            else:  # state.steps_since_fired
                out[name] = self.shard.piece(t, 0)
        return out
