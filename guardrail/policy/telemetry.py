"""Guardrail events: OpenTelemetry log records and spans, a JSONL alert log and Prometheus
counters, none of them written on the request path.

``Telemetry.emit`` only records the caller's OpenTelemetry context and puts the event on a
bounded queue (``put_nowait``); a daemon thread writes the JSONL line, the OpenTelemetry
signals and the counters. A full queue drops the event and counts it (``dropped``); an
exporter that raises is counted (``export_errors``) and never reaches the model's forward pass.

Names follow the OpenTelemetry GenAI conventions (``open-telemetry/semantic-conventions-genai``,
all at Development status), chosen by :data:`CONVENTIONS`:

- ``gen_ai_latest_experimental`` (default): each event is a ``gen_ai.run_guardrail.internal``
  span (``gen_ai.operation.name = run_guardrail``, ``gen_ai.guardrail.verdict.type``,
  ``gen_ai.guardrail.action.type``, ``gen_ai.guardrail.security.policy.id`` …, as drafted in
  that repository's pull request #427), a child of the span that was active when the engine
  emitted it, plus a ``gen_ai.guardrail.result`` log record in that span's context (span
  events are deprecated in favour of log records). Audit verdicts are
  ``gen_ai.evaluation.result`` log records (:func:`emit_evaluation`).
- ``legacy``: the names this package wrote before (``apply_guardrail``,
  ``gen_ai.guardrail.name``, ``gen_ai.guardrail.decision.type``) as a span with a span event.
- ``gen_ai_latest_experimental/dup``: both, for moving dashboards from one to the other.

The setting is per process: ``GUARDRAIL_OTEL_CONVENTIONS`` (or ``Telemetry(conventions=…)``),
as the OpenTelemetry GenAI transition plan does with ``OTEL_SEMCONV_STABILITY_OPT_IN``.
Feature-level detail lives under ``guardrail.*``. Content (prompt text, token ids/text) is only
attached when ``capture_content`` is set; by default nothing of the prompt leaves the process.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context

# Keys that carry user content; removed unless capture_content is on.
CONTENT_KEYS = ("prompt", "token_id", "token_text", "text")

CONVENTIONS = ("gen_ai_latest_experimental", "gen_ai_latest_experimental/dup", "legacy")
DEFAULT_CONVENTIONS = "gen_ai_latest_experimental"
CONVENTIONS_ENV = "GUARDRAIL_OTEL_CONVENTIONS"

COMPONENT = "guardrail"  # gen_ai.guardrail.component.name: this package, not the policy
SPAN_NAME = f"run_guardrail {COMPONENT}"  # "run_guardrail {gen_ai.guardrail.component.name}"
RESULT_EVENT = "gen_ai.guardrail.result"
EVALUATION_EVENT = "gen_ai.evaluation.result"
SCOPE = "guardrail"

# What the guard reports (gen_ai.guardrail.verdict.type) and what the engine did about it
# (gen_ai.guardrail.action.type), per policy action. ``error`` is a fail-open default:
# :func:`verdict_of` turns a fail-closed error into deny/block.
VERDICT = {"alert": "warn", "abort": "deny", "clamp": "modify", "steer": "modify", "amplify": "modify", "splice": "modify", "error": "allow"}
ENFORCEMENT = {"alert": "audit", "abort": "block", "clamp": "modify", "steer": "modify", "amplify": "modify", "splice": "modify", "error": "allow"}
# The legacy conventions' gen_ai.guardrail.decision.type.
DECISION = {"alert": "warn", "abort": "deny", "clamp": "modify", "steer": "modify", "amplify": "modify", "splice": "modify", "error": "error"}

_CONTEXT_KEY = "_otel_context"  # the emitter's OpenTelemetry context, never written out
_STEP_KEY = "_emit_step"  # which emit_many call queued the event, never written out
_EXCEPTION_NAME = re.compile(r"\b([A-Z][A-Za-z0-9_]*(?:Error|Exception|Exit|Interrupt))\b")


def resolve_conventions(value: str | None = None) -> str:
    """The conventions to emit: ``value``, else ``$GUARDRAIL_OTEL_CONVENTIONS``, else the default.

    An unknown name is refused when the sink is made (at policy compile time), naming the
    accepted ones, rather than silently exporting names nobody queries.
    """
    chosen = value if value is not None else os.environ.get(CONVENTIONS_ENV, "").strip() or DEFAULT_CONVENTIONS
    if chosen not in CONVENTIONS:
        where = "conventions" if value is not None else f"${CONVENTIONS_ENV}"
        raise ValueError(f"{where}={chosen!r} is not one of {list(CONVENTIONS)}")
    return chosen


# --------------------------------------------------------------------------- attributes
def verdict_of(event: dict[str, Any]) -> tuple[str, str]:
    """``(verdict, enforcement)`` of an event: a rule that failed under fail-closed stopped its
    request (deny, block); any other error let it through unguarded (allow, allow)."""
    action = str(event.get("action", ""))
    if action == "error" and event.get("on_error") == "fail-closed":
        return "deny", "block"
    return VERDICT.get(action, "warn"), ENFORCEMENT.get(action, "audit")


def error_type(event: dict[str, Any]) -> str | None:
    """``error.type`` of an error event: a low-cardinality class, never the message itself."""
    if event.get("action") != "error":
        return None
    reason = str(event.get("reason", ""))
    if event.get("rule") == "nan-guard":
        return "non_finite"
    if reason.startswith("reload refused"):
        return "reload_refused"
    found = _EXCEPTION_NAME.search(reason)
    return found.group(1) if found else "_OTHER"


def guardrail_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """The ``gen_ai.*`` attributes of the ``run_guardrail`` span (draft GenAI guardrail names).

    ``target.type`` is the direction of the token the rule fired on: a prompt token is
    ``input``, a generated token (or an event tied to no token) ``output``.
    """
    verdict, enforcement = verdict_of(event)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "run_guardrail",
        "gen_ai.guardrail.component.name": COMPONENT,
        "gen_ai.guardrail.target.type": "input" if event.get("phase") == "prompt" else "output",
        "gen_ai.guardrail.target.subtype": "llm",
        "gen_ai.guardrail.verdict.type": verdict,
        "gen_ai.guardrail.action.type": enforcement,
        "gen_ai.guardrail.security.policy.id": str(event.get("policy", "")),
        "gen_ai.guardrail.security.policy.rule.id": str(event.get("rule", "")),
    }
    if event.get("request") is not None:
        attrs["gen_ai.guardrail.target.id"] = str(event["request"])
    if "reason" in event:
        attrs["gen_ai.guardrail.verdict.reason"] = str(event["reason"])
    kind = error_type(event)
    if kind is not None:
        attrs["error.type"] = kind
    return attrs


def feature_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """What only a feature-level guard knows, under ``guardrail.*``: the features that fired
    and their values, the threshold or clamp value, the site, the token and the engine."""
    attrs: dict[str, Any] = {"guardrail.action": str(event.get("action", ""))}
    feats = event.get("features") or []
    if feats:
        attrs["guardrail.feature.ids"] = [int(i) for i, _ in feats]
        attrs["guardrail.feature.values"] = [float(v) for _, v in feats]
    renamed = {"threshold": "guardrail.feature.threshold", "value": "guardrail.feature.clamp_value", "layer": "guardrail.site.layer",
               "position": "guardrail.token.position", "phase": "guardrail.token.phase", "engine": "guardrail.engine", "on_error": "guardrail.rule.on_error"}
    for key, name in renamed.items():
        if event.get(key) is not None:
            attrs[name] = event[key]
    return attrs


def content_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """Prompt and token content, present only when the sink was told to capture it."""
    return {
        f"guardrail.content.{key}": event[key] if isinstance(event[key], (str, int, float)) else json.dumps(event[key])
        for key in CONTENT_KEYS
        if key in event
    }


def otel_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """Every attribute of an event's ``gen_ai.guardrail.result`` log record."""
    return {**guardrail_attributes(event), **feature_attributes(event), **content_attributes(event)}


def legacy_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """The attribute names of the ``legacy`` conventions, unchanged for those who query them."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "apply_guardrail",
        "gen_ai.guardrail.name": event.get("policy", ""),
        "gen_ai.guardrail.id": event.get("rule", ""),
        "gen_ai.guardrail.decision.type": DECISION.get(event.get("action", ""), "warn"),
        "guardrail.action": event.get("action", ""),
    }
    if "reason" in event:
        attrs["gen_ai.guardrail.decision.reason"] = str(event["reason"])
    if "request" in event:
        attrs["gen_ai.request.id"] = str(event["request"])
    for key in ("position", "layer", "threshold", "engine"):
        if key in event and event[key] is not None:
            attrs[f"guardrail.{key}"] = event[key]
    feats = event.get("features") or []
    if feats:
        attrs["guardrail.feature.ids"] = [int(i) for i, _ in feats]
        attrs["guardrail.feature.values"] = [float(v) for _, v in feats]
    attrs.update(content_attributes(event))
    return attrs


def _severity(event: dict[str, Any]) -> Any:
    from opentelemetry._logs import SeverityNumber

    if event.get("action") == "error":
        return SeverityNumber.ERROR
    return SeverityNumber.WARN if verdict_of(event)[0] in ("warn", "deny") else SeverityNumber.INFO


# --------------------------------------------------------------------------- counters
@dataclass(frozen=True)
class Counters:
    """This process's Prometheus counters, shared by every sink and engine in it.

    Beside vLLM's own metrics on ``/metrics``: ``guardrail serve`` runs the server with
    ``PROMETHEUS_MULTIPROC_DIR`` set, so the engine process's counters are read by the API
    server's registry. See ``docs/telemetry.md``.
    """

    rule_events: Any  # labels policy, rule, action
    aborts: Any  # labels policy, rule
    hook_errors: Any
    dropped: Any
    export_errors: Any


_COUNTERS: list[Counters | None] = []
_COUNTERS_LOCK = threading.Lock()


def counters() -> Counters | None:
    """The process's counters, made on first use; None where prometheus_client is not installed."""
    with _COUNTERS_LOCK:
        if not _COUNTERS:
            _COUNTERS.append(_make_counters())
        return _COUNTERS[0]


def _make_counters() -> Counters | None:
    try:
        from prometheus_client import Counter
    except ImportError:
        return None
    return Counters(
        rule_events=Counter("guardrail_rule_events", "Guardrail rule events written (alerts, edits, aborts, errors), by policy, rule and action", ["policy", "rule", "action"]),
        aborts=Counter("guardrail_aborts", "Requests a guardrail rule stopped (abort rules, and fail-closed rule errors), by policy and rule", ["policy", "rule"]),
        hook_errors=Counter("guardrail_hook_errors", "Exceptions caught in the guardrail's engine hooks (the request went on, or stopped if fail-closed)"),
        dropped=Counter("guardrail_events_dropped", "Guardrail events dropped because the telemetry queue was full"),
        export_errors=Counter("guardrail_export_errors", "Guardrail telemetry writes that failed (alert log or OpenTelemetry exporter)"),
    )


class HookErrorCounter:
    """Turns an engine's running total of hook errors into increments of ``guardrail_hook_errors``.

    The engine keeps a plain integer on its hot path; this is read from a background thread.
    """

    def __init__(self) -> None:
        self.seen = 0

    def update(self, total: int) -> int:
        """Count what ``total`` adds to the last total seen; returns the increment."""
        delta = max(0, int(total) - self.seen)
        self.seen = max(self.seen, int(total))
        found = counters()
        if delta and found is not None:
            found.hook_errors.inc(delta)
        return delta


# --------------------------------------------------------------------------- the sink
class Telemetry:
    """Non-blocking event sink: bounded queue → background writer (JSONL, OpenTelemetry, counters)."""

    def __init__(self, alert_log: str | Path | None = None, *, otel: bool = True, capture_content: bool = False, queue_size: int = 10000, conventions: str | None = None) -> None:
        self.alert_log = Path(alert_log) if alert_log else None
        self.otel = otel
        self.capture_content = capture_content
        self.conventions = resolve_conventions(conventions)
        self.emitted = 0
        self.written = 0
        self.dropped = 0
        self.export_errors = 0
        self._dropped_counted = 0
        self._aborted: OrderedDict[tuple[str, str, int | None], None] = OrderedDict()  # stopped requests already counted
        self._steps = itertools.count()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._tracer: Any = None
        self._logger: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="guardrail-telemetry", daemon=True)
        self._thread.start()

    def bind(self, *, tracer_provider: Any = None, logger_provider: Any = None) -> "Telemetry":
        """Export to these SDK providers instead of the process's global ones (tests, embedding apps)."""
        from opentelemetry import _logs, trace

        import guardrail

        if tracer_provider is not None:
            self._tracer = trace.get_tracer(SCOPE, guardrail.__version__, tracer_provider=tracer_provider)
        if logger_provider is not None:
            self._logger = _logs.get_logger(SCOPE, guardrail.__version__, logger_provider=logger_provider)
        return self

    # ------------------------------------------------------------------ request path
    def emit(self, event: dict[str, Any]) -> bool:
        """Queue an event; never blocks, never raises. Returns False if it was dropped.

        The caller's OpenTelemetry context rides along, so the writer thread can make the
        event's span a child of the request's span.
        """
        try:
            if not self.capture_content:
                for key in CONTENT_KEYS:
                    event.pop(key, None)
            event.setdefault("time", time.time())
            if self.otel:
                event[_CONTEXT_KEY] = _current_context()
            self._queue.put_nowait(event)
            self.emitted += 1
            return True
        except queue.Full:
            self.dropped += 1
            return False
        except Exception:  # noqa: BLE001 - telemetry must never break generation
            self.dropped += 1
            return False

    def emit_many(self, events: list[dict[str, Any]]) -> None:
        """Queue the events of one engine step; they are marked as such (see :meth:`_first_abort`)."""
        step = next(self._steps)
        for event in events:
            event[_STEP_KEY] = step
            self.emit(event)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=1.0)]
            except queue.Empty:
                self._count_dropped()
                continue
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001
                self._export_failed()
            finally:
                self._count_dropped()
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        contexts = [event.pop(_CONTEXT_KEY, None) for event in batch]
        steps = [event.pop(_STEP_KEY, None) for event in batch]
        if self.alert_log is not None:
            try:
                self.alert_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.alert_log, "a", encoding="utf-8") as fh:
                    for event in batch:
                        fh.write(json.dumps(event, default=str) + "\n")
            except OSError:
                self._export_failed()
        if self.otel:
            try:
                self._export(batch, contexts)
            except Exception:  # noqa: BLE001
                self._export_failed()
        self._count(batch, steps)
        self.written += len(batch)

    def _export(self, batch: list[dict[str, Any]], contexts: list[Any]) -> None:
        tracer, logger = self._handles()
        for event, parent in zip(batch, contexts):
            if self.conventions != "legacy":
                _export_current(tracer, logger, event, parent)
            if self.conventions != DEFAULT_CONVENTIONS:
                _export_legacy(tracer, event, parent)

    def _handles(self) -> tuple[Any, Any]:
        """Tracer and logger: the bound ones, else the global providers' (made once)."""
        from opentelemetry import _logs, trace

        import guardrail

        if self._tracer is None:
            self._tracer = trace.get_tracer(SCOPE, guardrail.__version__)
        if self._logger is None:
            self._logger = _logs.get_logger(SCOPE, guardrail.__version__)
        return self._tracer, self._logger

    def _count(self, batch: list[dict[str, Any]], steps: list[int | None]) -> None:
        """Prometheus counts of the events written: every event, and each stopped request once."""
        found = counters()
        if found is None:
            return
        for event, step in zip(batch, steps):
            policy, rule, action = str(event.get("policy", "")), str(event.get("rule", "")), str(event.get("action", ""))
            found.rule_events.labels(policy, rule, action).inc()
            if verdict_of(event)[1] == "block" and self._first_abort(policy, str(event.get("request", "")), step):
                found.aborts.labels(policy, rule).inc()

    def _first_abort(self, policy: str, request: str, step: int | None) -> bool:
        """True the first time a request is stopped: a prefill can fire an abort on many tokens.

        Both engines stop a request in the step its abort fires, so its abort events arrive
        together. The transformers engine queues a step with :meth:`emit_many` and reuses
        request ids (``"0"``, ``"1"``) across calls: its events are told apart by step. vLLM
        queues them one by one, under request ids unique to the server's life.
        """
        key = (policy, request, step)
        if key in self._aborted:
            return False
        self._aborted[key] = None
        if len(self._aborted) > 100_000:
            self._aborted.popitem(last=False)
        return True

    def _count_dropped(self) -> None:
        delta = self.dropped - self._dropped_counted
        found = counters()
        if delta > 0 and found is not None:
            found.dropped.inc(delta)
        self._dropped_counted += max(delta, 0)

    def _export_failed(self) -> None:
        self.export_errors += 1
        found = counters()
        if found is not None:
            found.export_errors.inc()

    # ------------------------------------------------------------------ control
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is written (for tests and shutdown)."""
        deadline = time.time() + timeout
        while self._queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.005)
        return self._queue.unfinished_tasks == 0

    def stats(self) -> dict[str, int]:
        return {"emitted": self.emitted, "written": self.written, "dropped": self.dropped, "export_errors": self.export_errors}


def _current_context() -> Any:
    """The calling thread's OpenTelemetry context (an immutable snapshot: cheap to keep)."""
    return otel_context.get_current()


def _export_current(tracer: Any, logger: Any, event: dict[str, Any], parent: Any) -> None:
    """One ``gen_ai.run_guardrail.internal`` span, child of the emitter's span, and the
    ``gen_ai.guardrail.result`` log record in its context (so both share the request's trace)."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    attrs = guardrail_attributes(event)
    start = int(float(event.get("time", time.time())) * 1e9)
    span = tracer.start_span(SPAN_NAME, context=parent, kind=SpanKind.INTERNAL, attributes=attrs, start_time=start)
    if "error.type" in attrs:
        span.set_status(Status(StatusCode.ERROR, attrs["error.type"]))
    logger.emit(timestamp=start, context=trace.set_span_in_context(span, parent), severity_number=_severity(event),
                event_name=RESULT_EVENT, attributes=otel_attributes(event))
    span.end(end_time=start)


def _export_legacy(tracer: Any, event: dict[str, Any], parent: Any) -> None:
    """The ``legacy`` conventions: an ``apply_guardrail`` span carrying a span event."""
    attrs = legacy_attributes(event)
    start = int(float(event.get("time", time.time())) * 1e9)
    span = tracer.start_span(f"apply_guardrail {event.get('rule', '')}", context=parent, attributes=attrs, start_time=start)
    span.add_event("gen_ai.guardrail.result", attributes={k: v for k, v in attrs.items() if k.startswith(("gen_ai.guardrail", "guardrail.feature"))})
    span.end(end_time=start)


# --------------------------------------------------------------------------- evaluations
def emit_evaluation(
    name: str,
    *,
    score_value: float | None = None,
    score_label: str | None = None,
    explanation: str | None = None,
    response_id: str | None = None,
    attributes: dict[str, Any] | None = None,
    logger_provider: Any = None,
) -> dict[str, Any]:
    """Write one ``gen_ai.evaluation.result`` log record in the caller's context; returns its attributes.

    ``gen_ai.evaluation.name`` is required by the conventions, so an empty name is refused.
    Extra ``attributes`` must stay outside the ``gen_ai.evaluation.*`` names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("gen_ai.evaluation.name is required: give the evaluation a non-empty name")
    attrs: dict[str, Any] = {"gen_ai.evaluation.name": name}
    if score_value is not None:
        attrs["gen_ai.evaluation.score.value"] = float(score_value)
    if score_label is not None:
        attrs["gen_ai.evaluation.score.label"] = str(score_label)
    if explanation:
        attrs["gen_ai.evaluation.explanation"] = str(explanation)
    if response_id is not None:
        attrs["gen_ai.response.id"] = str(response_id)
    for key, value in (attributes or {}).items():
        if key.startswith("gen_ai.evaluation."):
            raise ValueError(f"extra attribute {key!r} would overwrite a gen_ai.evaluation.* attribute")
        attrs[key] = value
    from opentelemetry import _logs
    from opentelemetry._logs import SeverityNumber

    import guardrail

    logger = _logs.get_logger(SCOPE, guardrail.__version__, logger_provider=logger_provider)
    logger.emit(event_name=EVALUATION_EVENT, severity_number=SeverityNumber.INFO, attributes=attrs, context=_current_context())
    return attrs


# --------------------------------------------------------------------------- shared sinks
_REGISTRY: dict[tuple, Telemetry] = {}
_REGISTRY_LOCK = threading.Lock()


def telemetry_for(alert_log: str | Path | None, *, otel: bool = True, capture_content: bool = False, queue_size: int = 10000, conventions: str | None = None) -> Telemetry:
    """One sink (one writer thread) per configuration, shared by every policy that uses it."""
    chosen = resolve_conventions(conventions)
    key = (str(Path(alert_log).resolve()) if alert_log else None, otel, capture_content, queue_size, chosen)
    with _REGISTRY_LOCK:
        sink = _REGISTRY.get(key)
        if sink is None:
            sink = _REGISTRY[key] = Telemetry(alert_log, otel=otel, capture_content=capture_content, queue_size=queue_size, conventions=chosen)
        return sink
