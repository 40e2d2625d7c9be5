"""The driver's side of the guard on an in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

:func:`install_guard` installs named policies in the engine's worker and returns a
:class:`VllmGuard`, a handle that reads the worker's events, captures and counters and
removes what it installed (also as a context manager, like :func:`guardrail.policy.guard`).
:func:`enable_patches` lets requests carry last-prompt-token patches (and reads) at a
layer; :func:`take_reads` collects the reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from guardrail.policy.engine import GuardError
from guardrail.policy.schema import Policy
from guardrail.policy.watch import DEFAULT_INTERVAL
from guardrail.vllm.layout import ReadRows
from guardrail.vllm.worker import WorkerGuard, drop_guard, guard_for, guard_of

PolicySpec = tuple[str, "Policy | str", Any]  # name, policy (or its file), artifact


def worker_runner(worker: Any) -> Any:
    """The model runner of a worker (or the runner itself)."""
    return getattr(worker, "model_runner", worker)


def install_on_runner(runner: Any, specs: list[PolicySpec], default: str | None, allow_none: bool, capture: bool, watch: bool,
                      watch_interval: float = DEFAULT_INTERVAL, alert_log: str | None = None) -> list[str]:
    """Worker side: add the policies to the runner's guard (made if it has none); their names."""
    guard = guard_for(runner, default=default, allow_none=allow_none, capture=capture, watch_interval=watch_interval, alert_log=alert_log)
    guard.default, guard.allow_none, guard.capture, guard.alert_log = default, allow_none, capture, alert_log
    guard.watcher.interval = float(watch_interval)
    for name, policy, artifact in specs:
        guard.add_policy(name, policy, artifact, watch=watch)
    return guard.store.names()


def _drop_policies(runner: Any, names: list[str]) -> None:
    """Worker side: uninstall these policies; the guard goes once it has nothing left to do."""
    guard = guard_of(runner)
    if guard is None:
        return
    for name in names:
        guard.drop_policy(name)
    if guard.is_idle():
        drop_guard(runner)


class VllmGuard:
    """Driver-side handle returned by :func:`install_guard`; ``with`` removes its policies on exit."""

    def __init__(self, llm: Any, names: list[str] | None = None) -> None:
        self.llm = llm
        self.names = list(names or [])

    def __enter__(self) -> "VllmGuard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _rpc(self, fn: Callable[[WorkerGuard], Any]) -> Any:
        return self.llm.collective_rpc(lambda worker: fn(guard_of(worker_runner(worker))))[0]

    def _drain(self, attr: str, clear: bool) -> list[dict[str, Any]]:
        """Copy a worker-side list (events / captured rows), optionally emptying it."""

        def get(guard: WorkerGuard) -> list[dict[str, Any]]:
            items = getattr(guard, attr)
            out = list(items)
            if clear:
                items.clear()
            return out

        return self._rpc(get)

    def events(self, clear: bool = False) -> list[dict[str, Any]]:
        return self._drain("events", clear)

    def captured(self, clear: bool = True) -> list[dict[str, Any]]:
        return self._drain("captured", clear)

    def set_capture(self, on: bool) -> None:
        def put(guard: WorkerGuard) -> None:
            guard.capture = on

        self._rpc(put)

    def summary(self) -> dict[str, Any]:
        return self._rpc(lambda guard: guard.summary())

    def reload(self, name: str, policy: Policy | str | Path, artifact: Any = None) -> dict[str, Any]:
        policy = str(policy) if isinstance(policy, Path) else policy
        return self._rpc(lambda guard: guard.reload(name, policy, artifact))

    def remove(self) -> None:
        """Uninstall this handle's policies (the worker's guard goes once nothing else uses it)."""
        names = self.names
        self.llm.collective_rpc(lambda worker: _drop_policies(worker_runner(worker), names))

    def flush(self, timeout: float = 5.0) -> None:
        def fl(guard: WorkerGuard) -> None:
            for _, c in guard.store.items():
                c.telemetry.flush(timeout)

        self._rpc(fl)


def install_guard(
    llm: Any,
    artifact: Any,
    policies: dict[str, Policy | str | Path],
    *,
    default: str | None = None,
    allow_none: bool = True,
    capture: bool = False,
    watch: bool = False,
    watch_interval: float = DEFAULT_INTERVAL,
    alert_log: str | Path | None = None,
) -> VllmGuard:
    """Install named policies into an in-process vLLM ``LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

    Requests choose with ``SamplingParams(extra_args={"guardrail_policy": name})``; requests
    naming none get ``default`` (None = unguarded). ``artifact`` is a crosscoder folder (or a
    Crosscoder object) shared by the policies, or None to use each policy's ``artifact``.
    With ``watch``, policies given as files are reloaded by a worker thread when they change
    (polled every ``watch_interval`` seconds); the forward pass never waits for a reload.
    ``alert_log`` replaces every policy's ``telemetry.alert_log``.
    """
    if not policies:
        raise GuardError("install_guard needs at least one policy")
    if default is not None and default not in policies:
        raise GuardError(f"default policy {default!r} is not among {sorted(policies)}")
    specs = []
    for name, pol in policies.items():
        if isinstance(pol, Path):
            pol = str(pol)
        if isinstance(pol, str):
            Policy.load(pol)  # validate on the driver first: clear error before touching the engine
        specs.append((name, pol, str(artifact) if isinstance(artifact, Path) else artifact))
    log_path = str(Path(alert_log).expanduser().resolve()) if alert_log is not None else None
    llm.collective_rpc(lambda worker: install_on_runner(worker_runner(worker), specs, default, allow_none, capture, watch, watch_interval, log_path))
    return VllmGuard(llm, list(policies))


def enable_patches(llm: Any, layer: int) -> None:
    """Let this engine's requests patch (``guardrail_patch``) their last prompt token, or read (``guardrail_read``) their prompt, after ``layer``."""
    llm.collective_rpc(lambda worker: guard_for(worker_runner(worker)).enable_patches(layer))


def take_reads(llm: Any, ids: list[str]) -> list[ReadRows | None]:
    """What these requests read (``guardrail_read``), in order: rows and their prompt positions."""
    return llm.collective_rpc(lambda worker: guard_for(worker_runner(worker)).take_reads(ids))[0]
