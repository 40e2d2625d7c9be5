import subprocess
import sys
import textwrap

import pytest
import torch

from guardrail.activations import ActivationCache, CacheError, collect
from guardrail.prompts import PromptItem
from guardrail.residual import Site

PROMPTS = [PromptItem(id=f"p{i}", text=("call a tool " if i % 2 else "tell me a story ") * (1 + i % 3), is_tool=bool(i % 2)) for i in range(10)]
SITE = Site(layer=1, positions="prompt", last_n=4)


def test_collect_rows_and_stats(tiny_pair, tmp_path):
    cache = collect(tiny_pair, PROMPTS, SITE, tmp_path / "c", batch_size=3, shard_prompts=4, progress=False)
    data = cache.load()
    assert data.acts.shape[1:] == (2, 128)
    assert int(data.is_last.sum()) == len(PROMPTS)
    assert len(data) == 4 * len(PROMPTS)  # every prompt is longer than 4 tokens
    mean, std = cache.stats
    torch.testing.assert_close(mean, data.acts.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, data.acts.std(0), rtol=1e-3, atol=1e-5)
    assert data.is_tool[data.is_last].sum() == 5


def test_early_exit_equals_full_forward(tiny_pair, tmp_path):
    cache = collect(tiny_pair, PROMPTS, Site(layer=0), tmp_path / "c", progress=False)
    data = cache.load()
    tok = tiny_pair.tokenizer
    from guardrail.residual.hf import position_ids_for

    for i in (0, 7):
        row = (data.prompt_idx == i).nonzero().item()
        enc = tok([PROMPTS[i].text], return_tensors="pt", add_special_tokens=False)
        out = tiny_pair.b.model(**enc, position_ids=position_ids_for(enc["attention_mask"]), output_hidden_states=True)
        torch.testing.assert_close(data.acts[row, 1], out.hidden_states[1][0, -1], rtol=1e-4, atol=1e-5)


def test_resume_rejects_other_collection(tiny_pair, tmp_path):
    collect(tiny_pair, PROMPTS, SITE, tmp_path / "c", shard_prompts=4, progress=False)
    with pytest.raises(CacheError, match="data_hash"):
        collect(tiny_pair, PROMPTS[:5], SITE, tmp_path / "c", shard_prompts=4, progress=False)


def test_tampered_shard_is_refused(tiny_pair, tmp_path):
    cache = collect(tiny_pair, PROMPTS, SITE, tmp_path / "c", shard_prompts=4, progress=False)
    shard = tmp_path / "c" / cache.manifest.shards[0].name
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="sha256"):
        ActivationCache.open(tmp_path / "c").load()


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from guardrail.activations import cache as cache_mod, collect
    from guardrail.models import load_pair
    from guardrail.prompts import PromptItem
    from guardrail.residual import Site
    calls = {"n": 0}
    original = cache_mod.ActivationCache.save_manifest
    def save_then_die(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 3:  # initial manifest + 2 shards recorded
            open(os.path.join(sys.argv[1], "shard_00002.safetensors.partial"), "wb").write(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
    cache_mod.ActivationCache.save_manifest = save_then_die
    prompts = [PromptItem(id=f"p{i}", text=("call a tool " if i % 2 else "tell me a story ") * (1 + i % 3), is_tool=bool(i % 2)) for i in range(10)]
    collect(load_pair("tiny"), prompts, Site(layer=1, positions="prompt", last_n=4), sys.argv[1], shard_prompts=3, progress=False)
    """
)


def test_kill9_then_resume_equals_uninterrupted(tiny_pair, tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(ActivationCache.open(killed).manifest.shards) == 2
    resumed = collect(tiny_pair, PROMPTS, SITE, killed, shard_prompts=3, progress=False)
    clean = collect(tiny_pair, PROMPTS, SITE, tmp_path / "clean", shard_prompts=3, progress=False)
    assert not list(killed.glob("*.partial"))
    a, b = resumed.load(), clean.load()
    assert torch.equal(a.acts, b.acts) and torch.equal(a.prompt_idx, b.prompt_idx)
    assert resumed.manifest.complete
