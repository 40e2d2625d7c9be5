"""``vllm.general_plugins`` entry point: ``vllm serve`` picks guardrail policies from the environment.

vLLM loads general plugins in every process (API server, engine core, workers). When
``GUARDRAIL_POLICY`` (one file) or ``GUARDRAIL_POLICIES`` (``name=file,name=file``) is set,
:func:`register` has the model runner's ``load_model`` followed by installing the guard
(:func:`guardrail.vllm.patches.after_load_model`), so that the guard is on the model right
after the weights are loaded in the worker (no fork of vLLM).

Environment:
    GUARDRAIL_POLICY / GUARDRAIL_POLICIES   policy file(s)
    GUARDRAIL_ARTIFACT                      crosscoder folder (default: each policy's `artifact`)
    GUARDRAIL_DEFAULT_POLICY                policy for requests that name none (default: the first)
    GUARDRAIL_ALLOW_UNGUARDED=1             let a request opt out with guardrail_policy: "none"
    GUARDRAIL_WATCH=0                       disable hot reload of changed policy files
    GUARDRAIL_WATCH_INTERVAL                seconds between checks of the policy files (default 2)
    GUARDRAIL_ALERT_LOG                     one JSONL alert log for every policy (default: each policy's own)

Requests choose a policy through ``vllm_xargs`` / ``extra_args``: ``{"guardrail_policy": name}``.

Once the guard is installed, a daemon thread of the worker copies its hook-error total into
the ``guardrail_hook_errors_total`` Prometheus counter every second (the hook itself only
adds to an integer); the other counters are kept by the telemetry writer thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from guardrail.policy.watch import DEFAULT_INTERVAL

log = logging.getLogger("guardrail.vllm")


def register() -> None:
    """Called by vLLM's plugin loader; a no-op unless a policy is configured."""
    from guardrail.vllm.patches import after_load_model

    cfg = env_config()
    if cfg is None:
        return
    after_load_model(lambda runner: _install_from_env(runner, cfg))


def env_config() -> dict[str, Any] | None:
    """Guard settings for ``vllm serve`` from the environment (the variables above)."""
    from guardrail.policy.schema import Policy
    from guardrail.vllm.requests import NO_POLICY

    spec = os.environ.get("GUARDRAIL_POLICIES") or os.environ.get("GUARDRAIL_POLICY")
    if not spec:
        return None
    policies: dict[str, str] = {}
    for part in spec.split(os.pathsep if os.pathsep in spec else ","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            name, path = part.split("=", 1)
        else:
            path = part
            name = Policy.load(path).name
        policies[name.strip()] = path.strip()
    default = os.environ.get("GUARDRAIL_DEFAULT_POLICY") or next(iter(policies))
    return {
        "policies": policies,
        "artifact": os.environ.get("GUARDRAIL_ARTIFACT") or None,
        "default": default if default != NO_POLICY else None,
        "allow_none": os.environ.get("GUARDRAIL_ALLOW_UNGUARDED", "0") == "1",
        "watch": os.environ.get("GUARDRAIL_WATCH", "1") == "1",
        "watch_interval": float(os.environ.get("GUARDRAIL_WATCH_INTERVAL", DEFAULT_INTERVAL)),
        "alert_log": os.environ.get("GUARDRAIL_ALERT_LOG") or None,
    }


def _install_from_env(runner: Any, cfg: dict[str, Any]) -> None:
    """Worker side, once the weights are loaded: the configured policies, unless a guard is already there."""
    from guardrail.vllm.driver import install_on_runner
    from guardrail.vllm.worker import guard_of

    if guard_of(runner) is not None:
        return
    specs = [(name, path, cfg["artifact"]) for name, path in cfg["policies"].items()]
    names = install_on_runner(runner, specs, cfg["default"], cfg["allow_none"], False, cfg["watch"], cfg["watch_interval"], cfg["alert_log"])
    log.warning("guardrail: installed policies %s (default %s)", names, cfg["default"])
    start_hook_error_counter(guard_of(runner))


def start_hook_error_counter(guard, interval: float = 1.0) -> threading.Thread:
    """Publish ``guard.stats["hook_errors"]`` as ``guardrail_hook_errors_total`` from a daemon thread.

    The counters are made here, at install, so that ``/metrics`` lists them at zero from the start.
    """
    from guardrail.policy.telemetry import HookErrorCounter, counters

    counters()
    counter = HookErrorCounter()

    def run() -> None:
        while True:
            counter.update(guard.stats.get("hook_errors", 0))
            time.sleep(interval)

    thread = threading.Thread(target=run, name="guardrail-hook-errors", daemon=True)
    thread.start()
    return thread
