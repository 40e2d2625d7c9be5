"""guardrail eval phenomenon: its pieces on known numbers, and the whole run on the tiny pair."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from page_checks import assert_readable

from guardrail.eval.phenomenon import alert, kill, reference, steer
from guardrail.eval.phenomenon.outputs import OutputStore
from guardrail.eval.phenomenon.report import criteria
from guardrail.eval.scoring import degenerate
from guardrail.eval.suites import EvalItem


def test_dialogue_turn_is_the_question_as_one_dialogue_line():
    from guardrail.tasks import load_tasks
    from guardrail.tasks.task import USER_SUFFIX

    task = load_tasks("test", ("simple_python",))[0]
    assert task.user_text("dialogue") == "User: " + task.user.strip()
    raw = task.render(None, "raw", "dialogue")
    assert raw == task.system_text() + "\nUser: " + task.user.strip()
    assert USER_SUFFIX not in raw and "<user>" not in raw


@pytest.mark.parametrize("text, expected", [
    ("", True),
    ("   \n", True),
    ("<user_response> " * 40, True),
    ("The user's request can be handled. " * 10, True),
    ('<think> The user wants the area. </think>\n<tool_call>\n{"name": "area", "parameters": {"r": 2}}\n</tool_call>', False),
    ("\n".join(['{"name": "calc", "parameters": {"a": %d}}' % i for i in range(4)]), False),
    ("A plain answer that says what the weather will be like tomorrow in Paris.", False),
])
def test_degenerate(text, expected):
    assert degenerate(text) is expected


def test_norm_matched_keeps_every_rows_norm_and_zero_rows():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    out = steer.norm_matched(delta, torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -5.0]]))
    assert torch.allclose(out.norm(dim=-1), delta.norm(dim=-1))
    assert torch.equal(out[1], torch.zeros(2))
    assert torch.allclose(out[2], torch.tensor([0.0, -1.0]))
    single = steer.norm_matched(delta, torch.tensor([0.0, 2.0]))  # one direction for every row
    assert torch.allclose(single, torch.tensor([[0.0, 5.0], [0.0, 0.0], [0.0, 1.0]]))


def _gain(tc: float, name: float) -> dict:
    return {"tool_correctness": steer.Gain(0, 0, tc, (0, 0), 0, 0, 1.0), "name_correct": steer.Gain(0, 0, name, (0, 0), 0, 0, 1.0)}


def test_choose_maximises_the_weaker_gain_and_prefers_scale_then_the_gentler_setting():
    scale, add = (lambda a: steer.Setting("scale", a)), (lambda g: steer.Setting("additive", g))
    dev = {(7, scale(6.0)): _gain(30, 5), (7, scale(16.0)): _gain(25, 20), (7, scale(32.0)): _gain(40, 20),
           (7, scale(64.0)): _gain(-10, 50), (9, add(0.25)): _gain(20, 20), (9, add(1.0)): _gain(19, 60)}
    assert steer.choose(dev) == (7, scale(16.0))  # α 16, α 32 and g 0.25 tie at min 20: scale first, then the smaller α
    dev[(9, add(0.5))] = _gain(21, 22)
    assert steer.choose(dev) == (9, add(0.5))


def test_random_direction_artifact_changes_one_decoder_row_and_keeps_the_additive_norm(tmp_path):
    from guardrail.dictionary import Crosscoder, DFCConfig, load_artifact, save_artifact
    from guardrail.features.interventions import dictionary_view
    from guardrail.features.ranking import RANKING_FILE

    cc = Crosscoder(DFCConfig(dict_size=32, k=4, exclusive=0.25).with_d_model(8), seed=0)  # features 0-7 A-exclusive
    art = save_artifact(cc, tmp_path / "dfc", model_a="a", model_b="b", layer=1)
    (art / RANKING_FILE).write_text("{}")
    ctl = steer.random_direction_artifact(art, 2, seed=0, out=tmp_path / "ctl")
    a, b = dictionary_view(load_artifact(art)), dictionary_view(load_artifact(ctl))
    assert torch.equal(a.dirs_raw[3:], b.dirs_raw[3:]) and not torch.allclose(a.dirs_raw[2], b.dirs_raw[2])
    unit = steer.random_directions(1, 8, 0)[0]
    assert torch.allclose(b.dirs_raw[2] / b.dirs_raw[2].norm(), unit / unit.norm(), atol=1e-6)
    x = torch.randn(3, 8)
    same = steer.Setting("additive", 0.5)
    assert torch.allclose(steer.feature_delta(a, x, x, 2, same).norm(dim=-1), steer.feature_delta(b, x, x, 2, same).norm(dim=-1))
    assert steer.random_direction_artifact(art, 2, seed=0, out=tmp_path / "ctl") == ctl  # made once


def test_direction_artifact_writes_the_given_direction_and_conditions_carry_the_reference_at_the_steers_norm(tmp_path):
    from guardrail.dictionary import Crosscoder, DFCConfig, load_artifact, save_artifact
    from guardrail.features.interventions import dictionary_view
    from guardrail.features.ranking import RANKING_FILE

    cc = Crosscoder(DFCConfig(dict_size=32, k=4, exclusive=0.25).with_d_model(8), seed=0)
    art = save_artifact(cc, tmp_path / "dfc", model_a="a", model_b="b", layer=1)
    (art / RANKING_FILE).write_text("{}")
    want = torch.arange(8.0) - 3.0
    view = dictionary_view(load_artifact(steer.direction_artifact(art, 1, want, "a test direction", tmp_path / "ref")))
    assert torch.allclose(view.dirs_raw[1] / view.dirs_raw[1].norm(), want / want.norm(), atol=1e-6)
    a = dictionary_view(load_artifact(art))
    x = torch.randn(5, 8) * 3
    deltas = steer.conditions(a, x, x, 1, 2, 16.0, 0, reference=want)
    head, ref = deltas["steer-single"], deltas[steer.REFERENCE]
    assert torch.allclose(ref.norm(dim=-1), head.norm(dim=-1), atol=1e-5)
    on = head.norm(dim=-1) > 0
    assert torch.allclose(ref[on] / ref[on].norm(dim=-1, keepdim=True), (want / want.norm()).expand(int(on.sum()), -1), atol=1e-5)
    assert steer.REFERENCE not in steer.conditions(a, x, x, 1, 2, 16.0, 0)


def test_probe_ceiling_reads_a_linear_label_and_not_noise():
    from guardrail.eval.phenomenon.errors import NotMeasurable

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    label = x[:, 3] + 0.5 * x[:, 7] > 0
    found = reference.probe_ceiling(x[:100], label[:100], x[100:], label[100:])
    assert found.auroc > 0.95 and found.dev_cv_auroc > 0.9 and found.n_dev == 100
    assert found.roc["fpr"][0] == 0 and found.roc["tpr"][-1] == 1
    noise = reference.probe_ceiling(x[:100], torch.rand(100, generator=g) > 0.5, x[100:], torch.rand(100, generator=g) > 0.5)
    assert abs(noise.auroc - 0.5) < 0.15
    with pytest.raises(NotMeasurable, match="at least 5"):
        reference.probe_ceiling(x[:20], torch.arange(20) < 3, x[20:40], label[20:40])
    d = reference.call_direction(x[:100], label[:100])
    assert torch.allclose(d, x[:100][label[:100]].mean(0) - x[:100][~label[:100]].mean(0))


def test_additive_policy_is_a_valid_amplify_rule_at_every_token():
    rule = steer.additive_policy("steer", 5, 0.5).rules[0]
    assert (rule.action, rule.mode, rule.gain, rule.positions, rule.select.indices) == ("amplify", "additive", 0.5, "all", [5])


class _Ranking:
    """A stand-in with the two things the selectors read: features and a tool order."""

    def __init__(self, rows):
        from types import SimpleNamespace

        self.features = [SimpleNamespace(index=row[0], partition=row[1], fire_rate_tool=row[2], fire_rate_plain=row[3] if len(row) > 3 else 0.0)
                         for row in rows]
        self._tool = [row[0] for row in rows if row[1] == "a_exclusive" and row[2] > 0]

    def top(self, label, partition=None, n=None):
        return self._tool[:n]


def test_controls_are_live_a_exclusive_features_outside_the_top_three():
    rows = [(0, "a_exclusive", 0.9), (1, "a_exclusive", 0.8), (2, "a_exclusive", 0.7), (3, "a_exclusive", 0.5),
            (4, "a_exclusive", 0.0), (5, "shared", 0.9), (6, "a_exclusive", 0.02)]
    ranking = _Ranking(rows)
    picks = {steer.control_feature(ranking, seed) for seed in range(20)}
    assert picks == {3, 6}
    assert kill.random_live_features(ranking, 2, 0) == [3, 6]
    with pytest.raises(Exception, match="only 2 live"):
        kill.random_live_features(ranking, 3, 0)


def test_youden_threshold_and_roc():
    score = np.array([0.0, 0.0, 0.2, 0.9, 1.5, 2.0])
    label = np.array([False, False, False, True, True, True])
    cut = alert.youden_threshold(score, label)
    assert 0.2 < cut < 0.9
    fpr, tpr = alert.roc_points(score, label)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert tpr[3] == 1.0 and fpr[3] == 0.0  # all three positives before any negative
    choice = alert.choose(torch.tensor(score)[:, None].float(), torch.tensor(label), [0])
    assert choice.dev_auroc == pytest.approx(1.0) and choice.feature == 0


def test_alarm_needs_calls_and_non_calls():
    from guardrail.eval.phenomenon.errors import NotMeasurable

    with pytest.raises(NotMeasurable, match="0 calls"):
        alert.choose(torch.rand(4, 3), torch.zeros(4, dtype=torch.bool), [0, 1])


def test_kill_candidates_add_the_specific_set_only_when_it_differs():
    ranking = _Ranking([(0, "a_exclusive", 1.0, 1.0), (1, "a_exclusive", 0.2, 0.0), (2, "a_exclusive", 0.1, 0.3), (3, "a_exclusive", 0.1, 0.05),
                        (4, "a_exclusive", 0.1, 0.0)])
    assert kill.candidates(ranking) == {"ranked": [0, 1, 2], "specific": [1, 3, 4]}
    assert kill.candidates(_Ranking([(0, "a_exclusive", 0.5, 0.0), (1, "a_exclusive", 0.2, 0.0)])) == {"ranked": [0, 1]}


def test_kill_choice_takes_the_strongest_intact_set_else_the_least_broken():
    dev = {"ranked": kill.DevKill([0], 50, 0.05, 0.6), "specific": kill.DevKill([1], 50, 0.7, 0.02)}
    assert kill.choose(dev) == "specific"  # ranked stops more calls, but by breaking A
    dev["third"] = kill.DevKill([2], 50, 0.3, 0.1)
    assert kill.choose(dev) == "third"
    assert kill.choose({"a": kill.DevKill([0], 5, 0.0, 0.5), "b": kill.DevKill([1], 5, 0.0, 0.3)}) == "b"


def _row(i, call, degen=0):
    return {"id": f"t{i}", "output": f"out{i}", "tool_call": int(call), "degenerate": degen}


def test_kill_result_counts_only_prompts_where_clean_a_calls():
    clean = [_row(0, 1), _row(1, 1), _row(2, 0), _row(3, 1)]
    clamped = [_row(0, 0, 1), _row(1, 0), _row(2, 1), _row(3, 1)]
    control = [_row(0, 1), _row(1, 1), _row(2, 0), _row(3, 0)]
    res = kill.KillResult.of(clean, clamped, control, [7], [9])
    assert (res.n, res.n_prompts) == (3, 4)
    assert res.call_rate_clean == 1.0 and res.call_rate_clean_all == 0.75
    assert res.call_rate_clamped == pytest.approx(1 / 3) and res.call_rate_random_clamp == pytest.approx(2 / 3)
    assert res.degenerate_rate == pytest.approx(1 / 3)
    dev = kill.DevKill.of(clean, clamped, [7])
    assert (dev.n, dev.call_rate_clamped, dev.degenerate_rate) == (3, pytest.approx(1 / 3), pytest.approx(1 / 3))


class _CountingBackend:
    name = "counting"

    def __init__(self):
        self.calls = 0

    def prompts_per_chunk(self, loaded, prompts, settings, n_conditions):
        return len(prompts)

    def generate(self, loaded, prompts, settings, *, layer=None, patches=None):
        self.calls += 1
        return [f"{p}:{'p' if patches is not None and patches[i] is not None else 'c'}" for i, p in enumerate(prompts)]


def test_output_store_generates_each_condition_once_and_refuses_other_prompts(tmp_path):
    from guardrail.generation import GenerationSettings

    backend = _CountingBackend()
    store = OutputStore(tmp_path, backend, None, GenerationSettings(max_new_tokens=2), 0, say=lambda _: None, clean_folder=tmp_path / "clean")
    items = [EvalItem("a", "tool", "x"), EvalItem("b", "tool", "y")]
    out = store.patched(items, {"clean": None, "patched": [torch.zeros(2), None]})
    assert out == {"clean": ["x:c", "y:c"], "patched": ["x:p", "y:c"]}
    calls = backend.calls
    assert store.patched(items, {"clean": None, "patched": [torch.zeros(2), None]}) == out and backend.calls == calls
    assert [p.name.split("-")[0] for p in (tmp_path / "clean").glob("*.json")] == ["clean"]  # unpatched: beside the activations
    another_dfc = OutputStore(tmp_path / "dfc2", backend, None, GenerationSettings(max_new_tokens=2), 0, say=lambda _: None,
                              clean_folder=tmp_path / "clean")
    assert another_dfc.patched(items, {"clean": None}) == {"clean": out["clean"]} and backend.calls == calls
    other = [EvalItem("c", "tool", "z")]  # another sample: its own file, the first one untouched
    assert store.patched(other, {"clean": None}) == {"clean": ["z:c"]}
    assert store.patched(items, {"clean": None}) == {"clean": out["clean"]}
    path = next(p for p in (tmp_path / "clean").glob("clean-*.json") if json.loads(p.read_text())["ids"] == ["c"])
    path.write_text(json.dumps({"ids": ["x"], "outputs": ["?"]}))  # a file that does not hold what its name says
    with pytest.raises(ValueError, match="other prompts"):
        store.patched(other, {"clean": None})
    with pytest.raises(ValueError, match="plain file name"):
        store.patched(items, {"../escape": None})


def _passing_result() -> dict:
    gain = {"tool_correctness_gain_pp": 30.0, "tool_correctness_ci_pp": [12.0, 45.0], "strict_name_gain_pp": 24.0, "strict_name_ci_pp": [8.0, 38.0],
            "control_random_direction_gain_pp": 2.0, "control_random_direction_strict_gain_pp": 1.0,
            "control_random_feature_gain_pp": 3.0, "control_random_feature_strict_gain_pp": 0.0, "n": 120}
    return {
        "hedge": {"n": 120, "format_rate_clean": 0.3, "chat_n": 120, "chat_strict_name_accuracy": 0.65},
        "steer": gain,
        "kill_switch": {"n": 100, "call_rate_clean": 1.0, "call_rate_clamped": 0.2, "call_rate_random_clamp": 0.95, "degenerate_rate": 0.04},
        "alert": {"auroc": 0.93, "n_pos": 40, "n_neg": 80, "fpr_ordinary": 0.02, "n_ordinary": 200},
    }


def test_criteria_hold_on_passing_numbers_and_fail_on_each_miss():
    res = _passing_result()
    assert all(c.holds for c in criteria(res))
    res["steer"]["control_random_feature_gain_pp"] = 11.0  # above a third of the 24 pp strict gain
    res["hedge"]["format_rate_clean"] = 0.55
    failed = [c.claim for c in criteria(res) if not c.holds]
    assert failed == ["hedge: A's clean format rate under the hedge protocol",
                      "steer: controls at the same ‖δ‖ (random direction; random live A-exclusive feature)"]


def test_a_section_not_measured_fails_all_its_bars_with_the_reason():
    res = _passing_result()
    res["kill_switch"] = {"not_measured": "A calls a tool on none of the 4 test prompts"}
    rows = [c for c in criteria(res) if c.claim.startswith("kill switch")]
    assert len(rows) == 3 and not any(c.holds for c in rows)
    assert all("none of the 4" in c.measured for c in rows)


def test_phenomenon_runs_end_to_end_on_the_tiny_pair(tiny_pair, tmp_path):
    """The whole run on a pair with no phenomenon: every section is measured or says why not,
    and the page and strict JSON are written."""
    from guardrail.eval.phenomenon import PhenomenonConfig, run_phenomenon
    from guardrail.eval.phenomenon.artifact import DictionaryRecipe
    from guardrail.eval.phenomenon.report import write_report

    recipe = DictionaryRecipe(tool_prompts=8, plain_prompts=8, last_n=4, steps=20, batch_size=32, dict_size=256, k=24, exclusive=0.25)
    cfg = PhenomenonConfig(pair="tiny", recipe=recipe, backend="transformers", max_new_tokens=3, alphas=(16.0,), gains=(0.5,),
                           ordinary_prompts=4, test_prompts=4, dev_prompts=4, irrelevance_prompts=4)
    res = run_phenomenon(cfg, say=lambda _: None, pair=tiny_pair)
    assert res["adapter_sha256"] is None and res["model_a"] == tiny_pair.a.spec
    assert res["hedge"]["n"] == 4 and res["protocol"]["hedge"]["turn"] == "dialogue"
    steer_res = res["steer"]
    if "not_measured" not in steer_res:
        assert (steer_res["mode"], steer_res["strength"]) in {("scale", 16.0), ("additive", 0.5)}
        joint = {"steer-joint"} if steer_res["mode"] == "scale" else set()
        assert set(steer_res["conditions"]) == {"steer-single", "random-direction", "random-feature"} | joint
        assert steer_res["n"] == 4 and [(c["mode"], c["strength"]) for c in steer_res["dev_curve"]] == [("scale", 16.0), ("additive", 0.5)]
        assert set(steer_res["candidates"]) == {"ranked"}  # the tiny A never calls: no feature predicts a call
    # the tiny A never writes a call: nothing to switch off, no call for the alarm to predict
    assert "none of the 4" in res["kill_switch"]["not_measured"]
    assert "0 calls" in res["alert"]["not_measured"]
    paths = write_report(res, tmp_path / "page")
    json.loads(paths["results"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    md = paths["markdown"].read_text()
    assert "bars hold" in md and "Not measured: A calls a tool on none" in md
    assert_readable(paths["html"].read_text(), md)
    assert not math.isnan(res["hedge"]["format_rate_clean"])

