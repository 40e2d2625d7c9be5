"""The training objective: reconstruction MSE + partition penalties + AuxK, on the sparse path.

Pre-activations are computed densely once without autograd; the sparsity rule picks the
active positions; only those positions enter autograd (``select_linear``) and the decoder
is a CSR matmul (``sparse_decode``). The value is the same function as the paper's dense
einsum loss (checked in tests); only the work on inactive features is skipped.

Those two products are the loss's :class:`Kernels`. A trainer that keeps its weight
gradients in buffers of its own (``guardrail.training.stacked``) passes kernels that add
into them, and so computes this same loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.dictionary.partition import PARTITION_MODELS, PARTITION_NAMES, Partition
from guardrail.dictionary.sparse import Codes, select_linear, serial, sparse_decode


@dataclass(frozen=True)
class Kernels:
    """The loss's two sparse products: encoder values at the active positions, and the decoder on them.

    ``encode(x, W, b, pre, codes)`` is differentiable ``(x @ W + b)[codes]`` given the
    detached ``pre``; ``decode(vals, W_dec, codes)`` is ``CSR(vals) @ W_dec``. The default
    pair (``guardrail.dictionary.sparse``) returns every gradient to autograd.
    """

    encode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Codes], torch.Tensor] = select_linear
    decode: Callable[[torch.Tensor, torch.Tensor, Codes], torch.Tensor] = sparse_decode


SPARSE = Kernels()


@dataclass
class StepResult:
    loss: torch.Tensor
    mse: torch.Tensor
    terms: dict[str, float]
    fired: torch.Tensor  # bool [D]: features active on at least one row
    min_active: float | None  # smallest selected positive activation (BatchTopK threshold update)


def _partition_sums(cc: Crosscoder, codes: Codes | None, vals: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of |f| per partition [3] (differentiable)."""
    if codes is None:  # dense f [N, D]
        return torch.zeros(3, dtype=vals.dtype, device=vals.device).index_add(0, labels, vals.abs().sum(0))
    return torch.zeros(3, dtype=vals.dtype, device=vals.device).index_add(0, labels[codes.cols], vals.abs())


def _penalty(cfg: CrosscoderConfig, part: Partition, sums: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, dict[str, float]]:
    n_a, n_b, n_s = part.n_a, part.n_b, part.n_shared
    zero = sums.new_zeros(())
    l1_shared = sums[2] / (n_rows * n_s) if n_s else zero
    if cfg.penalty_form == "paper":
        l1_excl = ((sums[0] + sums[2]) / (n_rows * (n_a + n_s)) + (sums[1] + sums[2]) / (n_rows * (n_b + n_s))) / 2
    else:
        l1_excl = (sums[0] + sums[1]) / (n_rows * (n_a + n_b)) if n_a + n_b else zero
    pen = cfg.lambda_shared * l1_shared + cfg.lambda_excl * l1_excl
    return pen, {"l1_shared": float(l1_shared.detach()), "l1_exclusive": float(l1_excl.detach())}


def _model_cols(part_name: str, d: int) -> slice:
    models = PARTITION_MODELS[part_name]
    return slice(models[0] * d, (models[-1] + 1) * d)


def _spread(e: torch.Tensor, rows: RowSplit | None) -> torch.Tensor:
    """Sum of squared deviations of ``e`` from its column means, over the whole batch (every rank's rows)."""
    if rows is None:
        return (e - e.mean(0)).pow(2).sum()
    e64 = e.double()
    n = rows.sum(e64.new_tensor(float(e.shape[0])))
    return (rows.sum(e64.pow(2).sum()) - rows.sum(e64.sum(0)).pow(2).sum() / n).to(e.dtype)


def auxk_loss(cc: Crosscoder, xf: torch.Tensor, W: torch.Tensor, pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor,
              rows: RowSplit | None = None, shard: FeatureSplit | None = None, kernels: Kernels = SPARSE) -> tuple[torch.Tensor, dict[str, float]]:
    """AuxK: the top ``k_aux`` dead features (per partition) reconstruct the detached residual error.

    The error is normalised by its spread over the whole batch; on a rank of a split batch
    the term is scaled by the world size, so that the gradient average DDP takes is the
    whole batch's gradient. On a rank holding a slice of the features the dead features are
    counted and chosen over every rank's slice, and their partial reconstructions summed.
    """
    aux_cfg, d = cc.config.aux_k, cc.d_model
    k_aux = aux_cfg.resolved_k_aux(d)
    Wd = cc.W_dec.reshape(cc.dict_size, -1)
    groups = [(name, cc.partition.range(name)) for name in PARTITION_NAMES] if aux_cfg.per_partition else [("all", range(cc.dict_size))]
    total = xf.new_zeros(())
    logs: dict[str, float] = {}
    for name, r in groups:  # on a feature slice r may be empty here and not on another rank: every rank goes through every group
        dead_r = dead[r.start : r.stop]
        n_dead = int(dead_r.sum()) if shard is None else int(shard.total(dead_r.sum().float()))
        if n_dead == 0:
            continue
        kk = min(k_aux, n_dead)
        cand = pre[:, r.start : r.stop].masked_fill(~dead_r, float("-inf"))
        if shard is None:
            codes = Codes.from_topk(cand.topk(kk, dim=-1, sorted=False).indices + r.start, cc.dict_size)
        else:
            codes = shard.top(cand, r.start, kk)
        vals = F.relu(kernels.encode(xf, W, cc.b_enc, pre, codes))
        e_hat = kernels.decode(vals, Wd, codes)
        e_hat = e_hat if shard is None else shard.total(e_hat)
        cols = _model_cols(name, d) if name != "all" else slice(None)
        e = err[:, cols]
        denom = _spread(e, rows)
        if float(denom) <= 0:
            continue
        part_loss = (e_hat[:, cols] - e).pow(2).sum() / denom * (rows.world_size if rows is not None else 1)
        total = total + part_loss
        logs[f"aux_{name}"] = float(part_loss.detach())
    return aux_cfg.coef * total, logs


class FeatureSplit(Protocol):
    """How a dictionary split over ranks by feature takes part in the loss (``guardrail.training.sharded``)."""

    partition: Partition  # the whole dictionary's, for the penalties' denominators

    def select(self, cc: Crosscoder, pre: torch.Tensor) -> Codes: ...  # this rank's share of the whole dictionary's top-k

    def top(self, cand: torch.Tensor, offset: int, k: int) -> Codes: ...  # the same for columns [offset, ...) of this slice

    def total(self, t: torch.Tensor) -> torch.Tensor: ...  # sum over ranks; the gradient passes through unchanged


class RowSplit(Protocol):
    """How a batch split over ranks by rows takes part in the loss (``guardrail.training.distributed.Comm``)."""

    world_size: int

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...  # sum over ranks (no gradient)

    def cat(self, t: torch.Tensor) -> torch.Tensor: ...  # every rank's ``t`` concatenated along dim 0


def _batchtopk_over_ranks(cc: Crosscoder, pre: torch.Tensor, rows: RowSplit) -> Codes:
    """BatchTopK's training rule on the whole batch: the cutoff is the (k x all rows)-th value over every rank's rows."""
    n_sel = min(int(cc.config.k or 0) * pre.shape[0], pre.numel()) * rows.world_size
    mine = pre.flatten().topk(min(n_sel, pre.numel()), sorted=False).values
    cutoff = rows.cat(mine).topk(n_sel, sorted=False).values.min()
    return Codes.from_mask((pre >= cutoff) & (pre > 0))


def _select(cc: Crosscoder, pre: torch.Tensor, shard: FeatureSplit | None, rows: RowSplit | None) -> Codes:
    if shard is not None:
        return shard.select(cc, pre)
    if rows is not None and cc.config.sparsity == "batchtopk":
        return _batchtopk_over_ranks(cc, pre, rows)
    return cc.select(pre, batch_rule=True)


def compute_loss(cc: Crosscoder, x: torch.Tensor, dead: torch.Tensor | None = None, shard: FeatureSplit | None = None,
                 rows: RowSplit | None = None, *, pre: torch.Tensor | None = None, kernels: Kernels = SPARSE) -> StepResult:
    """Loss of one normalised batch [N, 2, d]; ``dead`` (bool [D]) enables AuxK on those features.

    With ``shard``, ``cc`` holds one rank's slice of the features: the top-k is merged over
    ranks, and the partial reconstructions and partition sums are added up over them, so
    every rank computes the whole dictionary's loss. With ``rows``, ``x`` is one rank's
    slice of the batch: the terms that are not means over rows (BatchTopK's cutoff, AuxK's
    normaliser) are taken over the whole batch, so the gradients DDP averages are the
    whole batch's. ``pre`` is the batch's encoder pre-activations when the caller has them
    already (a stack of dictionaries computes all of theirs in one product).
    """
    cfg = cc.config
    n, D = x.shape[0], cc.dict_size
    xf = x.reshape(n, -1)
    W = cc.W_enc.reshape(-1, D)
    Wd = cc.W_dec.reshape(D, -1)
    labels = cc.partition.labels().to(x.device)
    if pre is None:
        with torch.no_grad():
            pre = torch.addmm(cc.b_enc, xf, W)
    min_active: float | None = None
    if cfg.sparsity == "l1":
        f = F.relu(torch.addmm(cc.b_enc, xf, W))
        x_hat = torch.addmm(cc.b_dec.reshape(-1), f, Wd)
        sums = _partition_sums(cc, None, f, labels)
        fired = (f > 0).any(0)
        l0_rows = (f > 0).sum(1).float()
        l0_part = torch.zeros(3, device=x.device).index_add(0, labels, (f > 0).float().sum(0)) / n
        norms = cc.W_dec.norm(dim=-1).sum(-1)  # [D]
        l1_weighted = (f * norms).sum(1).mean()
        extra = cfg.l1_coef * l1_weighted
        terms: dict[str, float] = {"l1_weighted": float(l1_weighted.detach())}
    else:
        codes = _select(cc, pre, shard, rows)
        vals = F.relu(kernels.encode(xf, W, cc.b_enc, pre, codes))
        partial = kernels.decode(vals, Wd, codes)
        x_hat = (partial if shard is None else shard.total(partial)) + cc.b_dec.reshape(-1)
        with serial():
            sums = _partition_sums(cc, codes, vals, labels)
            active = vals.detach() > 0
            fired = torch.zeros(D, dtype=torch.bool, device=x.device).index_fill_(0, codes.cols[active], True)
            l0_rows = torch.zeros(n, device=x.device).index_add(0, codes.rows, active.float())
            l0_part = torch.zeros(3, device=x.device).index_add(0, labels[codes.cols], active.float()) / n
            if active.any():
                min_active = float(vals.detach()[active].min())
        if shard is not None:
            sums, l0_rows, l0_part = shard.total(sums), shard.total(l0_rows), shard.total(l0_part)
        extra = x_hat.new_zeros(())
        terms = {}
    mse = F.mse_loss(x_hat, xf)
    pen, pen_terms = _penalty(cfg, shard.partition if shard is not None else cc.partition, sums, n)
    loss = mse + pen + extra
    terms.update(pen_terms)
    any_dead = dead is not None and (bool(dead.any()) if shard is None else float(shard.total(dead.any().float())) > 0)
    if any_dead and cfg.aux_k.enabled and cfg.aux_k.coef > 0 and cfg.sparsity != "l1":
        aux, aux_terms = auxk_loss(cc, xf, W, pre, (xf - x_hat).detach(), dead, rows, shard, kernels)
        loss = loss + aux
        terms.update(aux_terms)
        terms["aux"] = float(aux.detach())
    terms.update({"loss": float(loss.detach()), "mse": float(mse.detach()), "l0": float(l0_rows.mean())})
    for i, name in enumerate(PARTITION_NAMES):
        terms[f"l0_{name}"] = float(l0_part[i])
    return StepResult(loss=loss, mse=mse, terms=terms, fired=fired, min_active=min_active)
