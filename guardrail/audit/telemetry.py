"""An audit's verdict as OpenTelemetry ``gen_ai.evaluation.result`` log records.

One record for the release verdict (``guardrail.audit``) and one per threat model
(``guardrail.audit.<threat>``), written in the caller's context so that a CI job's span,
if it has one, holds them. Scores are fractions of prompts (a gain of 0.05 is 5 pp).

The verdict record's label is ``pass``, ``fail`` or ``inconclusive`` and its score the
largest upper confidence bound among the gated threats' gains; a threat's score is its gain
and its label ``exceeds_bound`` or ``within_bound`` when the policy gates on it, ``ungated``
otherwise. The verdict record also carries ``guardrail.audit.positive_control``: the
self-check's verdict on its deliberately leaky copy (``fail`` is the one that lets the
verdict stand), or ``not_run``.
"""

from __future__ import annotations

from typing import Any

from guardrail.audit.policy import AuditPolicy
from guardrail.audit.threats import ARTIFACT_ONLY, NEEDS_A
from guardrail.policy.telemetry import emit_evaluation

AUDIT_EVALUATION = "guardrail.audit"


def gate(name: str, policy: AuditPolicy) -> float | None:
    """The largest gain (a fraction) the policy allows threat ``name``; None when it is not gated."""
    if name in ARTIFACT_ONLY:
        return policy.max_artifact_only_gain_pp / 100
    if name in NEEDS_A and policy.max_joint_gain_pp is not None:
        return policy.max_joint_gain_pp / 100
    return None


def threat_label(name: str, gain: dict[str, Any], policy: AuditPolicy) -> str:
    """``exceeds_bound`` when the gain's upper confidence bound is above the policy's limit."""
    bound = gate(name, policy)
    if bound is None:
        return "ungated"
    return "exceeds_bound" if gain["high"] > bound else "within_bound"


def emit_audit_evaluations(report: Any, policy: AuditPolicy, logger_provider: Any = None) -> list[dict[str, Any]]:
    """Write the report's records; returns their attributes (what a test or a log line can check)."""
    artifact = {"guardrail.audit.artifact.sha256": str(report.artifact.get("sha256") or ""), "guardrail.audit.prompts": int(report.n_prompts)}
    gated = [g["high"] for n, g in report.gains.items() if gate(n, policy) is not None]
    records = [emit_evaluation(
        AUDIT_EVALUATION,
        score_value=max(gated) if gated else None,
        score_label=report.verdict.name.lower(),
        explanation="; ".join(report.reasons)[:2000],
        attributes=artifact | {"guardrail.audit.positive_control": str(getattr(report, "positive_control_verdict", None) or "not_run").lower()},
        logger_provider=logger_provider,
    )]
    for name, g in report.gains.items():
        records.append(emit_evaluation(
            f"{AUDIT_EVALUATION}.{name}",
            score_value=g["gain"],
            score_label=threat_label(name, g, policy),
            explanation=f"gain {100 * g['gain']:+.1f} pp, {policy.confidence:.0%} CI [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}] pp over {g['n']} prompts",
            attributes=artifact,
            logger_provider=logger_provider,
        ))
    return records
