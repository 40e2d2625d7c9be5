"""Crosscoder training speed: guardrail's trainer vs the paper's dense einsum DFC step.

Both train the same DFC (5% exclusive per model) with the same loss (MSE + lambda_sh *
mean|f_shared| + lambda_excl * mean|f_exclusive|), Adam, clip 1.0 and masks re-applied after
every step. The dense baseline is the paper's loop (masked einsum encode, per-sample top-k,
dense einsum decode, torch.optim.Adam with defaults); a second baseline gives it the fused
Adam kernel our trainer uses, to separate the optimiser gain from the sparse-path gain.
Ours encodes densely, then backpropagates through only the k active positions per sample
and decodes with a CSR matmul (guardrail.dictionary.sparse).

Steps alternate one by one (dense, ours, dense+fused, dense, ours, ...) so that load from
other processes hits all alike; medians of per-step times and of per-round ratios are
reported.

    python benchmarks/bench_training.py [--d 576] [--dict-size 4096] [--k 32] [--batch 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from guardrail.dictionary import DFCConfig
from guardrail.training import TrainingConfig
from guardrail.training.trainer import build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test oracles
from oracles.paper_dfc import PaperDFC, dense_train_step  # noqa: E402


def dense_stepper(x: torch.Tensor, cfg, batch: int, fused: bool) -> Callable[[int], None]:
    p = cfg.partition
    model = PaperDFC(x.shape[-1], cfg.dict_size, cfg.k, p.n_a, p.n_b)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    g = torch.Generator().manual_seed(0)
    xn = (x - x.mean(0)) / x.std(0)

    def step(_: int) -> None:
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        dense_train_step(model, opt, xn[idx], cfg.lambda_shared, cfg.lambda_excl)

    return step


def ours_stepper(x: torch.Tensor, cfg, batch: int) -> Callable[[int], None]:
    tc = TrainingConfig(steps=10**6, batch_size=batch, lr=1e-4, progress=False, eval_fraction=0.0)
    trainer = build_trainer(x, cfg, tc)
    return trainer.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--dict-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(8 * args.batch, 2, args.d)
    cfg = DFCConfig(dict_size=args.dict_size, k=args.k, exclusive=0.05, lambda_shared=1e-3, lambda_excl=1e-3)
    impls = {
        "dense einsum, torch Adam (paper)": dense_stepper(x, cfg, args.batch, fused=False),
        "guardrail trainer": ours_stepper(x, cfg, args.batch),
        "dense einsum, fused Adam": dense_stepper(x, cfg, args.batch, fused=True),
    }
    print(f"d={args.d} per model, D={args.dict_size}, k={args.k}, batch={args.batch}, threads={args.threads}, "
          f"{args.steps} timed steps each, interleaved")
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(args.steps + 2):
        for name, step in impls.items():
            t0 = time.perf_counter()
            step(i)
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    names = list(impls)
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:34s}: {1 / med:6.2f} steps/s  ({1000 * med:7.1f} ms/step, median)")
    ours = times["guardrail trainer"]
    for base in (names[0], names[2]):
        paired = statistics.median(b / o for b, o in zip(times[base], ours))
        print(f"speed-up vs {base:34s}: {statistics.median(times[base]) / statistics.median(ours):.2f}x "
              f"(median of per-round ratios {paired:.2f}x)")
    print("target: >= 1.5x vs the paper's loop")


if __name__ == "__main__":
    main()
