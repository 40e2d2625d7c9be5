"""Intervention math, policy schema, engine failure handling, telemetry and the transformers guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard_fixtures import PROMPTS, build_artifact
from guardrail.features import interventions as iv
from guardrail.policy import GuardError, Policy, PolicyError, PolicyStore, TokenPositions, compile_policy
from guardrail.policy.telemetry import Telemetry
from guardrail.residual.hf import read_residual
from guardrail.residual.hf_guard import guard


@pytest.fixture(scope="module")
def art(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "dfc"
    path, info = build_artifact(tiny_pair, out)
    from guardrail.dictionary import load_artifact

    return {"path": path, "cc": load_artifact(path), **info}


def _policy(rules: list[dict], **top) -> Policy:
    return Policy.from_data({"name": "t", "rules": rules, "telemetry": {"otel": False}, **top})


def _positions(n: int, last: int | None = None) -> TokenPositions:
    prompt = torch.ones(n, dtype=torch.bool)
    lastm = torch.zeros(n, dtype=torch.bool)
    lastm[n - 1 if last is None else last] = True
    return TokenPositions(prompt, lastm, torch.zeros(n, dtype=torch.long), torch.arange(n), ["r0"])


# --------------------------------------------------------------------------- math
def test_clamp_drives_reencoded_activation_to_value(art):
    view = iv.dictionary_view(art["cc"])
    x = art["acts"][:, 0]
    f = iv.encode(view, x)
    idx = torch.tensor(art["a_excl"][:3] + art["shared"][:2])
    assert (f[:, idx] > 0).any(), "the test needs clamped features that fire"
    x0 = x + iv.clamp_delta_encoder(view, x, idx, 0.0)
    assert float(iv.encode(view, x0)[:, idx].abs().max()) == 0.0
    # a positive clamp value is reached on the pre-activation (ReLU passes it through)
    one = torch.tensor([art["a_excl"][0]])
    x1 = x + iv.clamp_delta_encoder(view, x, one, 1.5)
    assert torch.allclose(iv.pre_activations(view, x1, one), torch.full((x.shape[0], 1), 1.5), atol=1e-4)


def test_steer_scale_identity_and_silent_features(art):
    view = iv.dictionary_view(art["cc"])
    x = art["acts"][:, 0]
    f = iv.encode(view, x)
    idx = torch.tensor(art["a_excl"][:4])
    assert iv.steer_scale_delta(f, idx, view.dirs_raw, 1.0).abs().max() == 0
    d = iv.steer_scale_delta(f, idx, view.dirs_raw, 6.0)
    silent = (f[:, idx] == 0).all(-1)
    assert silent.any() and (d[silent] == 0).all()
    assert (d[~silent].norm(dim=-1) > 0).all()
    expected = 5.0 * f[:, idx[0]].unsqueeze(-1) * view.dirs_raw[idx[0]]
    single = iv.steer_scale_delta(f, idx[:1], view.dirs_raw, 6.0)
    assert torch.allclose(single, expected, atol=1e-6)


def test_additive_steer_scales_with_typical_norm(art):
    view = iv.dictionary_view(art["cc"])
    idx = torch.tensor([art["shared"][0]])
    d = iv.steer_additive_delta(3, idx, view.dirs_raw, 0.5, view.typical_norm)
    assert d.shape == (3, view.d_model)
    assert math.isclose(float(d[0].norm()), 0.5 * view.typical_norm, rel_tol=1e-5)


def test_splice_without_error_is_reconstruction(art):
    view = iv.dictionary_view(art["cc"])
    x = art["acts"][:, 0]
    x_hat = iv.reconstruct(view, iv.encode(view, x))
    assert torch.equal(iv.splice(x, x_hat, keep_error=False), x_hat)
    assert torch.allclose(iv.splice(x, x_hat, keep_error=True), x, atol=1e-6)


def test_single_model_a_exclusive_preactivations_equal_joint(art):
    """Pre-activations only: the fixture's joint top-k makes the codes themselves approximate
    (the next test and tests/test_dictionary.py check the codes)."""
    cc = art["cc"]
    view = iv.dictionary_view(cc)
    acts = art["acts"]
    excl = torch.tensor(list(cc.partition.a_exclusive))
    shared = torch.tensor(list(cc.partition.shared))
    # A-exclusive pre-activations do not depend on B at all; shared ones do
    single = iv.pre_activations(view, acts[:, 0], excl)
    joint = iv.pre_activations(view, acts[:, 0], excl, acts[:, 1])
    assert torch.equal(single, joint)
    assert not torch.allclose(iv.pre_activations(view, acts[:, 0], shared), iv.pre_activations(view, acts[:, 0], shared, acts[:, 1]))
    report = iv.compare_encodings(cc, acts, cc.partition)
    assert report["a_exclusive"]["n_features"] == excl.numel()
    assert report["shared"]["rel_l2_error"] > 0
    assert report["exclusive_codes_exact"] is False


def test_single_model_a_exclusive_codes_exact_only_under_per_partition_top_k(art):
    """The engines' encoding (``iv.encode``) on the fixture's activations: a per-partition
    top-k gives A-exclusive codes equal to the joint ones, the joint top-k does not."""
    from guardrail.dictionary import Crosscoder, CrosscoderConfig

    acts, base = art["acts"], art["cc"]
    diffs = {}
    for ke in (None, 2):
        cc = Crosscoder(CrosscoderConfig(**{**base.config.model_dump(), "k_exclusive": ke}), seed=0)
        cc.set_normalization(base.act_mean, base.act_std)
        report = iv.compare_encodings(cc, acts, cc.partition)
        assert report["exclusive_codes_exact"] is (ke is not None)
        assert report["a_exclusive"]["fire_rate_joint"] > 0, "the test needs A-exclusive features that fire"
        diffs[ke] = report["a_exclusive"]["max_abs_diff"]
    assert diffs[2] <= 1e-6 < diffs[None], diffs


def test_alert_fires_exactly_when_threshold_crossed(art):
    cc = art["cc"]
    view = iv.dictionary_view(cc)
    x = art["acts"][:, 0]
    feat = art["a_excl"][0]
    vals = iv.encode(view, x)[:, feat]
    top = float(vals.max())
    row = int(vals.argmax())
    for thr, expect in ((top - 1e-4, True), (top, False), (top + 1e-4, False)):
        pol = _policy([{"id": "a", "action": "alert", "select": {"indices": [feat]}, "threshold": thr}])
        res = compile_policy(pol, cc).apply(x[row : row + 1], _positions(1))
        assert bool(res.events) is expect, (thr, top)
        assert res.rows is None  # alerts never modify the activation
    pol = _policy([{"id": "a", "action": "alert", "select": {"indices": [feat]}, "threshold": 0.0}])
    res = compile_policy(pol, cc).apply(x, _positions(x.shape[0]))
    assert sorted(e["position"] for e in res.events) == (vals > 0).nonzero().squeeze(-1).tolist()


def test_gated_alert_matches_full_encoding_with_top_k_losers(art):
    """The monitor skips tokens whose selected pre-activations stay under the threshold;
    its events must equal the brute-force answer, including tokens where a feature's
    pre-activation is over the threshold but the feature lost the top-k."""
    cc = art["cc"]
    view = iv.dictionary_view(cc)
    x = art["acts"][:, 0]
    idx = torch.arange(view.dict_size)
    f, pre = iv.encode(view, x), iv.pre_activations(view, x, idx)
    losers = ((pre > 0.1) & (f == 0)).any(dim=0).nonzero().squeeze(-1)
    assert losers.numel() > 0, "the test needs features that are over the threshold but not selected"
    feats = torch.cat([losers[:24], torch.tensor(art["a_excl"][:8])]).unique()
    positive = f[:, feats][f[:, feats] > 0]
    for thr in [0.1] + torch.quantile(positive, torch.tensor([0.1, 0.5, 0.9])).tolist():
        pol = _policy([{"id": "w", "action": "alert", "select": {"indices": feats.tolist()}, "threshold": thr}])
        res = compile_policy(pol, cc).apply(x, _positions(x.shape[0]))
        expect = (f[:, feats] > thr).any(dim=-1).nonzero().squeeze(-1).tolist()
        assert sorted(e["position"] for e in res.events) == expect, thr
        cand = iv.alert_candidates(view, x, feats, thr)
        assert bool(cand[expect].all()) and int(cand.sum()) >= len(expect)
        for e in res.events:  # reported features are the fired ones, largest first, with their values
            row = e["position"]
            fired = [[int(i), round(float(f[row, i]), 6)] for i in feats if f[row, i] > thr]
            assert e["features"] == sorted(fired, key=lambda p: -p[1])[: len(e["features"])]


# --------------------------------------------------------------------------- schema
def test_invalid_policy_is_refused_with_field_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\nrules:\n  - id: r\n    action: clamp\n    select: {partition: a_exclusive}\n    value: 1e9\n  - id: s\n    action: steer\n    select: {indices: [1]}\n    alpah: 3\n")
    with pytest.raises(PolicyError) as info:
        Policy.load(bad)
    assert info.value.fields == ["rules[0].value", "rules[1].alpah"]
    assert "line 6" in str(info.value) and "line 10" in str(info.value)
    with pytest.raises(PolicyError, match="rules"):
        Policy.from_yaml("name: p\nrules: []\n")
    with pytest.raises(PolicyError, match="duplicate key"):
        Policy.from_yaml("name: p\nname: q\nrules: []\n")


def test_shipped_policies_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "policies"
    names = {Policy.load(p).name for p in root.glob("*.yaml")}
    assert {"tool-use-amplify", "tool-use-kill-switch", "exclusive-alert"} <= names


def test_ranked_selector_resolves_and_missing_label_is_named(art):
    pol = _policy([{"id": "s", "action": "steer", "select": {"partition": "a_exclusive", "ranked": "tool", "top": 2}, "alpha": 4}])
    compiled = compile_policy(pol, art["path"])
    assert compiled.rules[0].idx.tolist() == art["a_excl"][:2]
    pol = _policy([{"id": "s", "action": "steer", "select": {"ranked": "refusal", "top": 1}, "alpha": 4}])
    with pytest.raises(GuardError, match="refusal"):
        compile_policy(pol, art["path"])


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.sampled_from(["name", "rules", "id", "action", "select", "alpha", "gain", "value", "threshold", "positions", "on_error", "partition", "ranked", "top", "indices", "mode", "telemetry", "layer", "x"])
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=20)
_actions = st.sampled_from(["steer", "amplify", "clamp", "splice", "alert", "abort", "explode"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=st.one_of(
        _values,
        st.fixed_dictionaries({"name": _scalars, "rules": st.lists(st.dictionaries(_keys, _values, max_size=6).map(lambda d: d), max_size=3)}),
        st.fixed_dictionaries({"name": st.just("p"), "rules": st.lists(st.fixed_dictionaries({"id": st.just("r"), "action": _actions}, optional={"select": _values, "alpha": _scalars, "value": _scalars, "threshold": _scalars, "positions": _scalars}), min_size=1, max_size=3)}),
    ),
    garbage=st.text(max_size=40),
)
def test_policy_parser_fuzz(doc, garbage):
    """No input crashes the parser with anything but a PolicyError naming a field."""
    for text in (yaml.safe_dump(doc, allow_unicode=True), garbage, json.dumps(doc, default=str)):
        try:
            Policy.from_yaml(text)
        except PolicyError as exc:
            assert exc.problems and all(isinstance(f, str) and f for f in exc.fields)


# --------------------------------------------------------------------------- engine robustness
def test_nan_is_never_written_and_counted(art):
    cc = art["cc"]
    x = art["acts"][:4, 0]
    compiled = compile_policy(_policy([{"id": "s", "action": "steer", "select": {"indices": art["a_excl"][:4]}, "mode": "additive", "gain": 1.0, "positions": "all"}]), cc)
    view = compiled.view
    dirs = view.dirs_raw.clone()
    dirs[art["a_excl"][0]] = float("nan")
    object.__setattr__(view, "dirs_raw", dirs)
    res = compiled.apply(x, _positions(4))
    assert res.nan_reverted == 4 and compiled.nan_reverted == 4
    assert res.rows is None or torch.isfinite(res.values).all()


def test_on_error_fail_open_and_fail_closed(art, monkeypatch):
    cc = art["cc"]
    x = art["acts"][:3, 0]
    rules = [
        {"id": "boom", "action": "clamp", "select": {"indices": [art["a_excl"][0]]}},
        {"id": "ok", "action": "steer", "select": {"indices": [art["shared"][0]]}, "mode": "additive", "gain": 0.1, "positions": "all"},
    ]
    monkeypatch.setattr(iv, "clamp_delta_encoder", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("solver exploded")))
    res = compile_policy(_policy(rules, on_error="fail-open"), cc).apply(x, _positions(3))
    assert res.errors == 1 and not res.aborted and res.rows is not None  # the other rule still applied
    assert any(e["action"] == "error" and "solver exploded" in e["reason"] for e in res.events)
    res = compile_policy(_policy(rules, on_error="fail-closed"), cc).apply(x, _positions(3))
    assert "r0" in res.aborted and "boom" in res.aborted["r0"]


def test_policy_reload_is_atomic(art, tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(f"name: p\nartifact: {art['path']}\ntelemetry: {{otel: false}}\nrules:\n  - {{id: a, action: alert, select: {{partition: a_exclusive}}}}\n")
    store = PolicyStore()
    first = store.reload("p", good)
    good.write_text("name: p\nrules:\n  - {id: a, action: alert, select: {partition: nowhere}}\n")
    with pytest.raises(PolicyError, match="partition"):
        store.reload("p", good)
    assert store.get("p") is first


def test_telemetry_never_blocks_and_drops_content(tmp_path):
    sink = Telemetry(tmp_path / "a.jsonl", otel=False, queue_size=1)
    sink._queue.put_nowait({"filler": 1})  # queue full: the next emits must drop, not block
    assert sink.emit({"rule": "r", "prompt": "secret"}) is False
    assert sink.dropped == 1
    assert sink.flush()
    sink.emit({"rule": "r", "prompt": "secret", "action": "alert"})
    assert sink.flush()
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert "secret" not in "".join(lines) and json.loads(lines[-1])["rule"] == "r"


# --------------------------------------------------------------------------- transformers engine
def test_hf_guard_last_prompt_only_and_restores(tiny_pair, art):
    a = tiny_pair.a
    ids = a.tokenizer(PROMPTS[:1], return_tensors="pt", add_special_tokens=False).input_ids
    before = read_residual(a.model, 1, ids)
    pol = _policy([{"id": "s", "action": "steer", "select": {"indices": art["shared"][:2]}, "mode": "additive", "gain": 1.0}])
    with guard(a, art["path"], pol, capture=True) as g:
        g.generate(PROMPTS[0], max_new_tokens=3)
        inside = read_residual(a.model, 1, ids)
    changed = (inside - before).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False] * (ids.shape[1] - 1) + [True]  # only the last prompt token
    after = read_residual(a.model, 1, ids)
    assert torch.equal(after, before)
    assert len(g.events) == 2  # the generate prefill + the direct forward, one last token each


def test_hf_guard_clamp_reencodes_to_zero(tiny_pair, art):
    a = tiny_pair.a
    feats = art["a_excl"][:3]
    pol = _policy([{"id": "k", "action": "clamp", "select": {"indices": feats}, "value": 0.0, "positions": "all"}])
    with guard(a, art["path"], pol, capture=True) as g:
        g.generate(PROMPTS[1], max_new_tokens=4)
    view = g.compiled.view
    x = torch.stack([c["activation"] for c in g.captured])
    assert len(g.events) > 0
    assert float(iv.encode(view, x)[:, feats].abs().max()) == 0.0


def test_hf_guard_abort_stops_with_message(tiny_pair, art):
    pol = _policy([{"id": "stop", "action": "abort", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "all", "message": "tool use blocked"}])
    with guard(tiny_pair.a, art["path"], pol) as g:
        res = g.generate(PROMPTS[1], max_new_tokens=6)
    assert res.aborted and "tool use blocked" in res.aborted and res.finish_reason == "guardrail_abort"
    assert len(res.token_ids) <= 1
