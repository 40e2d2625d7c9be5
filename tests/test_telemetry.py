"""OpenTelemetry names seen through the SDK's in-memory exporters, and the Prometheus counters.

A guarded tiny-pair generation inside a request span must leave ``gen_ai.guardrail.result``
log records in that span's trace, each in a ``run_guardrail guardrail`` span carrying the
draft GenAI guardrail attributes; a tiny audit must leave ``gen_ai.evaluation.result``
records; the old names come back only behind the ``legacy`` switch.
"""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY

from guard_fixtures import build_artifact
from guardrail.policy import Policy
from guardrail.policy.telemetry import CONVENTIONS_ENV, HookErrorCounter, Telemetry, emit_evaluation, telemetry_for
from guardrail.residual.hf_guard import guard

pytestmark = pytest.mark.usefixtures("one_thread")

VERDICTS = {"allow", "deny", "modify", "warn", "escalate"}
GUARDRAIL_NAMES = {
    "gen_ai.operation.name", "gen_ai.guardrail.target.type", "gen_ai.guardrail.verdict.type", "gen_ai.guardrail.action.type",
    "gen_ai.guardrail.component.name", "gen_ai.guardrail.security.policy.id", "gen_ai.guardrail.security.policy.rule.id",
}
LEGACY_NAMES = {"gen_ai.guardrail.name", "gen_ai.guardrail.id", "gen_ai.guardrail.decision.type"}


class Exporters:
    """An SDK tracer provider and logger provider, each with a synchronous in-memory exporter."""

    def __init__(self) -> None:
        self.spans, self.logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
        self.tracer_provider, self.logger_provider = TracerProvider(), LoggerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))

    def records(self, event_name: str) -> list:
        return [r.log_record for r in self.logs.get_finished_logs() if r.log_record.event_name == event_name]


@pytest.fixture
def otel() -> Exporters:
    return Exporters()


@pytest.fixture(scope="module")
def art(tiny_pair, tmp_path_factory):
    path, info = build_artifact(tiny_pair, tmp_path_factory.mktemp("telemetry") / "dfc")
    return {"path": path, **info}


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- a guarded generation
def test_guarded_generation_writes_log_records_in_the_request_trace(tiny_pair, art, otel, tmp_path):
    policy = Policy.from_data({"name": "watch", "telemetry": {"alert_log": str(tmp_path / "alerts.jsonl")}, "rules": [
        {"id": "look", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.0},
        {"id": "hold", "action": "clamp", "select": {"indices": art["shared"][:4]}, "value": 0.0},
        {"id": "halt", "action": "abort", "select": {"partition": "a_exclusive"}, "threshold": 0.0, "positions": "generated"},
    ]})
    aborts_before = _count("guardrail_aborts_total", policy="watch", rule="halt")
    with guard(tiny_pair.a, art["path"], policy) as g:
        g.compiled.telemetry.bind(tracer_provider=otel.tracer_provider, logger_provider=otel.logger_provider)
        with otel.tracer_provider.get_tracer("app").start_as_current_span("chat tiny-a") as request:
            res = g.generate("call the tool <tool_call>", max_new_tokens=4)
        assert g.compiled.telemetry.flush()
    assert res.events and res.aborted, "the test needs alerts, clamps and an abort"

    records = otel.records("gen_ai.guardrail.result")
    assert len(records) == len(res.events)
    by_rule = {r.attributes["gen_ai.guardrail.security.policy.rule.id"]: r for r in records}
    assert set(by_rule) == {"look", "hold", "halt"}
    for record in records:
        attrs = record.attributes
        assert GUARDRAIL_NAMES <= set(attrs) and not LEGACY_NAMES & set(attrs)
        assert attrs["gen_ai.operation.name"] == "run_guardrail" and attrs["gen_ai.guardrail.component.name"] == "guardrail"
        assert attrs["gen_ai.guardrail.security.policy.id"] == "watch"
        assert attrs["gen_ai.guardrail.verdict.type"] in VERDICTS and attrs["gen_ai.guardrail.target.type"] in ("input", "output")
        assert record.trace_id == request.get_span_context().trace_id  # correlated with the request's span
    assert {k: (by_rule[k].attributes["gen_ai.guardrail.verdict.type"], by_rule[k].attributes["gen_ai.guardrail.action.type"]) for k in by_rule} == {
        "look": ("warn", "audit"), "hold": ("modify", "modify"), "halt": ("deny", "block")}
    assert by_rule["halt"].attributes["gen_ai.guardrail.target.type"] == "output"
    alert = by_rule["look"].attributes
    assert len(alert["guardrail.feature.ids"]) == len(alert["guardrail.feature.values"]) >= 1 and alert["guardrail.feature.threshold"] == 0.0
    assert not any(k.startswith("guardrail.content.") for r in records for k in r.attributes)  # content is opt-in

    spans = [s for s in otel.spans.get_finished_spans() if s.name == "run_guardrail guardrail"]
    assert len(spans) == len(records)
    assert all(s.kind == SpanKind.INTERNAL and s.parent.span_id == request.get_span_context().span_id for s in spans)
    assert {r.span_id for r in records} == {s.context.span_id for s in spans}  # each record sits in its own span
    assert all(GUARDRAIL_NAMES <= set(s.attributes) and "guardrail.feature.ids" not in s.attributes for s in spans)
    assert _count("guardrail_aborts_total", policy="watch", rule="halt") == aborts_before + 1  # once per stopped request


def test_content_goes_to_the_log_record_only_when_opted_in(otel):
    for capture in (False, True):
        sink = Telemetry(None, capture_content=capture).bind(tracer_provider=otel.tracer_provider, logger_provider=otel.logger_provider)
        sink.emit({"policy": "p", "rule": "r", "action": "alert", "prompt": "a secret prompt", "token_id": 7})
        assert sink.flush()
    first, second = otel.records("gen_ai.guardrail.result")
    assert "guardrail.content.prompt" not in first.attributes
    assert second.attributes["guardrail.content.prompt"] == "a secret prompt" and second.attributes["guardrail.content.token_id"] == 7
    assert not any("guardrail.content.prompt" in s.attributes for s in otel.spans.get_finished_spans())


def test_rule_errors_carry_error_type_and_fail_closed_blocks(otel):
    sink = Telemetry(None).bind(tracer_provider=otel.tracer_provider, logger_provider=otel.logger_provider)
    sink.emit({"policy": "p", "rule": "r", "action": "error", "reason": "ValueError: boom", "on_error": "fail-closed", "request": "q1"})
    sink.emit({"policy": "p", "rule": "nan-guard", "action": "error", "reason": "2 non-finite rows reverted", "request": "q2"})
    assert sink.flush()
    closed, reverted = (r.attributes for r in otel.records("gen_ai.guardrail.result"))
    assert (closed["gen_ai.guardrail.verdict.type"], closed["gen_ai.guardrail.action.type"], closed["error.type"]) == ("deny", "block", "ValueError")
    assert (reverted["gen_ai.guardrail.verdict.type"], reverted["error.type"]) == ("allow", "non_finite")
    assert all(s.status.status_code == StatusCode.ERROR for s in otel.spans.get_finished_spans())


# --------------------------------------------------------------------------- the conventions switch
def test_legacy_names_only_behind_the_switch(otel, monkeypatch):
    event = {"policy": "p", "rule": "r", "action": "alert", "request": "q", "phase": "prompt", "features": [(3, 1.5)]}
    legacy = Telemetry(None, conventions="legacy").bind(tracer_provider=otel.tracer_provider, logger_provider=otel.logger_provider)
    legacy.emit(dict(event))
    assert legacy.flush()
    (span,) = otel.spans.get_finished_spans()
    assert span.name == "apply_guardrail r" and LEGACY_NAMES <= set(span.attributes) and span.events[0].name == "gen_ai.guardrail.result"
    assert span.attributes["gen_ai.operation.name"] == "apply_guardrail" and not otel.records("gen_ai.guardrail.result")

    monkeypatch.setenv(CONVENTIONS_ENV, "gen_ai_latest_experimental/dup")
    both = Telemetry(None).bind(tracer_provider=otel.tracer_provider, logger_provider=otel.logger_provider)
    both.emit(dict(event))
    assert both.flush() and both.conventions == "gen_ai_latest_experimental/dup"
    assert sorted(s.name for s in otel.spans.get_finished_spans()) == ["apply_guardrail r", "apply_guardrail r", "run_guardrail guardrail"]
    (record,) = otel.records("gen_ai.guardrail.result")
    assert record.attributes["gen_ai.guardrail.target.type"] == "input"

    monkeypatch.setenv(CONVENTIONS_ENV, "v1.36")
    with pytest.raises(ValueError, match=r"GUARDRAIL_OTEL_CONVENTIONS='v1.36' is not one of \['gen_ai_latest_experimental'"):
        telemetry_for(None)
    with pytest.raises(ValueError, match="conventions='old' is not one of"):
        Telemetry(None, conventions="old")


# --------------------------------------------------------------------------- evaluations
def test_tiny_audit_writes_evaluation_results(tiny_pair, otel, tmp_path):
    from guardrail.audit import AuditPolicy, audit
    from guardrail.dictionary import Crosscoder, DFCConfig, load_artifact, save_artifact

    cc = Crosscoder(DFCConfig(dict_size=64, k=8, exclusive=0.0625).with_d_model(tiny_pair.d_model), seed=3)
    cc = load_artifact(save_artifact(cc, tmp_path / "random", model_a="tiny-a", model_b="tiny-b", layer=1))
    policy = AuditPolicy(metric="tool_call_open", prompts=12, max_new_tokens=1, steer_top=2, calibration_prompts=8, max_prompt_tokens=96)
    report = audit(cc, tiny_pair.b, None, policy, progress=False, backend="transformers", logger_provider=otel.logger_provider)

    records = {r.attributes["gen_ai.evaluation.name"]: r.attributes for r in otel.records("gen_ai.evaluation.result")}
    assert set(records) == {"guardrail.audit"} | {f"guardrail.audit.{name}" for name in report.gains}
    verdict = records["guardrail.audit"]
    assert verdict["gen_ai.evaluation.score.label"] == report.verdict.name.lower() == "inconclusive"  # 12 prompts certify no 2 pp bound
    assert verdict["gen_ai.evaluation.score.value"] == max(g["high"] for g in report.gains.values())
    assert "use at least" in verdict["gen_ai.evaluation.explanation"]
    for name, gain in report.gains.items():
        attrs = records[f"guardrail.audit.{name}"]
        assert attrs["gen_ai.evaluation.score.value"] == gain["gain"] and attrs["gen_ai.evaluation.score.label"] in ("within_bound", "exceeds_bound")
        assert f"over {gain['n']} prompts" in attrs["gen_ai.evaluation.explanation"]


def test_evaluation_needs_a_name_and_keeps_its_own_attributes(otel):
    with pytest.raises(ValueError, match="gen_ai.evaluation.name is required"):
        emit_evaluation(" ", logger_provider=otel.logger_provider)
    with pytest.raises(ValueError, match="would overwrite"):
        emit_evaluation("x", attributes={"gen_ai.evaluation.score.value": 1.0}, logger_provider=otel.logger_provider)
    attrs = emit_evaluation("Relevance", score_value=4, score_label="relevant", response_id="chatcmpl-1", logger_provider=otel.logger_provider)
    (record,) = otel.records("gen_ai.evaluation.result")
    assert dict(record.attributes) == attrs == {"gen_ai.evaluation.name": "Relevance", "gen_ai.evaluation.score.value": 4.0,
                                                "gen_ai.evaluation.score.label": "relevant", "gen_ai.response.id": "chatcmpl-1"}


# --------------------------------------------------------------------------- counters
def test_counters_of_rule_events_aborts_drops_and_hook_errors():
    events = lambda: _count("guardrail_rule_events_total", policy="cnt", rule="halt", action="abort")  # noqa: E731
    before = {"events": events(), "aborts": _count("guardrail_aborts_total", policy="cnt", rule="halt"),
              "dropped": _count("guardrail_events_dropped_total"), "hook": _count("guardrail_hook_errors_total")}
    sink = Telemetry(None, otel=False)
    for request in ("a", "a", "b"):  # two tokens of request a fired: one stopped request
        sink.emit({"policy": "cnt", "rule": "halt", "action": "abort", "request": request})
    assert sink.flush()
    assert events() == before["events"] + 3 and _count("guardrail_aborts_total", policy="cnt", rule="halt") == before["aborts"] + 2
    for _ in range(2):  # the transformers engine reuses request ids across calls: one step, one stop each
        sink.emit_many([{"policy": "cnt", "rule": "halt", "action": "abort", "request": "0"} for _ in range(3)])
    assert sink.flush() and _count("guardrail_aborts_total", policy="cnt", rule="halt") == before["aborts"] + 4

    full = Telemetry(None, otel=False, queue_size=1)
    release = threading.Event()
    write = full._write
    full._write = lambda batch: (release.wait(10), write(batch))  # a stalled exporter
    full.emit({"policy": "cnt", "rule": "x", "action": "alert"})  # taken by the writer, which stalls
    for _ in range(200):
        if full._queue.empty():
            break
        time.sleep(0.01)
    assert full.emit({"policy": "cnt", "rule": "x", "action": "alert"})  # fills the queue
    assert not full.emit({"policy": "cnt", "rule": "x", "action": "alert"}) and full.dropped == 1
    release.set()
    assert full.flush()
    for _ in range(300):  # counted by the writer thread after its batch, or within its 1 s wait
        if _count("guardrail_events_dropped_total") > before["dropped"]:
            break
        time.sleep(0.01)
    assert _count("guardrail_events_dropped_total") == before["dropped"] + 1

    hooks = HookErrorCounter()
    assert [hooks.update(n) for n in (0, 2, 2, 5)] == [0, 2, 0, 3]
    assert _count("guardrail_hook_errors_total") == before["hook"] + 5
