"""Training on several ranks: two gloo ranks on the CPU train what one process trains, resume, and write once.

Ranks are spawned with torch.multiprocessing (a free local port each time); one test goes
through ``torchrun`` and the CLI, as a user launches it.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from guardrail.dictionary import DFCConfig, load_artifact
from guardrail.training import TrainingConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

CFG = DFCConfig(dict_size=64, k=6, exclusive=0.1, lambda_shared=1e-3)
TC = TrainingConfig(steps=20, batch_size=64, lr=2e-3, warmup_steps=3, progress=False, checkpoint_every=5)
# BatchTopK and AuxK (features dead after 2 steps) exercise every piece of state kept outside the gradient.
STATE_CFG = DFCConfig(dict_size=512, k=2, exclusive=0.1, sparsity="batchtopk", aux_k={"dead_steps": 2})
# 1 rank vs 2: each rank's loss is the mean over its half of the batch and DDP averages the two
# gradients, which is the full batch's gradient summed in another order; float32 rounding then
# differs in the last bits and Adam carries it along for 20 steps. Seen: 6e-8; allowed: 1e-5.
ATOL = 1e-5


def _data(n: int = 700, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g) * 3 + 1
    return torch.stack([base + 0.3 * torch.randn(n, d, generator=g), base], dim=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        gc.collect()  # free the ranks' DDP reducers before their group goes
        dist.destroy_process_group()


def _spawn(fn, *args, world: int = 2) -> None:
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world)


class Stop(RuntimeError):
    pass


def _forbid_writes() -> None:
    """On ranks other than 0: any checkpoint or artifact write fails the run."""
    import guardrail.training.trainer as trainer

    def refuse(*_a, **_k):
        raise AssertionError("a rank other than 0 wrote a file")

    trainer.save_artifact = trainer.save_checkpoint = refuse


def _train_worker(rank: int, out: str, results: str, stop_at: int | None) -> None:
    """Train ``CFG`` (stopping after ``stop_at`` steps, as a crash would); save this rank's weights and state."""
    from guardrail.training.distributed import setup
    from guardrail.training.trainer import build_trainer

    if rank:
        _forbid_writes()

    def stop(done, cc, res):
        if done == stop_at:
            raise Stop(done)

    try:
        cc = train(_data(), CFG, out, training=TC, callback=stop)
    except Stop:
        return
    tensors = {f"cc.{k}": v.contiguous() for k, v in cc.state_dict().items()}
    tr = build_trainer(_data(), STATE_CFG, TC.model_copy(update={"steps": 12}), comm=setup())
    tr.run(0, None, None)
    tensors |= {f"state.{k}": v.contiguous() for k, v in tr.cc.state_dict().items()}
    tensors["state.steps_since_fired"] = tr.state.steps_since_fired
    save_file(tensors, str(Path(results) / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One uninterrupted 2-rank run (artifact in ``art``, each rank's tensors in ``rank{0,1}.safetensors``)."""
    root = tmp_path_factory.mktemp("two-ranks")
    _spawn(_train_worker, str(root / "art"), str(root), None)
    return root


def test_two_ranks_train_the_artifact_one_process_trains(two_ranks, tmp_path):
    one = train(_data(), CFG, tmp_path / "one", training=TC)
    two = load_artifact(two_ranks / "art")
    for name, t in one.state_dict().items():
        assert torch.allclose(t, two.state_dict()[name], rtol=0, atol=ATOL), name
    assert two.manifest.training["world_size"] == 2 and "world_size" not in one.manifest.training
    assert two.manifest.training_data_hash == one.manifest.training_data_hash
    assert abs(two.manifest.metrics["fvu"] - one.metrics["fvu"]) < 1e-4
    log = json.loads((two_ranks / "art" / "training_log.json").read_text())
    assert [r["step"] for r in log] == [20] and abs(log[0]["mse"] - one.manifest.metrics["final_step"]["mse"]) < 1e-4
    assert not (two_ranks / "art" / "checkpoints").exists()


def test_every_rank_holds_the_same_dictionary_and_state(two_ranks):
    """Weights, BatchTopK threshold and dead-feature counters agree bit for bit (the trainer reduces them)."""
    r0, r1 = (load_file(str(two_ranks / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert float(r0["state.threshold"].max()) > 0 and int(r0["state.steps_since_fired"].max()) >= 2  # both really moved


def test_batchtopk_and_auxk_on_two_ranks_follow_the_whole_batch(two_ranks):
    """BatchTopK's cutoff and AuxK's normaliser are taken over every rank's rows: the run is one process's, to rounding."""
    from guardrail.training.trainer import build_trainer

    tr = build_trainer(_data(), STATE_CFG, TC.model_copy(update={"steps": 12}))
    tr.run(0, None, None)
    two = load_file(str(two_ranks / "rank0.safetensors"))
    for name, t in tr.cc.state_dict().items():
        assert torch.allclose(t, two[f"state.{name}"], rtol=0, atol=ATOL), name
    assert torch.equal(tr.state.steps_since_fired, two["state.steps_since_fired"])
    assert tr.state.history[-1]["aux"] > 0  # AuxK was at work


def test_a_stopped_two_rank_run_resumes_to_the_uninterrupted_one(two_ranks, tmp_path):
    out = tmp_path / "stopped"
    _spawn(_train_worker, str(out), str(tmp_path), 13)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 10
    assert not (out / "tensors.safetensors").exists()
    _spawn(_train_worker, str(out), str(tmp_path), None)
    resumed, straight = load_artifact(out), load_artifact(two_ranks / "art")
    for name, t in straight.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_batch_must_split_evenly_between_ranks():
    from guardrail.training.distributed import Comm

    with pytest.raises(ValueError, match="multiple of the world size 3"):
        Comm(rank=0, world_size=3).check_batch(64)
    assert Comm(rank=1, world_size=2).local_rows(torch.arange(8)).tolist() == [4, 5, 6, 7]


def _write_cache(root: Path, acts: torch.Tensor) -> None:
    """A one-shard activation cache holding ``acts`` [N, 2, d] (what ``guardrail collect`` would write)."""
    from guardrail.activations.cache import CacheManifest, ShardInfo
    from guardrail.fileio import sha256_file
    from guardrail.residual import Site

    root.mkdir(parents=True)
    n = len(acts)
    a = acts.double()
    save_file({"acts": acts, "is_tool": torch.arange(n) % 2 == 0, "is_last": torch.ones(n, dtype=torch.bool), "prompt_idx": torch.arange(n),
               "position": torch.zeros(n, dtype=torch.long), "sum": a.sum(0), "sumsq": (a**2).sum(0)}, str(root / "shard_00000.safetensors"))
    shard = ShardInfo(name="shard_00000.safetensors", first_prompt=0, n_prompts=n, n_rows=n, sha256=sha256_file(root / "shard_00000.safetensors"))
    man = CacheManifest(model_a="a", model_b="b", layer=1, site=Site(layer=1), d_model=acts.shape[-1], n_prompts=n, n_tool_prompts=n // 2,
                        data_hash="synthetic", shard_prompts=n, max_length=16, shards=[shard], complete=True)
    (root / "manifest.json").write_text(man.model_dump_json())


def test_torchrun_guardrail_train_matches_a_single_process(tmp_path):
    from typer.testing import CliRunner

    from guardrail.cli.main import app

    _write_cache(tmp_path / "cache", _data(512))
    flags = ["--cache", str(tmp_path / "cache"), "--dict-size", "64", "--k", "6", "--steps", "12", "--batch-size", "64",
             "--lr", "2e-3", "--checkpoint-every", "5", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "guardrail.cli", "train", *flags, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("artifact:") == 1  # rank 0 reports, rank 1 is silent
    res = CliRunner().invoke(app, ["train", *flags, "--out", str(tmp_path / "one"), "--single-process"])
    assert res.exit_code == 0, res.output
    one, two = load_artifact(tmp_path / "one"), load_artifact(tmp_path / "two")
    assert two.manifest.training["world_size"] == 2
    for name, t in one.state_dict().items():
        assert torch.allclose(t, two.state_dict()[name], rtol=0, atol=ATOL), name


# The feature-sharded mode merges the top-k (and AuxK's top dead features) over ranks; rank 1's
# half of 512 features is all shared, so it takes part in the exclusive partitions' AuxK with none.
SHARD_CFG = DFCConfig(dict_size=512, k=4, exclusive=0.1, lambda_shared=1e-3, lambda_excl=1e-3, aux_k={"dead_steps": 2})


def _sharded_worker(rank: int, out: str) -> None:
    """Train SHARD_CFG with its features split over the ranks: stopped after 13 steps, then resumed."""
    held = set()

    def stop(done, cc, res):
        held.add(cc.dict_size)
        if done == 13:
            raise Stop(done)

    if rank:
        _forbid_writes()
    with pytest.raises(Stop):
        train(_data(), SHARD_CFG, out, training=TC, shard_features=True, callback=stop)
    assert held == {256}  # each rank held half of the features
    train(_data(), SHARD_CFG, out, training=TC, shard_features=True)


def test_features_split_over_two_ranks_train_what_one_process_trains(tmp_path):
    """Each rank holds 256 of 512 features; top-k merged over ranks; stopped at 13 and resumed from the step-10 checkpoint."""
    _spawn(_sharded_worker, str(tmp_path / "sharded"))
    one, two = train(_data(), SHARD_CFG, tmp_path / "one", training=TC), load_artifact(tmp_path / "sharded")
    assert two.dict_size == 512 and two.manifest.training["feature_shards"] == 2 and two.partition_violation() == 0.0
    aux = one.metrics["final_step"]["aux"]
    assert aux > 0 and abs(two.manifest.metrics["final_step"]["aux"] - aux) < 1e-5  # AuxK was at work, and the same
    for name, t in one.state_dict().items():
        assert torch.allclose(t, two.state_dict()[name], rtol=0, atol=ATOL), name


def test_feature_sharding_names_what_it_does_not_support():
    from guardrail.training.sharded import check_shardable

    with pytest.raises(ValueError, match="k_exclusive"):
        check_shardable(DFCConfig(dict_size=64, k=6, k_exclusive=1), 2)
    with pytest.raises(ValueError, match="batchtopk.*divide by the world size 3"):
        check_shardable(DFCConfig(dict_size=64, k=6, sparsity="batchtopk"), 3)
    check_shardable(SHARD_CFG, 2)


SWEEP_GRID = ("name: t\ntraining: {steps: 8, batch_size: 32, lr: 1.0e-3, checkpoint_every: 4}\n"
              "groups:\n  - name: dfc\n    grid: {dict_size: [64], k: [4, 6], exclusive: [0.1]}\n  - name: cc\n    grid: {dict_size: [48], k: [4]}\n")


def _sweep_worker(rank: int, grid: str, out: str) -> None:
    from guardrail.training.sweep import run_sweep

    if rank:
        _forbid_writes()
    rows = run_sweep(grid, _data(300), out, progress=False)
    assert [r["status"] for r in rows] == ["trained"] * 3  # every rank returns the summary


def test_a_one_pass_sweep_on_two_ranks_trains_what_one_process_trains(tmp_path):
    from guardrail.training.sweep import run_sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(SWEEP_GRID)
    _spawn(_sweep_worker, str(grid), str(tmp_path / "two"))
    rows = run_sweep(grid, _data(300), tmp_path / "one", progress=False)
    summary = json.loads((tmp_path / "two" / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [r["name"] for r in rows]
    for r in rows:
        one, two = load_artifact(r["artifact"]), load_artifact(tmp_path / "two" / r["name"])
        assert two.manifest.training["world_size"] == 2
        for name, t in one.state_dict().items():
            assert torch.allclose(t, two.state_dict()[name], rtol=0, atol=ATOL), (r["name"], name)
