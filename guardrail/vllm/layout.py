"""Where each request sits in vLLM's flattened batch, and what each of its tokens is.

vLLM flattens every scheduled request's tokens into one ``[num_tokens, d]`` tensor. A token
is a prompt token when its position is below the request's prompt length, and the last
prompt token when it equals prompt length − 1: positions, not phases, decide, so chunked
prefill and preemption-recompute see the same tokens as one prefill. What a request reads
arrives the same way, in pieces tagged with positions (:class:`ReadRows`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from guardrail.policy.engine import TokenPositions

_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(req_id: str) -> str:
    """The id the caller sees: vLLM appends ``-xxxxxxxx`` to make internal ids unique."""
    return _SUFFIX.sub("", str(req_id))


def batch_layout(runner: Any) -> tuple[list[str], list[int]]:
    """Request ids of the running batch and their token boundaries in the flattened batch.

    ``query_start_loc`` (from the attention metadata of this forward pass, else the runner's
    buffer) says where each request's tokens start.
    """
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    qsl = None
    try:
        from vllm.forward_context import get_forward_context

        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            meta = meta[0] if meta else None
        if isinstance(meta, dict) and meta:
            m = next(iter(meta.values()))
            q = getattr(m, "query_start_loc_cpu", None)
            if q is None:
                q = getattr(m, "query_start_loc", None)
            if q is not None:
                qsl = q.tolist()[: num_reqs + 1]
    except Exception:  # noqa: BLE001 - fall back to the runner's buffer
        qsl = None
    if qsl is None or len(qsl) != num_reqs + 1:
        qsl = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
    return req_ids, [int(v) for v in qsl]


def flat_positions(positions: torch.Tensor) -> torch.Tensor:
    """Each flattened token's position (the first row of multi-dimensional rope positions)."""
    return positions.reshape(-1) if positions.dim() == 1 else positions[0]


def token_positions(runner: Any, req_idx: list[int], req_ids: list[str], qsl: list[int], positions: torch.Tensor,
                    skip: dict | None = None) -> tuple[torch.Tensor, TokenPositions]:
    """Rows of the flat batch that belong to ``req_idx`` and their position facts.

    Built with a handful of tensor ops whatever the batch size: at decode this runs
    once per step for every request in the batch. Requests in ``skip`` get no rows.
    """
    ids = [req_ids[i] for i in req_idx]
    keep = [(j, i) for j, i in enumerate(req_idx) if not (skip and req_ids[i] in skip) and qsl[i + 1] > qsl[i]]
    if not keep:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, TokenPositions(empty.bool(), empty.bool(), empty, empty, ids)
    starts = torch.tensor([qsl[i] for _, i in keep])
    lens = torch.tensor([qsl[i + 1] - qsl[i] for _, i in keep])
    n_prompt = torch.tensor([int(runner.requests[req_ids[i]].num_prompt_tokens) for _, i in keep])
    offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    rows = torch.repeat_interleave(starts, lens) + offsets
    pos_all = flat_positions(positions)
    pos = pos_all[rows.to(pos_all.device)].long().cpu()
    n_prompt = torch.repeat_interleave(n_prompt, lens)
    req = torch.repeat_interleave(torch.tensor([j for j, _ in keep]), lens)
    return rows, TokenPositions(pos < n_prompt, pos == n_prompt - 1, req, pos, ids)


@dataclass(frozen=True)
class ReadRows:
    """Residual rows one request kept (``guardrail_read``), each with its position in the prompt."""

    position: torch.Tensor  # long [n], ascending
    rows: torch.Tensor  # [n, d]

    @classmethod
    def joined(cls, pieces: list["ReadRows"]) -> "ReadRows":
        """One request's pieces in position order, each position once.

        Chunked prefill runs a long prompt over several steps, so its rows arrive in pieces;
        a request preempted and recomputed sends positions again (the later copy is kept:
        both hold the same values).
        """
        position = torch.cat([p.position for p in pieces])
        rows = torch.cat([p.rows for p in pieces])
        latest = {int(q): i for i, q in enumerate(position.tolist())}
        keep = torch.tensor([latest[q] for q in sorted(latest)], dtype=torch.long)
        return cls(position[keep], rows[keep])
