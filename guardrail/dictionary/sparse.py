"""Sparse codes and the sparse encoder/decoder kernels the trainer uses.

Only ``k`` of ``D`` features are active per sample, so a dense decoder (``f @ W_dec``) and
the dense backward of the encoder (``x^T @ grad_pre``) spend almost all their work on zeros.
Here the active set is held as a CSR pattern (``Codes``); the decoder forward is a CSR
matmul, the backward passes use the sampled product for the value gradients and the
transposed CSR matmul for the weight gradients. ``tests/test_dictionary.py`` checks the
gradients against the dense einsum implementation.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.autograd import Function



@contextmanager
def serial() -> Iterator[None]:
    """Run index bookkeeping (sorts, gathers over ~N*k elements) on one thread.

    These ops are too small to gain from a second thread, and on a loaded machine each
    parallel region waits for its slowest thread: a stable argsort of 32k indices took
    0.8 ms on one thread and 270 ms on two here.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta": the ops used here are tested
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


@dataclass
class Codes:
    """Positions of the active features of a batch: row-major, columns sorted within a row."""

    rows: torch.Tensor  # long [M]
    cols: torch.Tensor  # long [M]
    crow: torch.Tensor  # long [N + 1] CSR row pointers
    n_rows: int
    n_cols: int
    _t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    @classmethod
    def from_topk(cls, idx: torch.Tensor, n_cols: int) -> "Codes":
        """Codes from a [N, k] index matrix (row-major; columns need not be sorted for these kernels)."""
        n, k = idx.shape
        with serial():
            rows = torch.arange(n, device=idx.device).repeat_interleave(k)
            crow = torch.arange(0, n * k + 1, k, device=idx.device)
            return cls(rows, idx.reshape(-1).contiguous(), crow, n, n_cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Codes":
        """Codes from a dense bool [N, D] mask (row-major order, sorted columns)."""
        rows, cols = mask.nonzero(as_tuple=True)
        n = mask.shape[0]
        with serial():
            counts = torch.bincount(rows, minlength=n)
            crow = torch.zeros(n + 1, dtype=torch.long, device=mask.device)
            crow[1:] = counts.cumsum(0)
        return cls(rows, cols, crow, n, mask.shape[1])

    def flat(self) -> torch.Tensor:
        """Positions as indices into the flattened [N, D] matrix."""
        return self.rows * self.n_cols + self.cols

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Values of a dense [N, D] tensor at these positions."""
        with serial():
            return dense.reshape(-1).index_select(0, self.flat())

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """[N, D] CSR tensor with these positions and ``values``."""
        return _csr(self.crow, self.cols, values, (self.n_rows, self.n_cols))

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ccol [D + 1], row indices [M], permutation [M]) of the transposed pattern."""
        if self._t is None:
            with serial():
                perm = torch.argsort(self.cols, stable=True)
                ccol = torch.zeros(self.n_cols + 1, dtype=torch.long, device=self.cols.device)
                ccol[1:] = torch.bincount(self.cols, minlength=self.n_cols).cumsum(0)
                self._t = (ccol, self.rows[perm], perm)
        return self._t

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """[D, N] CSR tensor of the transposed pattern holding ``values`` (given in row order)."""
        ccol, trows, perm = self.transposed()
        with serial():
            permuted = values[perm]
        return _csr(ccol, trows, permuted, (self.n_cols, self.n_rows))

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n_rows * self.n_cols, dtype=values.dtype, device=values.device)
        return out.index_put((self.flat(),), values).reshape(self.n_rows, self.n_cols)


class _SelectLinear(Function):
    """Values of ``x @ W + b`` at the active positions; the backward touches only them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, codes: Codes):  # type: ignore[override]
        ctx.save_for_backward(x, W)
        ctx.codes = codes
        return codes.gather(pre)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, W = ctx.saved_tensors
        codes: Codes = ctx.codes
        g = g.contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = codes.csr(g) @ W.t()
        if ctx.needs_input_grad[1]:
            grad_W = (codes.csr_t(g) @ x).t()
        if ctx.needs_input_grad[2]:
            with serial():
                grad_b = torch.zeros(codes.n_cols, dtype=g.dtype, device=g.device).index_add_(0, codes.cols, g)
        return grad_x, grad_W, grad_b, None, None


class _SparseDecode(Function):
    """``out[n] = sum_j vals[n, j] * W[cols[n, j]]`` for a CSR pattern."""

    @staticmethod
    def forward(ctx, vals: torch.Tensor, W: torch.Tensor, codes: Codes):  # type: ignore[override]
        ctx.save_for_backward(vals, W)
        ctx.codes = codes
        return codes.csr(vals) @ W

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        vals, W = ctx.saved_tensors
        codes: Codes = ctx.codes
        g = g.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern = codes.csr(torch.zeros_like(vals))
            grad_vals = torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_W = codes.csr_t(vals) @ g
        return grad_vals, grad_W, None


def select_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, codes: Codes) -> torch.Tensor:
    """Differentiable ``(x @ W + b)[codes]`` given the precomputed (detached) ``pre``."""
    return _SelectLinear.apply(x, W, b, pre, codes)


def sparse_decode(vals: torch.Tensor, W: torch.Tensor, codes: Codes) -> torch.Tensor:
    """Differentiable CSR(vals) @ W: [N, D] sparse times [D, K] -> [N, K]."""
    return _SparseDecode.apply(vals, W, codes)
