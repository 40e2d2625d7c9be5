"""Sweep and multi-rank training speed: one pass (stacked and not) vs one by one, and 1 vs 2 ranks on the CPU.

Part 1 trains the eval harness's quick grid (6 dictionaries, scaled to d = 576 per model as
the demo's: D = 2304, k = 13 and 25) on synthetic activations four ways and prints them side
by side: ``run_sweep`` in one pass with its runs stacked (the default: the six share one
shape, so they take every step as one stack, ``guardrail.training.stacked``), one pass with
each run stepping on its own trainer (``stack=False``: what a pass did before stacks),
``run_sweep(one_pass=False)`` in this process, and one ``guardrail train``-like process per
run (each loads the data, computes its statistics and hash, imports torch). It checks that
the artifacts of both one-pass modes equal the one-by-one ones. A pass shares the data, its
normalisation and the batch gather; a stack also writes every gradient into buffers that
last and runs one encoder product for all. The dense encoder product and Adam are each
run's own work whichever way: they bound the gain.

Part 2 trains one of those dictionaries for the same steps on 1 rank and on 2 gloo ranks
(each rank half of every batch). Two ranks on a 2-core machine share the cores the single
process uses with two threads, so scaling shows only on more cores or GPUs.

On a machine shared with other work, wall times drift with the neighbours' load: the modes
run in interleaved rounds, each shown at its best round, beside the CPU seconds spent.
Seen (defaults: 600 steps, one thread, 2 cores shared with a vLLM generation job): stacked
127 s, each run its own step 152 s, one by one 152 s (1.20x; CPU 1.21x), one process per
run 208 s; both passes' weights equal the one-by-one ones to the bit. Per dictionary step
that is 35 against 42 ms, of which the encoder product takes ~16 and Adam ~3.5.

    python benchmarks/bench_distributed.py [--steps 600] [--rows 8192] [--rank-steps 100] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guardrail.dictionary import load_artifact
from guardrail.eval.grids import grid_for
from guardrail.training.sweep import Grid, expand_grid, run_sweep
from guardrail.training.trainer import build_trainer

D_MODEL = 576  # the demo's pair (SmolLM2-135M)

ONE_RUN = """
import sys, time, torch
from guardrail.eval.grids import grid_for
from guardrail.training import train
from guardrail.training.sweep import expand_grid
torch.set_num_threads({threads})
spec = next(s for s in expand_grid(grid_for("quick", {d})) if s.name == sys.argv[2])
tc = spec.training.model_copy(update={{"steps": {steps}, "checkpoint_every": 0, "progress": False}})
train(torch.load(sys.argv[1], weights_only=True), spec.crosscoder, sys.argv[3], training=tc)
"""


def _data(rows: int, d: int) -> torch.Tensor:
    """Correlated pair activations: B = a shared signal, A = B plus its own part (enough structure to train on)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, d, generator=g) * 2 + 0.5
    return torch.stack([base + 0.5 * torch.randn(rows, d, generator=g), base], dim=1)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _separate_processes(x_path: Path, names: list[str], out: Path, steps: int, threads: int) -> None:
    script = ONE_RUN.format(threads=threads, d=D_MODEL, steps=steps)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    for name in names:
        subprocess.run([sys.executable, "-c", script, str(x_path), name, str(out / name)], check=True, env=env)


def _same(a: Path, b: Path, names: list[str]) -> float:
    """Largest absolute weight difference between the artifacts of two sweeps."""
    worst = 0.0
    for name in names:
        sa, sb = load_artifact(a / name).state_dict(), load_artifact(b / name).state_dict()
        worst = max(worst, max(float((sa[k] - sb[k]).abs().max()) for k in sa))
    return worst


@dataclass
class Mode:
    """One way of training the grid: its label in the table, its output folder's name, how to run it."""

    label: str
    folder: str
    run: Callable[[Path], Any]


def _modes(grid: Grid, x: torch.Tensor, x_path: Path, names: list[str], args: argparse.Namespace) -> list[Mode]:
    over = {"steps": args.steps, "checkpoint_every": 0}
    return [
        Mode("one pass, stacked (guardrail sweep)", "stacked", lambda out: run_sweep(grid, x, out, overrides=over, progress=False)),
        Mode("one pass, each run its own step (before)", "per-run", lambda out: run_sweep(grid, x, out, overrides=over, progress=False, stack=False)),
        Mode("one by one, same process (--one-by-one)", "one-by-one", lambda out: run_sweep(grid, x, out, overrides=over, progress=False, one_pass=False)),
        Mode("one process per run (guardrail train)", "processes", lambda out: _separate_processes(x_path, names, out, args.steps, args.threads)),
    ]


@dataclass
class Timing:
    """Best wall and CPU seconds of a mode over the rounds (CPU: this process's and its children's)."""

    wall: float = float("inf")
    cpu: float = float("inf")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measure(fn: Callable[[], Any], best: Timing) -> None:
    w0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    best.wall, best.cpu = min(best.wall, time.perf_counter() - w0), min(best.cpu, _cpu_seconds() - c0)


def sweep_part(args: argparse.Namespace, tmp: Path) -> None:
    x = _data(args.rows, D_MODEL)
    x_path = tmp / "x.pt"
    torch.save(x, x_path)
    grid = grid_for("quick", D_MODEL)
    names = [s.name for s in expand_grid(grid)]
    print(f"quick grid at d={D_MODEL}: {len(names)} dictionaries ({', '.join(names)}), {args.steps} steps each, "
          f"{args.rows} rows, {args.threads} thread(s); best of {args.rounds} interleaved round(s)")
    run_sweep(grid, x, tmp / "warm-up", overrides={"steps": 2, "checkpoint_every": 0}, progress=False)  # first-touch costs out of the timings
    modes = _modes(grid, x, x_path, names, args)
    best = {m.folder: Timing() for m in modes}
    for r in range(args.rounds):  # a neighbour's load drifts: each round runs every mode once
        for m in modes:
            _measure(lambda: m.run(tmp / f"{m.folder}-{r}"), best[m.folder])
    print(f"{'':42s} {'wall s':>8s} {'cpu s':>8s} {'ms/dict step':>13s} {'x stacked':>10s}")
    for m in modes:
        t = best[m.folder]
        print(f"{m.label:42s} {t.wall:8.1f} {t.cpu:8.1f} {t.wall / len(names) / args.steps * 1e3:13.1f} {t.wall / best['stacked'].wall:10.2f}")
    print(f"largest weight difference vs one by one: stacked {_same(tmp / 'stacked-0', tmp / 'one-by-one-0', names):.3g}, "
          f"each run its own step {_same(tmp / 'per-run-0', tmp / 'one-by-one-0', names):.3g}")
    seq, one = best["one-by-one"], best["stacked"]
    print(f"one by one / one pass stacked: {seq.wall / one.wall:.2f}x wall, {seq.cpu / one.cpu:.2f}x cpu (target: >= 2x)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, steps: int, rows: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from guardrail.training.distributed import setup

    queue.put((rank, _train_seconds(steps, rows, 1, setup())))
    dist.destroy_process_group()


def _train_seconds(steps: int, rows: int, threads: int, comm=None) -> float:
    from guardrail.training.distributed import LOCAL

    torch.set_num_threads(threads)
    spec = expand_grid(grid_for("quick", D_MODEL))[0]
    tc = spec.training.model_copy(update={"steps": steps, "checkpoint_every": 0, "progress": False})
    trainer = build_trainer(_data(rows, D_MODEL), spec.crosscoder, tc, comm=comm or LOCAL)
    trainer.step(0)  # warm-up (DDP's first step builds its buckets)
    return _timed(lambda: trainer.run(1, None, None))


def ranks_part(args: argparse.Namespace) -> None:
    steps = args.rank_steps
    print(f"\none DFC (D=2304, k=13, batch 256), {steps - 1} timed steps")
    for threads in (1, 2):
        t = _train_seconds(steps, args.rows, threads)
        print(f"{'1 rank, ' + str(threads) + ' thread(s)':40s} {(steps - 1) / t:8.2f} steps/s")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank_worker, args=(2, _free_port(), steps, args.rows, queue), nprocs=2)
    t = max(queue.get()[1] for _ in range(2))
    print(f"{'2 ranks (gloo), 1 thread each':40s} {(steps - 1) / t:8.2f} steps/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="steps per dictionary in the sweep part (the quick grid's 600)")
    ap.add_argument("--rows", type=int, default=8192, help="synthetic activation rows")
    ap.add_argument("--rank-steps", type=int, default=100, help="steps of the 1 vs 2 ranks part")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the sweep part (1: the artifacts compare bit for bit)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the sweep part; each mode's best round is shown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sweep_part(args, Path(tmp))
    ranks_part(args)


if __name__ == "__main__":
    main()
