"""``vllm.general_plugins`` entry point: ``vllm serve`` picks guardrail policies from the environment.

vLLM loads general plugins in every process (API server, engine core, workers). When
``GUARDRAIL_POLICY`` (one file) or ``GUARDRAIL_POLICIES`` (``name=file,name=file``) is set,
:func:`register` wraps the model runner's ``load_model`` so that, right after the weights
are loaded in the worker, the guard is installed on the model (no fork of vLLM).

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
import threading
import time

log = logging.getLogger("guardrail.vllm")
_PATCHED = "_guardrail_patched"


def register() -> None:
    """Called by vLLM's plugin loader; a no-op unless a policy is configured."""
    from guardrail.residual.vllm_guard import env_config

    cfg = env_config()
    if cfg is None:
        return
    for cls in _runner_classes():
        if cls.__dict__.get(_PATCHED, False) or "load_model" not in cls.__dict__:  # not getattr: subclasses inherit the flag
            continue
        cls.load_model = _wrap_load_model(cls.load_model, cfg)
        setattr(cls, _PATCHED, True)


def _runner_classes() -> list[type]:
    classes = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"), ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            mod = __import__(module, fromlist=[name])
            classes.append(getattr(mod, name))
        except Exception:  # noqa: BLE001 - a platform without that runner
            continue
    return classes


def _wrap_load_model(original, cfg):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, "_guardrail_guard", None) is None:
            from guardrail.residual.vllm_guard import _install_on_worker

            specs = [(name, path, cfg["artifact"]) for name, path in cfg["policies"].items()]
            names = _install_on_worker(self, specs, cfg["default"], cfg["allow_none"], False, cfg["watch"], cfg["watch_interval"], cfg["alert_log"])
            log.warning("guardrail: installed policies %s (default %s)", names, cfg["default"])
            start_hook_error_counter(self._guardrail_guard)
        return result

    load_model.__wrapped__ = original
    return load_model


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
