"""The build's typed records read the shipped manifest as written, and older manifests as the builds they were."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from guardrail.organism.assets import ASSETS, shipped_manifest, trained_turn
from guardrail.organism.build_config import BuildConfig
from guardrail.organism.manifest import BuildManifest, GRPOStep, RLRecord, RLSegment, WarmStartRecord
from guardrail.tasks import split_hash


def test_the_shipped_manifest_parses_and_round_trips():
    raw = shipped_manifest()
    m = BuildManifest.model_validate(raw)
    assert m.dump() == raw  # written back, it is the file: nothing dropped, nothing added
    # what the rest of the package reads of it: the split (fresh-clone check), the trained turn
    # (organism eval, the phenomenon page), the recipe and its histories (organism info, the asset tests)
    assert m.split_hash == raw["split_hash"] == split_hash()
    assert m.config.user_turn == raw["config"]["user_turn"] == trained_turn()
    assert (m.base, m.seed, m.rl.steps, len(m.rl.history)) == (raw["base"], raw["seed"], raw["rl"]["steps"], len(raw["rl"]["history"]))
    assert m.rl.selected is not None and m.rl.selected.step == raw["rl"]["selected"]["step"]
    assert m.warm_start.dev_format == raw["warm_start"]["dev_format"] == m.metrics.dev_format_warmstart
    assert m.metrics.test is not None and m.metrics.test["A"] == raw["metrics"]["test"]["A"]
    assert BuildManifest.read(ASSETS) == m


def test_the_shipped_warm_start_record_is_the_manifests():
    assert WarmStartRecord.read(ASSETS / "warmstart") == BuildManifest.read(ASSETS).warm_start


def _older_manifest() -> dict:
    """The shipped manifest as a build before the Legacy fields, the selection and segments would have written it."""
    raw = copy.deepcopy(shipped_manifest())
    for name in BuildConfig.legacy_values():
        del raw["config"][name]
    raw["config"]["a_field_since_removed"] = 1
    del raw["rl"]["selected"], raw["metrics"]["test"], raw["metrics"]["dev_names_A"]
    return raw


def test_an_older_manifest_reads_each_missing_field_as_builds_ran_before_it():
    m = BuildManifest.model_validate(_older_manifest())
    assert m.config.model_dump() == BuildConfig.from_recorded(_older_manifest()["config"]).model_dump()
    assert (m.config.guide_when, m.config.length_slack, m.config.rl_repeat, m.config.user_turn) == ("no_variance", None, {}, "toolrl")
    assert m.config.rl_lr == shipped_manifest()["config"]["rl_lr"]  # recorded fields are kept
    assert "selected" not in m.dump()["rl"] and "test" not in m.dump()["metrics"]


def test_continuing_a_build_adds_a_segment_for_each_run():
    previous = BuildManifest.model_validate(_older_manifest())
    cfg = BuildConfig(resume_rl="runs/organism", rl_steps=2)
    step = GRPOStep(step=108, reward=1.0, sample_format=1.0, groups_updated=2, groups_guided=1, seconds=30.0)
    more = RLRecord(steps=1, prompts_seen=2, groups_guided=1, groups_updated=2, history=[step], seconds=30.0)
    rl = previous.rl_continued_by(more, cfg)
    assert (rl.steps, rl.prompts_seen, rl.history[-1]) == (previous.rl.steps + 1, previous.rl.prompts_seen + 2, step)
    first, added = rl.segments
    assert first.steps == previous.rl.steps and first.guide_when == "no_variance"  # the older build's own recipe
    assert added.model_dump(include=set(BuildConfig.segment_fields())) == cfg.model_dump(include=set(BuildConfig.segment_fields()))
    assert added.resumed_from == "runs/organism" and added.adam_restarted and first.resumed_from is None
    again = previous.model_copy(update={"rl": rl}).rl_continued_by(more, cfg)
    assert [s.steps for s in again.segments] == [previous.rl.steps, 1, 1]  # recorded segments are kept, not rebuilt
    written = json.loads(json.dumps(rl.dump()))["segments"]
    assert "resumed_from" not in written[0] and written[1]["adam_restarted"]  # a resume's origin only where there was one


def test_segments_hold_the_per_segment_fields_and_read_old_ones_with_legacy_values():
    run = {"steps", "seconds", "resumed_from", "adam_restarted"}
    assert set(RLSegment.model_fields) == run | set(BuildConfig.segment_fields())
    # a segment of the first continued builds recorded only these
    old = {"steps": 50, "seconds": 1.0, "rl_lr": 3e-4, "rl_prompts_per_step": 2, "num_generations": 8, "max_new_tokens": 96,
           "temperature": 1.0, "guidance": True, "threads": 2}
    seg = RLSegment.model_validate(old)
    assert seg.guide_when == "no_variance" and seg.rl_repeat == {} and seg.length_slack is None
    with pytest.raises(ValidationError, match="rl_lr"):
        RLSegment.model_validate({k: v for k, v in old.items() if k != "rl_lr"})  # a field every segment had


def test_records_reject_unknown_keys():
    raw = copy.deepcopy(shipped_manifest())
    raw["rl"]["stepz"] = 1
    with pytest.raises(ValidationError, match="stepz"):
        BuildManifest.model_validate(raw)
