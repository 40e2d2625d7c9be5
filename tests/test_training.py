"""Trainer: determinism, resume after a crash equals an uninterrupted run, metrics, input adapters."""

from __future__ import annotations

import pytest
import torch

from guardrail.dictionary import CrosscoderConfig, DFCConfig, load_artifact
from guardrail.training import CheckpointError, TrainingConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=700, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g) * 3 + 1
    return torch.stack([base + 0.3 * torch.randn(n, d, generator=g), base], dim=1)


CFG = DFCConfig(dict_size=64, k=6, exclusive=0.1, lambda_shared=1e-3)
TC = TrainingConfig(steps=20, batch_size=64, lr=2e-3, warmup_steps=3, progress=False, checkpoint_every=10)


class Crash(RuntimeError):
    pass


def _crash_at(step):
    def cb(done, cc, res):
        if done == step:
            raise Crash(f"killed at step {done}")
    return cb


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    x = _data()
    straight = train(x, CFG, tmp_path / "straight", training=TC)
    with pytest.raises(Crash):
        train(x, CFG, tmp_path / "resumed", training=TC, callback=_crash_at(14))  # last checkpoint: step 10
    assert (tmp_path / "resumed" / "checkpoints" / "latest.json").exists()
    resumed = train(x, CFG, tmp_path / "resumed", training=TC)
    for name, t in straight.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # cleaned up after finishing
    a, b = load_artifact(tmp_path / "straight"), load_artifact(tmp_path / "resumed")
    assert torch.equal(a.W_dec, b.W_dec)


def test_same_seed_same_weights_other_seed_differs():
    x = _data()
    tc = TC.model_copy(update={"checkpoint_every": 0, "steps": 8})
    a, b = train(x, CFG, training=tc), train(x, CFG, training=tc)
    c = train(x, CFG, training=tc, seed=1)
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)


def test_resume_refuses_a_different_run(tmp_path):
    x = _data()
    with pytest.raises(Crash):
        train(x, CFG, tmp_path / "r", training=TC, callback=_crash_at(12))
    with pytest.raises(CheckpointError, match="crosscoder config"):
        train(x, DFCConfig(dict_size=64, k=5, exclusive=0.1), tmp_path / "r", training=TC)


def test_metrics_and_manifest(tmp_path):
    x = _data()
    cc = train(x, CFG, tmp_path / "m", training=TC.model_copy(update={"checkpoint_every": 0}))
    m = cc.metrics
    for key in ("mse_A", "mse_B", "fvu_A", "fvu_B", "l0", "partitions", "relative_decoder_norm", "train_dead_fraction"):
        assert key in m
    assert set(m["partitions"]) == {"a_exclusive", "b_exclusive", "shared"}
    assert m["partition_violation"] == 0.0
    assert m["l0"] <= 6
    art = load_artifact(tmp_path / "m")
    man = art.manifest
    assert man.training_data_hash and man.training["steps"] == 20 and man.metrics["fvu"] == m["fvu"]
    # normalisation stats are the data's per-channel z-score, stored in buffers and manifest
    assert torch.allclose(art.act_mean, x.mean(0), atol=1e-4)
    assert torch.allclose(art.act_std, x.std(0), atol=1e-4)


def test_attention_sinks_are_left_out_of_the_rows_and_the_statistics(tmp_path):
    from guardrail.activations.cache import outlier_rows
    from guardrail.training.data import prepare_data

    acts = _data()
    acts[5, 0] *= 400  # A's sink
    acts[9, 1] *= 400  # B's sink
    assert outlier_rows(acts, 10.0).nonzero().flatten().tolist() == [5, 9]
    kept = torch.cat([acts[:5], acts[6:9], acts[10:]])
    td = prepare_data(acts, max_norm_ratio=10.0)
    assert td.x.shape[0] == len(acts) - 2 and td.meta["outlier_rows_dropped"] == 2
    assert torch.allclose(td.mean, kept.double().mean(0).float()) and td.std.max() < 10  # the sinks would put std in the hundreds
    assert prepare_data(acts).x.shape[0] == len(acts)
    cc = train(acts, CFG, tmp_path / "art", training=TC.model_copy(update={"max_norm_ratio": 10.0}))
    assert cc.manifest.training["max_norm_ratio"] == 10.0 and cc.manifest.training["outlier_rows_dropped"] == 2
    with pytest.raises(ValueError, match="greater than 1"):
        TrainingConfig(max_norm_ratio=0.5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\[N, 2, d\]"):
        train(torch.randn(10, 12), CFG, training=TC)
    with pytest.raises(ValueError, match="d_model=8"):
        train(_data(), CrosscoderConfig(d_model=8, dict_size=32, k=4), training=TC)


def test_sweep_grid_paper_is_the_48_runs():
    from guardrail.training.sweep import expand_grid, load_grid

    specs = expand_grid(load_grid("paper"))
    names = {s.name for s in specs}
    assert len(specs) == 48 and sum(s.crosscoder.is_dfc for s in specs) == 36
    assert {"dfc-D8k-excl10-freeexcl-k160", "dfc-D16k-excl3-k45", "cc-D8k-k45", "cc-D16k-nol1-k160"} <= names
    s = next(s for s in specs if s.name == "dfc-D8k-excl3-k45")
    assert s.crosscoder.partition.n_a == int(8192 * 0.03) and s.crosscoder.lambda_excl == 1e-3
    assert (s.training.steps, s.training.batch_size, s.training.lr, s.training.grad_clip) == (9000, 1024, 1e-4, 1.0)
    assert len(expand_grid(load_grid("paper-d576"))) == 48


def test_the_old_training_grid_name_is_refused_with_the_new_one():
    """``quick`` named two grids; the training one is ``paper-d576`` now, the eval one keeps ``quick``."""
    from guardrail.eval.grids import load_eval_grid
    from guardrail.training.sweep import SweepError, builtin_grids, load_grid

    assert "quick" not in builtin_grids()
    with pytest.raises(SweepError, match="paper-d576"):
        load_grid("quick")
    grid, _ = load_eval_grid("quick")
    assert grid.name == "eval-quick"


def test_sweep_runs_every_config_and_skips_finished(tmp_path):
    from guardrail.training.sweep import SweepError, load_grid, run_sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(
        "name: t\ntraining: {steps: 6, batch_size: 32, lr: 1.0e-3, checkpoint_every: 0}\n"
        "groups:\n"
        "  - name: dfc\n    grid: {dict_size: [64], k: [4, 6], exclusive: [0.1]}\n"
        "  - name: cc\n    grid: {dict_size: [64], k: [4]}\n"
    )
    x = _data(300)
    rows = run_sweep(grid, x, tmp_path / "out", progress=False)
    assert [r["name"] for r in rows] == ["dfc-dict_size64-k4-exclusive0.1", "dfc-dict_size64-k6-exclusive0.1", "cc-dict_size64-k4"]
    assert all(r["status"] == "trained" for r in rows)
    assert load_artifact(tmp_path / "out" / rows[1]["name"]).config.k == 6
    again = run_sweep(grid, x, tmp_path / "out", progress=False)
    assert all(r["status"].startswith("skipped") for r in again)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\ngroups:\n  - name: x\n    grid: {dict_size: [64], kk: [4]}\n")
    with pytest.raises(SweepError, match="kk"):
        run_sweep(load_grid(bad), x, tmp_path / "o2", progress=False)


def test_train_from_activation_cache_uses_its_stats_and_cli(tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from guardrail.activations import ActivationCache, collect
    from guardrail.cli.main import app
    from guardrail.prompts import PromptItem
    from guardrail.residual import Site

    prompts = [PromptItem(id=f"p{i}", text=("call a tool " if i % 2 else "tell me a story ") * 3, is_tool=bool(i % 2)) for i in range(8)]
    cache = collect(tiny_pair, prompts, Site(layer=1, positions="prompt", last_n=8), tmp_path / "cache", progress=False)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "art"), "--dict-size", "256",
                              "--k", "8", "--steps", "15", "--batch-size", "32", "--lr", "1e-3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "a_exclusive" in res.output
    cc = load_artifact(tmp_path / "art")
    mean, std = ActivationCache.open(tmp_path / "cache").stats
    assert torch.equal(cc.act_mean, mean) and torch.equal(cc.act_std, std)
    assert cc.manifest.layer == 1 and cc.manifest.model_a == cache.manifest.model_a
    assert cc.manifest.normalization.source == "activation cache statistics"
    res = runner.invoke(app, ["inspect", str(tmp_path / "art")])
    assert res.exit_code == 0 and "verified" in res.output, res.output


KILL_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_training import CFG, TC, _data
from guardrail.training import train

def die(done, cc, res):
    if done == 17:
        os.kill(os.getpid(), signal.SIGKILL)

train(_data(), CFG, sys.argv[1], training=TC.model_copy(update={{"checkpoint_every": 5}}), callback=die)
"""


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "die.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "killed")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    import json

    assert json.loads((tmp_path / "killed" / "checkpoints" / "latest.json").read_text())["step"] == 15
    tc = TC.model_copy(update={"checkpoint_every": 5})
    resumed = train(_data(), CFG, tmp_path / "killed", training=tc)
    clean = train(_data(), CFG, tmp_path / "clean", training=tc)
    for name, t in clean.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


ONE_PASS_GRID = (
    "name: t\ntraining: {steps: 9, batch_size: 32, lr: 1.0e-3, checkpoint_every: 3, warmup_steps: 2}\n"
    "groups:\n"
    "  - name: dfc\n    grid: {dict_size: [64], k: [4, 6], exclusive: [0.1], lambda_excl: [0.0, 1.0e-3]}\n"
    "  - name: cc\n    grid: {dict_size: [48], k: [4], lr: [3.0e-3], steps: [6]}\n"
    "  - name: seed\n    grid: {dict_size: [64], k: [4], seed: [1]}\n"  # another batch stream: its own pass
)


def test_one_pass_sweep_trains_what_one_by_one_trains(tmp_path):
    """Same batches in the same order, each dictionary its own init and Adam: bit for bit on one thread.

    The four DFCs (one shape) step as one stack, the smaller crosscoder and the other seed's
    run on their own (``tests/test_stacked.py`` has the stack's own cases).
    """
    import json

    from guardrail.training.sweep import run_sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(ONE_PASS_GRID)
    x = _data(300)
    together = run_sweep(grid, x, tmp_path / "together", progress=False)
    apart = run_sweep(grid, x, tmp_path / "apart", progress=False, one_pass=False)
    assert len(together) == 6 and [r["name"] for r in together] == [r["name"] for r in apart]
    for a, b in zip(together, apart):
        assert {k: v for k, v in a.items() if k != "artifact"} == {k: v for k, v in b.items() if k != "artifact"}
        one, two = load_artifact(a["artifact"]), load_artifact(b["artifact"])
        for name, t in one.state_dict().items():
            assert torch.equal(t, two.state_dict()[name]), (a["name"], name)
        assert one.manifest.metrics == two.manifest.metrics and one.manifest.training == two.manifest.training
    assert load_artifact(tmp_path / "together" / "cc-dict_size48-k4-lr0.003-steps6").manifest.training["steps"] == 6
    summary = json.loads((tmp_path / "together" / "sweep.json").read_text())
    assert summary["grid"] == "t" and [r["status"] for r in summary["runs"]] == ["trained"] * 6


def test_an_interrupted_pass_resumes_each_dictionary_from_its_own_checkpoint(tmp_path):
    from guardrail.training.multi import Job, train_many

    x = _data(300)
    tc = TrainingConfig(steps=9, batch_size=32, lr=1e-3, checkpoint_every=3, progress=False)
    jobs = lambda root: [Job(f"k{k}", DFCConfig(dict_size=64, k=k, exclusive=0.1), tc, root / f"k{k}") for k in (4, 6)]  # noqa: E731

    def crash(done, cc, res):  # one stack: k=4 has written its step-6 checkpoint when k=6 stops before writing its own
        if done == 6 and cc.config.k == 6:
            raise Crash(done)

    with pytest.raises(Crash):
        train_many(x, jobs(tmp_path / "r"), progress=False, callback=crash, window=4)
    import json

    assert [json.loads((tmp_path / "r" / n / "checkpoints" / "latest.json").read_text())["step"] for n in ("k4", "k6")] == [6, 3]
    resumed = train_many(x, jobs(tmp_path / "r"), progress=False, window=4)  # resuming at 6 and 3: two stacks
    straight = [train(x, j.config, j.out, training=tc) for j in jobs(tmp_path / "s")]
    for a, b in zip(resumed, straight):
        for name, t in b.state_dict().items():
            assert torch.equal(t, a.state_dict()[name]), name


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_sweep_applies_each_runs_outlier_rule(tmp_path, one_pass):
    """A grid's ``max_norm_ratio`` leaves the outlier rows out in either mode; prepared data refuses another rule."""
    from guardrail.training.data import prepare_data
    from guardrail.training.sweep import run_sweep

    grid = tmp_path / "g.yaml"
    grid.write_text("name: t\ntraining: {steps: 4, batch_size: 32, lr: 1.0e-3, checkpoint_every: 0}\n"
                    "groups:\n  - name: cc\n    grid: {dict_size: [32], k: [4], max_norm_ratio: [5.0, null]}\n")
    x = _data(300)
    x[:7] *= 100.0  # seven attention-sink-like rows
    rows = run_sweep(grid, x, tmp_path / "out", progress=False, one_pass=one_pass)
    dropped = {r["name"]: load_artifact(r["artifact"]).manifest.training.get("outlier_rows_dropped") for r in rows}
    assert sorted(dropped.values(), key=str) == [7, None], dropped
    with pytest.raises(ValueError, match="max_norm_ratio=5.0 now"):
        prepare_data(prepare_data(x), max_norm_ratio=5.0)
