"""Feature ranking with two contrasts: tool prompts against ordinary prompts (the paper's) and
against template-matched negatives (same tool template, no tool applies), on the tiny pair."""

from __future__ import annotations

import json

import pytest

from guardrail.features.ranking import Ranking, Rankings, rank, template_negative_rows
from guardrail.policy import GuardError, Policy, PolicyError, compile_policy
from guardrail.prompts import mixed, template_matched
from guardrail.tasks.task import SYSTEM_TEMPLATE

LAYER = 1


@pytest.fixture(scope="module")
def ranked(tiny_pair, tmp_path_factory):
    """Caches of 12 tool + 12 ordinary prompts and of 6 irrelevance + 6 ordinary-under-tools
    prompts (last prompt token, layer 1), a random DFC normalised on the first, both ranked."""
    from guardrail.activations import collect
    from guardrail.dictionary import Crosscoder, DFCConfig, save_artifact
    from guardrail.residual import Site

    root = tmp_path_factory.mktemp("ranking")
    site = Site(layer=LAYER, positions="last_prompt")
    cache = collect(tiny_pair, mixed(12, 12, seed=0), site, root / "cache", progress=False)
    negatives = collect(tiny_pair, template_matched(6, 6, seed=0), site, root / "negatives", progress=False)
    mean, std = cache.stats
    cc = Crosscoder(DFCConfig(dict_size=256, k=8, exclusive=0.1).with_d_model(tiny_pair.d_model), seed=0)
    cc.set_normalization(mean.float(), std.float())
    art = save_artifact(cc, root / "dfc", model_a=cache.manifest.model_a, model_b=cache.manifest.model_b, layer=LAYER)
    return {"art": art, "cache": cache, "negatives": negatives, "rankings": rank(art, cache, negatives_cache=negatives)}


def test_template_matched_prompts_carry_the_tool_template_and_no_tool_prompt():
    items = template_matched(5, 4, seed=0)
    assert len(items) == 9 and not any(p.is_tool for p in items)
    header = SYSTEM_TEMPLATE.split("{tools}")[0]
    assert all(p.text.startswith(header) and p.text.endswith(" </user>") for p in items)
    assert sum(p.id.startswith("irrelevance_") for p in items) == 5 and sum("@tools:" in p.id for p in items) == 4
    # the ordinary prompts are the ones mixed() draws with the same seed, now under a tool list
    plain_texts = {p.text for p in mixed(4, 4, seed=0) if not p.is_tool}
    assert sum(any(t in p.text for t in plain_texts) for p in items) == 4
    assert [p.id for p in template_matched(5, 4, seed=0)] == [p.id for p in items]
    with pytest.raises(ValueError, match="irrelevance prompts"):
        template_matched(10_000)


def test_rank_writes_both_contrasts_and_the_template_one_discounts_template_detectors(ranked):
    rs = Rankings.load(ranked["art"])
    assert rs == ranked["rankings"]
    plain, template = rs.plain, rs.template
    assert (plain.negatives, template.negatives) == ("plain", "template")
    assert plain.n_tool == template.n_tool == 12 and plain.n_plain == 12 and template.n_plain == 12
    # every tool prompt ends with the same "</user>" turn, ordinary prompts do not: the best
    # plain-ranked feature separates them almost perfectly, yet not tool prompts from
    # template-matched negatives, which end the same way
    best = plain.top("tool", n=1)[0]
    assert plain.stat(best).auroc >= 0.9
    assert template.stat(best).auroc < 0.75, (plain.stat(best).auroc, template.stat(best).auroc)
    assert rs.top("tool", n=3, negatives="template") == template.top("tool", n=3)


def test_sidecars_written_before_the_template_contrast_still_load(ranked, tmp_path):
    old = json.loads(ranked["rankings"].plain.model_dump_json())
    del old["negatives"]
    (tmp_path / "ranking.json").write_text(json.dumps(old))
    rs = Rankings.load(tmp_path)
    assert rs.template is None and rs.plain.negatives == "plain"
    assert Ranking.load(tmp_path).top("tool") == ranked["rankings"].plain.top("tool")
    with pytest.raises(KeyError, match="negatives-cache"):
        Ranking.load(tmp_path, "template")


def _select(ranked, select: dict, artifact=None):
    pol = Policy.from_data({"name": "t", "telemetry": {"otel": False}, "rules": [{"id": "r", "action": "alert", "select": select}]})
    return compile_policy(pol, artifact or ranked["art"]).rules[0].idx.tolist()


def test_policies_select_from_the_contrast_they_name(ranked, tmp_path):
    rs = ranked["rankings"]
    assert _select(ranked, {"ranked": "tool", "top": 3}) == rs.plain.top("tool", n=3)
    assert _select(ranked, {"ranked": "tool", "top": 3, "negatives": "template"}) == rs.template.top("tool", n=3)
    assert rs.plain.top("tool", n=3) != rs.template.top("tool", n=3), "the test needs contrasts that rank differently"
    # an artifact ranked without negatives: a template selector is refused, naming the field
    import shutil

    shutil.copytree(ranked["art"], tmp_path / "dfc")
    rank(tmp_path / "dfc", ranked["cache"])
    with pytest.raises(GuardError, match=r"select\.negatives.*negatives-cache"):
        _select(ranked, {"ranked": "tool", "negatives": "template"}, tmp_path / "dfc")
    with pytest.raises(PolicyError, match="negatives only applies with select.ranked"):
        Policy.from_data({"name": "t", "rules": [{"id": "r", "action": "alert", "select": {"partition": "a_exclusive", "negatives": "template"}}]})


def test_negatives_cache_must_match_the_site_and_hold_no_tool_prompt(ranked):
    from guardrail.activations import ActivationCache

    cache, neg = ranked["cache"], ranked["negatives"]
    assert template_negative_rows(cache, neg).shape == (12, 2, cache.manifest.d_model)
    with pytest.raises(ValueError, match="12 tool prompts"):
        template_negative_rows(cache, cache)
    elsewhere = ActivationCache(neg.root, neg.manifest.model_copy(update={"layer": 0}))
    with pytest.raises(ValueError, match="layer 0 != 1"):
        template_negative_rows(cache, elsewhere)


def test_rank_cli_ranks_both_contrasts(ranked, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from guardrail.cli.main import app

    shutil.copytree(ranked["art"], tmp_path / "dfc")
    (tmp_path / "dfc" / "ranking.json").unlink()
    res = CliRunner().invoke(app, ["rank", str(tmp_path / "dfc"), "--cache", str(ranked["cache"].root),
                                   "--negatives-cache", str(ranked["negatives"].root), "--top", "1"])
    assert res.exit_code == 0, res.output
    assert "plain negatives: ranked on 12 tool / 12" in res.output and "template negatives: ranked on 12 tool / 12" in res.output
    assert Rankings.load(tmp_path / "dfc").template == ranked["rankings"].template


def test_collect_cli_collects_template_negatives(tmp_path):
    from typer.testing import CliRunner

    from guardrail.activations import ActivationCache
    from guardrail.cli.main import app

    out = tmp_path / "negatives"
    res = CliRunner().invoke(app, ["collect", "--out", str(out), "--pair", "tiny", "--layer", str(LAYER), "--positions", "last_prompt",
                                   "--prompts", "template-negatives", "--irrelevance", "3", "--plain", "2"])
    assert res.exit_code == 0, res.output
    m = ActivationCache.open(out).manifest
    assert (m.n_prompts, m.n_tool_prompts) == (5, 0)
    bad = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "x"), "--pair", "tiny", "--prompts", "irrelevant"])
    assert bad.exit_code != 0 and "template-negatives" in bad.output
