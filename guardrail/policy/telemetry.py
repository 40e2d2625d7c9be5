"""Guardrail events: OpenTelemetry spans + a JSONL alert log, never on the request path.

``Telemetry.emit`` only puts the event on a bounded queue (``put_nowait``); a daemon thread
writes the JSONL line and the OpenTelemetry span. A full queue drops the event and counts
it (``dropped``); an exporter that raises is counted (``export_errors``) and never reaches
the model's forward pass.

Attribute names follow the OpenTelemetry GenAI conventions for guardrails
(``gen_ai.operation.name = "apply_guardrail"``, ``gen_ai.guardrail.*``); feature-level detail
lives under the ``guardrail.*`` namespace. Content (prompt text, token ids/text) is only
attached when ``capture_content`` is set; by default nothing of the prompt leaves the process.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

# Keys that carry user content; removed unless capture_content is on.
CONTENT_KEYS = ("prompt", "token_id", "token_text", "text")

DECISION = {"alert": "warn", "abort": "deny", "clamp": "modify", "steer": "modify", "amplify": "modify", "splice": "modify", "error": "error"}


def otel_attributes(event: dict[str, Any]) -> dict[str, Any]:
    """Flatten an event into OpenTelemetry attributes (GenAI guardrail conventions)."""
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
    for key in CONTENT_KEYS:
        if key in event:
            attrs[f"guardrail.content.{key}"] = event[key] if isinstance(event[key], (str, int, float)) else json.dumps(event[key])
    return attrs


class Telemetry:
    """Non-blocking event sink: bounded queue → background writer (JSONL + OpenTelemetry)."""

    def __init__(self, alert_log: str | Path | None = None, *, otel: bool = True, capture_content: bool = False, queue_size: int = 10000) -> None:
        self.alert_log = Path(alert_log) if alert_log else None
        self.otel = otel
        self.capture_content = capture_content
        self.emitted = 0
        self.written = 0
        self.dropped = 0
        self.export_errors = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._tracer = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="guardrail-telemetry", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ request path
    def emit(self, event: dict[str, Any]) -> bool:
        """Queue an event; never blocks, never raises. Returns False if it was dropped."""
        try:
            if not self.capture_content:
                for key in CONTENT_KEYS:
                    event.pop(key, None)
            event.setdefault("time", time.time())
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
        for event in events:
            self.emit(event)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001
                self.export_errors += 1
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if self.alert_log is not None:
            try:
                self.alert_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.alert_log, "a", encoding="utf-8") as fh:
                    for event in batch:
                        fh.write(json.dumps(event, default=str) + "\n")
            except OSError:
                self.export_errors += 1
        if self.otel:
            try:
                self._export(batch)
            except Exception:  # noqa: BLE001
                self.export_errors += 1
        self.written += len(batch)

    def _export(self, batch: list[dict[str, Any]]) -> None:
        if self._tracer is None:
            from opentelemetry import trace

            self._tracer = trace.get_tracer("guardrail")
        for event in batch:
            attrs = otel_attributes(event)
            start = int(event.get("time", time.time()) * 1e9)
            span = self._tracer.start_span(f"apply_guardrail {event.get('rule', '')}", attributes=attrs, start_time=start)
            span.add_event("gen_ai.guardrail.result", attributes={k: v for k, v in attrs.items() if k.startswith(("gen_ai.guardrail", "guardrail.feature"))})
            span.end(end_time=start)

    # ------------------------------------------------------------------ control
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event is written (for tests and shutdown)."""
        deadline = time.time() + timeout
        while self._queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.005)
        return self._queue.unfinished_tasks == 0

    def stats(self) -> dict[str, int]:
        return {"emitted": self.emitted, "written": self.written, "dropped": self.dropped, "export_errors": self.export_errors}


_REGISTRY: dict[tuple, Telemetry] = {}
_REGISTRY_LOCK = threading.Lock()


def telemetry_for(alert_log: str | Path | None, *, otel: bool = True, capture_content: bool = False, queue_size: int = 10000) -> Telemetry:
    """One sink (one writer thread) per configuration, shared by every policy that uses it."""
    key = (str(Path(alert_log).resolve()) if alert_log else None, otel, capture_content, queue_size)
    with _REGISTRY_LOCK:
        sink = _REGISTRY.get(key)
        if sink is None:
            sink = _REGISTRY[key] = Telemetry(alert_log, otel=otel, capture_content=capture_content, queue_size=queue_size)
        return sink
