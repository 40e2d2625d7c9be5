"""Dictionaries of one shape trained as one stack: one encoder product, one backward, gradients kept in place.

A sweep's runs often share a shape (``d_model``, ``dict_size``) and differ in k, partition,
penalties, learning rate or seed. Here their weights live in stacked tensors, one slice a
run: ``W_enc`` ``[R, 2, d, D]``, ``b_enc`` ``[R, D]``, ``W_dec`` ``[R, D, 2, d]``, ``b_dec``
``[R, 2, d]``. Each run keeps its own :class:`Crosscoder`, whose parameters are its slices,
and its own :class:`Trainer`: its Adam, clipping, masks, dead-feature window, log,
checkpoints and artifact are the ones it has when trained alone. One step of the stack:

1. every run's learning rate (its own warmup);
2. one batched product gives every run's pre-activations (the batch is shared);
3. each run's loss is :func:`objective.compute_loss` on its slice of them: its own top-k
   rule, partition, penalties and AuxK (one implementation of the loss);
4. one backward of the summed losses, whose sparse kernels write each run's weight
   gradients into its slice of buffers that last the whole pass;
5. each run's :meth:`Trainer.update`: masked gradients, clipping by its own norm, Adam,
   masks re-applied, dead-feature window.

Why buffers that last. At the demo's width (d = 576, D = 2304, batch 256, one thread) a
step of one dictionary took ~40 ms: the dense encoder product ~16 ms, Adam ~3.5 ms, and
much of the rest went on weight-sized gradients (10 MB each) that the sparse backward
allocated, zero-filled and copied into the parameter's layout afresh every step. Here the
same products write into the run's slices (the first product of a step overwrites, so
nothing is zero-filled), and the per-run Python work of the loss is all that is left
besides the arithmetic. The dense product and Adam are the same work as before: they
bound what stacking can gain (``benchmarks/bench_distributed.py`` prints it).

Exactness. Every run does the floating-point operations it does when trained alone, in
the same order; on one thread a stacked run ends bit for bit equal to the run trained by
``train`` (``tests/test_training.py``). With more threads the batched product may split
its work otherwise (not seen with two), and the weights would agree to float rounding.

What stacks: the joint or per-partition top-k on one process, runs that share the shape,
the number of steps and the step they resume at (:mod:`guardrail.training.multi` groups
them). BatchTopK and L1 (whose selection or loss this module does not handle) and runs on
several ranks train on their own :class:`Trainer`. A stack keeps its gradient
buffers between steps: one more copy of the weights than a run trained alone holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.autograd import Function

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.dictionary.sparse import Codes, select_linear, sparse_decode
from guardrail.training.config import TrainingConfig
from guardrail.training.data import TrainingData
from guardrail.training.objective import Kernels, StepResult, compute_loss
from guardrail.training.trainer import Trainer, new_crosscoder

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def stackable(config: CrosscoderConfig) -> bool:
    """Whether this module computes the run's step: the top-k rules (joint or per partition)."""
    return config.sparsity == "topk"


def _stack(ccs: list[Crosscoder]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Move the runs' parameters into stacked weights and give each a view of a stacked gradient buffer.

    Each crosscoder's parameters become its slices of the stack (same values, same order in
    ``parameters()``, contiguous, so Adam's fused kernel reads them in place), and their
    ``.grad`` slices of the buffers, which stay for the whole pass: autograd adds the
    biases' gradients into them, the kernels the weights'.
    """
    weights, grads = {}, {}
    for name in PARAMS:
        weights[name] = torch.stack([getattr(cc, name).detach() for cc in ccs])
        grads[name] = torch.zeros_like(weights[name])
        for r, cc in enumerate(ccs):
            param = nn.Parameter(weights[name][r])
            param.grad = grads[name][r]
            setattr(cc, name, param)
    return weights, grads


def unstack(cc: Crosscoder) -> Crosscoder:
    """Give ``cc`` parameters of its own (copies, no gradient), as a run trained alone has."""
    for name in PARAMS:
        setattr(cc, name, nn.Parameter(getattr(cc, name).detach().clone()))
    return cc


class _Sink:
    """A run's weight-gradient buffer for one step: the first product of the step overwrites it, later ones (AuxK's) add.

    Overwriting (``beta=0``) spares zero-filling the buffer and reading it back: at the
    demo's width the encoder's product took 2.5 ms against 4.0 ms after a zero fill.
    """

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf, self.fresh = buf, True

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.buf.addmm_(a, b, beta=0.0 if self.fresh else 1.0)
        self.fresh = False


class _Tap(Function):
    """Identity whose backward hands the gradient passing through to ``add`` first (a weight gradient's product into a sink)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, add: Callable[[torch.Tensor], None]):  # type: ignore[override]
        ctx.add = add
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        ctx.add(g.contiguous())
        return g, None


def _encode_into(sink: _Sink, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, codes: Codes) -> torch.Tensor:
    """``select_linear`` with the weight detached (autograd gets the bias's gradient); x^T·G goes into ``sink``."""
    return _Tap.apply(select_linear(x, W.detach(), b, pre, codes), lambda g: sink.add(x.t(), codes.csr(g)))


def _decode_into(sink: _Sink, vals: torch.Tensor, W: torch.Tensor, codes: Codes) -> torch.Tensor:
    """``sparse_decode`` with the weight detached (autograd gets the values' gradient); CSR(vals)^T·g goes into ``sink``."""
    v = vals.detach()
    return _Tap.apply(sparse_decode(vals, W.detach(), codes), lambda g: sink.add(codes.csr_t(v), g))


@dataclass
class _RunSinks:
    """Run r's weight-gradient sinks and the loss kernels that fill them."""

    enc: _Sink
    dec: _Sink

    @classmethod
    def of(cls, grads: dict[str, torch.Tensor], r: int) -> "_RunSinks":
        return cls(_Sink(grads["W_enc"][r].flatten(0, 1)), _Sink(grads["W_dec"][r].flatten(1)))

    def kernels(self) -> Kernels:
        return Kernels(encode=partial(_encode_into, self.enc), decode=partial(_decode_into, self.dec))

    def start_step(self) -> None:
        self.enc.fresh = self.dec.fresh = True


class StackedTrainer:
    """Runs of one shape stepping as one (the module docstring says how); ``trainers[r]`` is run r's own trainer."""

    def __init__(self, td: TrainingData, configs: list[CrosscoderConfig], trainings: list[TrainingConfig]) -> None:
        if trainings[0].threads:
            torch.set_num_threads(trainings[0].threads)
        ccs = [new_crosscoder(td, cfg, tc.seed) for cfg, tc in zip(configs, trainings)]
        if len({(cc.d_model, cc.dict_size) for cc in ccs}) != 1 or not all(stackable(cfg) for cfg in configs):
            raise ValueError("a stack holds top-k dictionaries of one shape (d_model, dict_size)")
        self.weights, self.grads = _stack(ccs)
        self.trainers = [Trainer(cc, td, tc) for cc, tc in zip(ccs, trainings)]
        self.sinks = [_RunSinks.of(self.grads, r) for r in range(len(ccs))]
        self.kernels = [sinks.kernels() for sinks in self.sinks]
        self._pre = torch.empty(0)

    def _preacts(self, xf: torch.Tensor) -> torch.Tensor:
        """Every run's encoder pre-activations [R, N, D] in one batched product, into a buffer that stays."""
        R, D = self.weights["b_enc"].shape
        if self._pre.shape != (R, xf.shape[0], D):
            self._pre = xf.new_empty(R, xf.shape[0], D)
        with torch.no_grad():
            return torch.baddbmm(self.weights["b_enc"].unsqueeze(1), xf.expand(R, *xf.shape), self.weights["W_enc"].flatten(1, 2), out=self._pre)

    def step(self, step: int, x: torch.Tensor) -> list[StepResult]:
        """Optimiser step ``step`` of every run on the batch ``x`` [N, 2, d]; one result per run."""
        lrs = [t.set_lr(step) for t in self.trainers]
        for name in ("b_enc", "b_dec"):  # autograd adds the biases' gradients; the weights' are overwritten
            self.grads[name].zero_()
        for sinks in self.sinks:
            sinks.start_step()
        pre = self._preacts(x.reshape(x.shape[0], -1))
        results = [compute_loss(t.cc, x, t.aux_dead, pre=pre[r], kernels=self.kernels[r]) for r, t in enumerate(self.trainers)]
        torch.stack([res.loss for res in results]).sum().backward()
        for t, res, lr in zip(self.trainers, results, lrs):
            t.update(res, lr)
        return results

    def release(self) -> None:
        """Hand every run its own tensors (the stack's are freed with it): for the finished runs' artifacts."""
        for t in self.trainers:
            unstack(t.cc)
            t.params = list(t.cc.parameters())
