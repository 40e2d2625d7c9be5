"""Process groups for multi-process training: which rank this is, its device, how ranks agree.

A run started by ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1) trains
data-parallel: every rank holds the whole dictionary, reads its slice of each global batch,
and DistributedDataParallel averages the gradients, so every rank takes the same optimiser
step. What the trainer changes outside the gradient (dead-feature counters, the BatchTopK
threshold) is reduced here so that it stays identical on every rank too. Rank 0 alone writes
checkpoints and the artifact.

The backend follows the device: NCCL when the rank has a CUDA device, gloo on CPU. A process
group created elsewhere (a test spawning its own ranks, a larger program) is used as it is
and left open; one created here is closed by :meth:`Comm.close`.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def launched() -> bool:
    """True when this process is one of several ranks: an open process group, or a launcher's WORLD_SIZE > 1.

    torchrun sets WORLD_SIZE (``torch.distributed.is_torchelastic_launched()`` is true under it
    even for one process, which needs no process group).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a launch, or a process not launched as one of several: the one that reports."""
    return os.environ.get("RANK", "0") == "0"


def _device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class Comm:
    """This process's place in the run; a world of one does no communication at all."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (equal slices: the batch size must divide)."""
        if not self.distributed:
            return rows
        n = len(rows) // self.world_size
        return rows[self.rank * n : (self.rank + 1) * n]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {self.world_size} (each rank takes an equal slice)")

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around ``module`` when distributed: gradients are averaged during backward.

        Buffers are not re-broadcast each step: the trainer keeps them identical itself.
        """
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:  # newer torch: broadcast_buffers is deprecated
            return ddp(module, device_ids=ids, forward_sync_buffers=False)
        return ddp(module, device_ids=ids, broadcast_buffers=False)

    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over ranks (a feature fired if it fired on any rank)."""
        if not self.distributed:
            return mask
        t = mask.to(torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.bool()

    def min(self, value: float | None) -> float | None:
        """Smallest value over ranks; None where a rank has none."""
        if not self.distributed:
            return value
        t = torch.tensor([float("inf") if value is None else value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        v = float(t)
        return None if v == float("inf") else v

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (a new tensor; no gradient flows through it)."""
        if not self.distributed:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) concatenated along dim 0, in rank order."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def mean_terms(self, terms: dict[str, float]) -> dict[str, float]:
        """Loss terms averaged over ranks, for the log (a term missing on a rank is averaged over the others)."""
        if not self.distributed:
            return terms
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, terms)
        keys = dict.fromkeys(k for g in gathered for k in g)
        return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self, barrier: bool = True) -> None:
        """Leave the process group if this module created it; after a barrier unless the run failed
        (a failed rank must not wait for ranks the launcher is about to stop)."""
        if self.owns_group and dist.is_initialized():
            if barrier:
                dist.barrier()
            # A DDP reducer freed after its group is destroyed can wait forever on a peer that has exited (seen with gloo).
            gc.collect()
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


LOCAL = Comm()


def setup(distributed: bool | None = None) -> Comm:
    """The communicator of this process: from an open process group, from the launcher's environment, or local.

    ``distributed=False`` forces a single process even under a launcher; None detects it.
    """
    if distributed is False or not (distributed or launched()):
        return Comm()
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    owns = False
    device = _device_for_rank()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    elif dist.get_backend() != "nccl":
        device = torch.device("cpu")
    return Comm(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)
