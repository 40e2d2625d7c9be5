"""Stacked training: dictionaries of one shape step as one stack and end as each would alone, bit for bit on one thread."""

from __future__ import annotations

import json

import pytest
import torch

from guardrail.dictionary import CrosscoderConfig, DFCConfig
from guardrail.training import TrainingConfig, train
from guardrail.training.distributed import LOCAL
from guardrail.training.multi import Job, _plan, train_many

pytestmark = pytest.mark.usefixtures("one_thread")

TC = TrainingConfig(steps=24, batch_size=64, lr=2e-3, warmup_steps=3, progress=False, checkpoint_every=0)
# One shape (D = 256), everything else different: joint and per-partition top-k, both penalty
# forms, AuxK per partition and over the whole dictionary (features dead after 2-3 steps, so it
# works from early on), a standard crosscoder, other learning rates and warmups, clipping that
# binds (0.05) and none.
RUNS = [
    (DFCConfig(dict_size=256, k=6, exclusive=0.1, lambda_shared=1e-3, aux_k={"dead_steps": 2}), TC),
    (DFCConfig(dict_size=256, k=4, k_exclusive=1, exclusive=0.1, lambda_excl=1e-3, penalty_form="paper", aux_k={"dead_steps": 3}),
     TC.model_copy(update={"lr": 5e-3, "warmup_steps": 0})),
    (CrosscoderConfig(dict_size=256, k=8, aux_k={"dead_steps": 2, "per_partition": False}), TC.model_copy(update={"grad_clip": None})),
    (DFCConfig(dict_size=256, k=5, exclusive=0.05), TC.model_copy(update={"grad_clip": 0.05})),
]


def _data(n=700, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g) * 3 + 1
    return torch.stack([base + 0.3 * torch.randn(n, d, generator=g), base], dim=1)


def _jobs(root=None, runs=RUNS):
    return [Job(f"r{i}", cfg, tc, root / f"r{i}" if root else None) for i, (cfg, tc) in enumerate(runs)]


def _assert_same(a, b, what=""):
    for name, t in b.state_dict().items():
        assert torch.equal(t, a.state_dict()[name]), (what, name)


def test_a_stack_trains_what_each_run_trains_alone(monkeypatch):
    """Four runs of one shape take every step as one stack; each ends as ``train`` leaves it, to the bit."""
    import guardrail.training.stacked as stacked

    sizes, clipped = [], []
    step = stacked.StackedTrainer.step
    monkeypatch.setattr(stacked.StackedTrainer, "step", lambda self, s, x: sizes.append(len(self.trainers)) or step(self, s, x))
    clip = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: clipped.append(a[1]) or clip(*a, **k))
    x = _data()
    together = train_many(x, _jobs(), progress=False)
    assert sizes == [4] * TC.steps
    assert 0.05 in clipped  # the last run's clipping bound
    for (cfg, tc), one in zip(RUNS, together):
        alone = train(x, cfg, training=tc)
        _assert_same(one, alone, cfg.k)
        assert one.metrics == alone.metrics
        assert one.W_enc.is_contiguous() and one.W_enc.grad is None  # a finished run holds tensors of its own
    aux = [one.metrics["final_step"].get("aux", 0) for one in together]
    assert aux[0] > 0 and aux[2] > 0  # AuxK was at work in the stack


def test_only_top_k_runs_of_one_shape_steps_and_start_stack(tmp_path):
    """BatchTopK, L1, another size or number of steps, or another resume step: a unit of its own."""
    base = DFCConfig(dict_size=64, k=4, exclusive=0.1)
    runs = [
        (base, TC),
        (base.model_copy(update={"k": 6, "lambda_excl": 1e-3}), TC.model_copy(update={"lr": 1e-2})),
        (DFCConfig(dict_size=64, k=4, exclusive=0.1, sparsity="batchtopk"), TC),
        (CrosscoderConfig(dict_size=64, k=None, sparsity="l1", l1_coef=1e-3), TC),
        (DFCConfig(dict_size=32, k=4, exclusive=0.1), TC),
        (base, TC.model_copy(update={"steps": 30})),
        (base, TC),  # resumes at step 10 (below)
    ]
    jobs = _jobs(tmp_path, runs)
    (tmp_path / "r6" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r6" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 10, "meta": "step-00000010.json"}))
    plan = [(p.index, p.stacked) for p in _plan(jobs, LOCAL, resume=True, stack=True)]
    assert plan == [([0, 1], True), ([2], False), ([3], False), ([4], True), ([5], True), ([6], True)]
    assert [p.stacked for p in _plan(jobs, LOCAL, resume=True, stack=False)] == [False] * 7


class Crash(RuntimeError):
    pass


def test_a_stacked_runs_checkpoint_resumes_alone(tmp_path):
    """A stacked pass checkpoints each run as ``train`` does: one run of a killed pass finishes on its own, equal to the bit."""
    x = _data()
    runs = [(cfg, t.model_copy(update={"checkpoint_every": 5})) for cfg, t in RUNS]

    def crash(done, cc, res):
        if done == 13:
            raise Crash(done)

    with pytest.raises(Crash):
        train_many(x, _jobs(tmp_path / "pass", runs), progress=False, callback=crash)
    cfg, run_tc = runs[1]
    assert json.loads((tmp_path / "pass" / "r1" / "checkpoints" / "latest.json").read_text())["step"] == 10
    resumed = train(x, cfg, tmp_path / "pass" / "r1", training=run_tc)
    _assert_same(resumed, train(x, cfg, tmp_path / "straight", training=run_tc))
