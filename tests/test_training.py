"""Trainer: determinism, resume after a crash equals an uninterrupted run, metrics, input adapters."""

from __future__ import annotations

import pytest
import torch

from guardrail.dictionary import CrosscoderConfig, DFCConfig, load_artifact
from guardrail.training import CheckpointError, TrainingConfig, train


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\[N, 2, d\]"):
        train(torch.randn(10, 12), CFG, training=TC)
    with pytest.raises(ValueError, match="d_model=8"):
        train(_data(), CrosscoderConfig(d_model=8, dict_size=32, k=4), training=TC)
