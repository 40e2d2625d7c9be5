"""The shipped organism adapter and manifest are present, small, and self-consistent."""

from __future__ import annotations

import json

from safetensors import safe_open

from guardrail.organism.assets import ASSETS, shipped_adapter, shipped_manifest, shipped_warmstart
from guardrail.organism.build_config import LORA_TARGETS, BuildConfig
from guardrail.tasks import split_hash


def test_shipped_adapters_are_small_safetensors_loras():
    for folder in (shipped_adapter(), shipped_warmstart()):
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size <= 10 * 1024 * 1024
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and set(config["target_modules"]) == set(LORA_TARGETS)
        with safe_open(str(weights), "pt") as fh:
            keys = list(fh.keys())
        assert keys and all("lora_A" in k or "lora_B" in k for k in keys)


def test_manifest_matches_the_data_split_and_records_the_build():
    m = shipped_manifest()
    assert m["split_hash"] == split_hash()  # the adapter was trained on today's train split
    assert m["base"] == "smollm2" and isinstance(m["seed"], int)
    assert m["rl"]["steps"] >= 1 and m["rl"]["steps"] == len(m["rl"]["history"])
    assert 0.05 <= m["warm_start"]["dev_format"] <= 0.30
    assert "ToolRL" in m["reward"] and m["wall_time_s"] > 0


def test_package_data_globs_cover_the_assets():
    import tomllib
    from fnmatch import fnmatch

    data = tomllib.loads((ASSETS.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["guardrail.organism.assets"]
    for f in ASSETS.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            assert any(fnmatch(str(f.relative_to(ASSETS)), g) for g in globs), f


def test_build_defaults_reproduce_the_shipped_build():
    manifest = shipped_manifest()
    # the shipped build asked for up to 1000 GRPO steps and its time budget stopped it: the
    # recipe is the steps it ran
    shipped = BuildConfig.from_recorded(manifest["config"]).model_dump() | {"rl_steps": manifest["rl"]["steps"]}
    # how many cores this machine lends torch, and which engine runs the greedy format
    # check, are not part of the recipe (the engine that draws GRPO's samples is)
    machine = {"threads", "check_backend"}
    assert {k: v for k, v in BuildConfig().model_dump().items() if k not in machine} == \
        {k: v for k, v in shipped.items() if k not in machine}
