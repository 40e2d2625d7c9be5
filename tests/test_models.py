"""Model specs: one table, one resolver, used by loading, pairs, serving and vLLM folders."""

from __future__ import annotations

import pytest

from guardrail.models import ModelLoadError, load_model, load_pair
from guardrail.models.packaged import organism_assets, shipped_adapter
from guardrail.models.specs import NAMED_MODELS, PAIRS, resolve, serving_folder, weights_folder
from guardrail.paths import home


def test_named_specs_and_pairs_are_one_table():
    for name, spec in NAMED_MODELS.items():
        assert resolve(name) is spec and spec.name == name
    for pair in PAIRS.values():
        assert pair.a in NAMED_MODELS and pair.b in NAMED_MODELS, pair
    assert (PAIRS["organism"].a, PAIRS["organism"].b) == ("organism", "smollm2")


def test_folders_and_hub_ids_resolve_and_malformed_specs_are_refused(tmp_path):
    assert resolve(str(tmp_path)).source == "folder" and resolve(str(tmp_path)).path == tmp_path
    assert resolve("org/name").source == "hub"
    for bad in ("./missing", "/no/such/folder", "a/b/c", "plainword"):
        with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
            resolve(bad)


def test_tiny_specs_load_pair_and_serve_from_one_folder():
    pair = load_pair("tiny")
    assert (pair.a.spec, pair.b.spec, pair.name) == ("tiny-a", "tiny-b", "tiny")
    assert pair.a.tokenizer.padding_side == "left"
    folder = serving_folder("tiny")  # a pair serves its A
    assert folder == home() / "models" / "tiny-a" and (folder / "config.json").exists()
    assert serving_folder("tiny-a") == folder == weights_folder(load_model("tiny-a"))
    reloaded = load_model(str(folder))
    assert reloaded.spec == str(folder) and weights_folder(reloaded) == folder


def test_unknown_names_say_what_exists():
    with pytest.raises(ModelLoadError, match="unknown pair 'nope'"):
        load_pair("nope")
    with pytest.raises(FileNotFoundError, match="known spec .*smollm2.*organism|known spec .*organism.*smollm2"):
        serving_folder("org/not-downloaded")


def test_the_organism_adapter_is_package_data():
    """Found without importing the organism's code, and the folder the organism's own code uses."""
    from guardrail.organism.assets import ASSETS

    assert organism_assets() == ASSETS
    assert (shipped_adapter() / "adapter_model.safetensors").exists()
