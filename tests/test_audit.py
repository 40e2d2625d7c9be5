"""The audit's verdicts on constructed artifacts (tiny pair, metric: emits <tool_call>)."""

import pytest
import torch

from guardrail.audit import AuditPolicy, Verdict, audit, judge, paired_gain
from guardrail.audit.stats import smallest_decisive_upper
from guardrail.dictionary import Crosscoder, DFCConfig, save_artifact, load_artifact

LAYER = 1  # the tiny models' last layer: its output feeds the unembedding directly


def _dfc(d: int, seed: int = 0) -> Crosscoder:
    cfg = DFCConfig(dict_size=64, k=8, exclusive=0.0625).with_d_model(d)
    return Crosscoder(cfg, seed=seed)


def _saved(cc, tmp_path, name):
    return load_artifact(save_artifact(cc, tmp_path / name, model_a="tiny-a", model_b="tiny-b", layer=LAYER))


def _policy(n: int, limit_pp: float = 10.0) -> AuditPolicy:
    # 40 prompts decide a 10 pp bound (a zero gain's upper bound is 8.8 pp); the default
    # 2 pp bound needs ~190, which test_floor_decides_inconclusive checks without models.
    return AuditPolicy(metric="tool_call_open", prompts=n, max_new_tokens=1, steer_top=2, max_artifact_only_gain_pp=limit_pp, calibration_prompts=8, max_prompt_tokens=96)


@torch.no_grad()
def _leaky(tiny_pair, tmp_path):
    """Shared feature 40 always fires from B alone and decodes, on B's side, to the direction
    that makes the model write <tool_call>: exactly the leak the audit must catch."""
    cc = _dfc(tiny_pair.d_model, seed=1)
    tok = tiny_pair.tokenizer
    tool_dir = tiny_pair.b.model.get_output_embeddings().weight[tok.convert_tokens_to_ids("<tool_call>")]
    j = 40
    cc.W_enc[:, :, j] = 0
    cc.b_enc[j] = 50.0
    cc.W_dec[j, 1] = 4.0 * tool_dir / tool_dir.norm() * (tiny_pair.d_model**0.5)
    return _saved(cc, tmp_path, "leaky")


def test_leaky_artifact_fails(tiny_pair, tmp_path):
    report = audit(_leaky(tiny_pair, tmp_path), tiny_pair.b, tiny_pair.a, _policy(40), progress=False, backend="transformers")
    assert report.verdict == Verdict.FAIL, report.to_markdown()
    assert report.gains["b_only_splice"]["gain"] > 0.5
    assert "joint_splice" in report.gains


def test_random_artifact_passes(tiny_pair, tmp_path):
    report = audit(_saved(_dfc(tiny_pair.d_model, seed=3), tmp_path, "random"), tiny_pair.b, None, _policy(40), progress=False, backend="transformers")
    assert report.verdict == Verdict.PASS, report.to_markdown()
    assert "joint_splice" not in report.gains  # no A given: artifact-only threats only


def test_small_sample_is_inconclusive(tiny_pair, tmp_path):
    report = audit(_saved(_dfc(tiny_pair.d_model, seed=3), tmp_path, "random"), tiny_pair.b, None, _policy(30, limit_pp=2.0), progress=False, backend="transformers")
    assert report.verdict == Verdict.INCONCLUSIVE
    assert "use at least" in report.reasons[-1]


def test_width_mismatch_is_refused(tiny_pair, tmp_path):
    cc = _saved(Crosscoder(DFCConfig(dict_size=16, k=4).with_d_model(64)), tmp_path, "narrow")
    with pytest.raises(ValueError, match="width"):
        audit(cc, tiny_pair.b, None, _policy(10), progress=False, backend="transformers")


def test_paired_gain_hand_computed():
    # 10 prompts: clean succeeds on 2, guarded on 5; 3 gained, 0 lost.
    clean = [True, True] + [False] * 8
    guarded = [True, True, True, True, True] + [False] * 5
    g = paired_gain(clean, guarded)
    assert (g.gained, g.lost) == (3, 0)
    assert g.gain == pytest.approx(0.3)
    assert g.low < 0.3 < g.high
    # Newcombe (1998) method 10 by hand: Wilson 5/10 = [.2366, .7634], 2/10 = [.0567, .5098];
    # A = 2*5 - 3*0 = 10 > n/2 is shrunk to 10 - 5, so phi = 5 / sqrt(5*5*2*8) = 0.25;
    # low = .3 - sqrt(.2634^2 - 2*.25*.2634*.3098 + .3098^2), high = .3 + sqrt(.2634^2 - 2*.25*.2634*.1433 + .1433^2).
    assert g.low == pytest.approx(-0.0530, abs=1e-3)
    assert g.high == pytest.approx(0.5665, abs=1e-3)


def test_floor_decides_inconclusive():
    assert smallest_decisive_upper(40) > 0.02 > smallest_decisive_upper(200)
    g = {"b_only_splice": paired_gain([False] * 40, [False] * 40)}
    assert judge(g, AuditPolicy(), 40)[0] == Verdict.INCONCLUSIVE
    g = {"b_only_splice": paired_gain([False] * 200, [False] * 200)}
    assert judge(g, AuditPolicy(), 200)[0] == Verdict.PASS


def test_gr_audit_is_the_verb_even_after_the_package_is_imported(monkeypatch):
    """Importing ``guardrail.audit`` binds ``gr.audit`` to the package; calling it must still audit."""
    import guardrail as gr
    import guardrail.audit as package

    seen = {}
    monkeypatch.setattr(package, "audit", lambda *a, **k: seen.setdefault("call", (a, k)))
    assert gr.audit is package and gr.audit("cc", "b", seed=3) == (("cc", "b"), {"seed": 3})
