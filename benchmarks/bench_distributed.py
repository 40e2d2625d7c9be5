"""Sweep and multi-rank training speed: one pass vs one by one, and 1 vs 2 ranks on the CPU.

Part 1 trains the eval harness's quick grid (6 dictionaries, scaled to d = 576 per model as
the demo's: D = 2304, k = 13 and 25) on synthetic activations three ways and prints them side
by side: ``run_sweep`` in one pass (the default), ``run_sweep(one_pass=False)`` in this
process, and one ``guardrail train``-like process per run (each loads the data, computes its
statistics and hash, imports torch). It checks that the one-pass artifacts equal the
one-by-one ones. One pass shares the data, its normalisation and the batch gather; the
optimiser work of each dictionary is its own, so when the data sits in memory the gain is
what the per-run preparation cost, and it grows with the cache's size on disk.

Part 2 trains one of those dictionaries for the same steps on 1 rank and on 2 gloo ranks
(each rank half of every batch). Two ranks on a 2-core machine share the cores the single
process uses with two threads, so scaling shows only on more cores or GPUs.

    python benchmarks/bench_distributed.py [--steps 600] [--rows 8192] [--rank-steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guardrail.dictionary import load_artifact
from guardrail.eval.grids import grid_for
from guardrail.training.sweep import expand_grid, run_sweep
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


def sweep_part(args: argparse.Namespace, tmp: Path) -> None:
    x = _data(args.rows, D_MODEL)
    x_path = tmp / "x.pt"
    torch.save(x, x_path)
    grid = grid_for("quick", D_MODEL)
    names = [s.name for s in expand_grid(grid)]
    over = {"steps": args.steps, "checkpoint_every": 0}
    print(f"quick grid at d={D_MODEL}: {len(names)} dictionaries ({', '.join(names)}), {args.steps} steps each, "
          f"{args.rows} rows, {args.threads} thread(s)")
    run_sweep(grid, x, tmp / "warm-up", overrides={"steps": 2, "checkpoint_every": 0}, progress=False)  # first-touch costs out of the timings
    t_seq = _timed(lambda: run_sweep(grid, x, tmp / "one-by-one", overrides=over, progress=False, one_pass=False))
    t_one = _timed(lambda: run_sweep(grid, x, tmp / "one-pass", overrides=over, progress=False))
    t_proc = _timed(lambda: _separate_processes(x_path, names, tmp / "processes", args.steps, args.threads))
    print(f"{'one pass (guardrail sweep)':40s} {t_one:8.1f} s")
    print(f"{'one by one, same process (--one-by-one)':40s} {t_seq:8.1f} s   its time / one pass's: {t_seq / t_one:.2f}x")
    print(f"{'one process per run (guardrail train)':40s} {t_proc:8.1f} s   its time / one pass's: {t_proc / t_one:.2f}x")
    print(f"largest weight difference, one pass vs one by one: {_same(tmp / 'one-pass', tmp / 'one-by-one', names):.3g}")
    print("target: >= 2x")


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sweep_part(args, Path(tmp))
    ranks_part(args)


if __name__ == "__main__":
    main()
