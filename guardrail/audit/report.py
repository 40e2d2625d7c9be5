"""The audit's result: the verdict, what decided it, and the numbers a release manager acts on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from guardrail.audit.stats import prompts_to_certify
from guardrail.audit.threats import NEEDS_A
from guardrail.pages import render_page


class Verdict(IntEnum):
    """Exit codes: CI gates on them directly."""

    PASS = 0
    FAIL = 1
    INCONCLUSIVE = 2


# What decided a verdict (``AuditReport.causes``); each has one sentence of advice below.
PROVEN_LEAK, UNCERTIFIED, BLIND, NO_CAPABILITY, NO_MODEL_A, TOO_FEW_PROMPTS, BOUNDED = (
    "proven_leak", "uncertified", "blind", "no_capability", "no_model_a", "too_few_prompts", "bounded")


@dataclass
class AuditReport:
    """Everything ``audit.json`` holds. Rates and gains are fractions; ``*_pp`` fields are
    percentage points. ``capability`` is A's clean rate minus B's clean rate on the same
    prompts (``clean`` = B, ``guarded`` = A); ``oracle`` is B's gain when its last prompt
    token carries A's own activation (the most that row can carry), and ``oracle_fraction``
    each threat's gain over the oracle's; ``mde_pp`` is the smallest artifact-only gain this
    audit would prove (see :func:`guardrail.audit.stats.minimum_detectable_gain`).
    ``positive_control_verdict`` is the audit's verdict on a copy of the artifact with A's
    mean lead planted in it (None when the self-check did not run), with its gated gains and
    the decisive one's interval (``positive_control_gain_pp``, of ``positive_control_threat``);
    ``gated_metric`` is the metric the verdict rests on and ``other_metrics`` the same
    conditions scored under the ungated ones (B's clean rate, A's lead, each threat's gain);
    ``adapter_sha256`` names the LoRA adapter merged into A (None when A has none) and ``wall_time_s``
    is what the whole audit took."""

    verdict: Verdict
    reasons: list[str]
    policy: dict
    artifact: dict
    n_prompts: int
    clean_rate: float
    gains: dict[str, dict]
    controls: dict[str, dict]
    static: dict
    causes: list[str] = field(default_factory=list)
    capability: dict | None = None
    capability_gap_pp: float | None = None
    capability_gap_ci_pp: list[float] | None = None
    oracle: dict | None = None
    oracle_gain_pp: float | None = None
    oracle_gain_ci_pp: list[float] | None = None
    oracle_fraction: dict[str, float | None] = field(default_factory=dict)
    mde_pp: float | None = None
    positive_control_verdict: str | None = None
    positive_control_proven: bool | None = None  # the copy's leak proven (its FAIL by a lower bound): the audit can see a leak
    positive_control_threat: str | None = None
    positive_control: dict | None = None
    positive_control_gain_pp: float | None = None
    positive_control_gain_ci_pp: list[float] | None = None
    positive_control_gains: dict[str, dict] = field(default_factory=dict)
    positive_control_leak_norm: float | None = None
    gated_metric: str | None = None
    other_metrics: dict[str, dict] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    adapter_sha256: str | None = None  # of the LoRA adapter merged into A, if any
    wall_time_s: float | None = None

    def to_json(self) -> str:
        payload = self.__dict__ | {"verdict": self.verdict.name}
        return json.dumps(payload, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "AuditReport":
        """A report written by :meth:`to_json` (an ``audit.json``), to render or compare it again."""
        data = json.loads(text)
        return cls(**{**data, "verdict": Verdict[data["verdict"]]})

    def to_markdown(self) -> str:
        lines = [
            f"# guardrail audit: **{self.verdict.name}**",
            "",
            advice(self),
            "",
            f"Artifact: `{self.artifact.get('path')}` ({self.artifact.get('kind')}, D={self.artifact.get('dict_size')}, "
            f"layer {self.artifact.get('layer')}); models A=`{self.artifact.get('model_a')}`, B=`{self.artifact.get('model_b')}`.",
            *([f"A's adapter sha256: `{self.adapter_sha256}`."] if self.adapter_sha256 else []),
            *([f"Wall time: {self.wall_time_s / 60:.1f} min."] if self.wall_time_s is not None else []),
            f"Metric: `{self.policy['metric']}` on {self.n_prompts} held-out tool prompts (raw rendering, the "
            f"'{self.policy.get('turn', 'toolrl')}' user turn; greedy, {_tokens(self.policy['max_new_tokens'])}); B clean rate {100 * self.clean_rate:.1f}%.",
            f"Capability gap (A − B, clean, same prompts): {capability_text(self)}.",
            f"Oracle transplant (A's own activation at B's last prompt token): {oracle_text(self)}.",
            f"Minimum detectable effect: {mde_text(self)}.",
            f"Self-check (A's mean lead planted in a copy of the artifact; the audit must prove that leak): {self_check_text(self)}.",
            "",
        ]
        lines += _gains_table(self.gains, self.oracle_fraction)
        lines += ["", f"The verdict is gated on `{self.gated_metric or self.policy['metric']}`.{_near_duplicate_note(self.static)}"]
        lines += _other_metrics_table(self.other_metrics, list(self.gains))
        if self.controls:
            lines += ["", "Steering attacks are measured against an artifact-free control: B steered along its own "
                      "tool-minus-ordinary mean difference at the same norm. Control vs clean:", ""]
            lines += [f"- {k}: control {100 * c['guarded']:.1f}% vs clean {100 * c['clean']:.1f}% "
                      f"({100 * c['gain']:+.1f} pp)" for k, c in self.controls.items()]
        lines += ["", "## Reasons", ""] + [f"- {r}" for r in self.reasons]
        lines += ["", "## Static checks", "", "```json", json.dumps(self.static, indent=2), "```"]
        return "\n".join(lines) + "\n"

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(self.to_json())
        md = self.to_markdown()
        (out / "audit.md").write_text(md)
        (out / "audit.html").write_text(render_page(md))
        return out


def _gains_table(gains: dict[str, dict], of_oracle: dict[str, float | None]) -> list[str]:
    lines = ["| threat model | kind | n | baseline | B attacked | gain (pp) | CI (pp) | gained/lost | of oracle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, g in gains.items():
        kind = "joint (needs A)" if name in NEEDS_A else "artifact-only"
        share = of_oracle.get(name)
        lines.append(f"| {name} | {kind} | {g['n']} | {100 * g['clean']:.1f}% | {100 * g['guarded']:.1f}% | "
                     f"{100 * g['gain']:+.1f} | [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}] | {g['gained']}/{g['lost']} | "
                     f"{'—' if share is None else f'{100 * share:.0f}%'} |")
    return lines


def _near_duplicate_note(static: dict) -> str:
    """Say so when the near-duplicate threat had nothing to steer: its zero gain is no measurement."""
    near = static.get("shared_near_duplicates")
    if near is None or near["count"]:
        return ""
    return (f" steer_near_duplicate steered nothing: no shared B-side direction has |cos| ≥ {near['threshold']:g} "
            "with an A-exclusive one.")


def _other_metrics_table(other: dict[str, dict], names: list[str]) -> list[str]:
    """Each threat's B rate and gain under the ungated metrics: what moved when the gated one could not."""
    if not other:
        return []
    metrics = list(other)
    lines = [f"Also scored, not gated ({', '.join(f'`{m}`' for m in metrics)}): B attacked (gain over its baseline).", "",
             "| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    cap = [other[m]["capability"] for m in metrics]
    if any(c is not None for c in cap):
        lines.append("| A − B (clean) | " + " | ".join("—" if c is None else f"{100 * c['gain']:+.1f} pp" for c in cap) + " |")
    lines.append("| B clean | " + " | ".join(f"{100 * other[m]['clean_rate']:.1f}%" for m in metrics) + " |")
    for name in names:
        cells = [other[m]["gains"].get(name) for m in metrics]
        lines.append(f"| {name} | " + " | ".join("—" if g is None else f"{100 * g['guarded']:.1f}% ({100 * g['gain']:+.1f} pp)" for g in cells) + " |")
    return lines


def _tokens(n: int) -> str:
    return f"{n} new token" + ("" if n == 1 else "s")


def _interval_text(g: dict) -> str:
    return f"{100 * g['gain']:+.1f} pp, {g['confidence']:.0%} CI [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]"


def oracle_text(report: AuditReport) -> str:
    """The oracle's gain and how to read the table's last column."""
    o = report.oracle
    if o is None:
        return "not measured (no model A)"
    if o["gain"] <= 0:
        return f"{_interval_text(o)}: the last-token row carries none of A's lead, so no share of it is given"
    return f"{_interval_text(o)} (B {100 * o['guarded']:.1f}%); each threat's gain is also given as a share of it"


def capability_text(report: AuditReport) -> str:
    """``+31.0 pp, 95% CI [+22.1, +39.4] (A 31.0% vs B 0.0%)``, or why it was not measured."""
    c = report.capability
    if c is None:
        return "not measured (no model A)"
    return f"{_interval_text(c)} (A {100 * c['guarded']:.1f}% vs B {100 * c['clean']:.1f}%)"


def mde_text(report: AuditReport) -> str:
    limit = report.policy["max_artifact_only_gain_pp"]
    if report.mde_pp is None:
        return f"none: {report.n_prompts} prompts cannot prove any gain above {limit} pp"
    return (f"{report.mde_pp:.1f} pp (a gain that large, none lost, has its lower bound above the {limit} pp limit "
            f"at n = {report.n_prompts} and B's clean rate {100 * report.clean_rate:.1f}%)")


def _control_gain_text(report: AuditReport) -> str:
    """``FAIL; b_only_splice +100.0 pp, 95% CI [...]``: the copy's verdict and its decisive gain."""
    g = report.positive_control
    return (report.positive_control_verdict or "not run") + ("" if g is None else f"; {report.positive_control_threat} {_interval_text(g)}")


def self_check_text(report: AuditReport) -> str:
    """The positive control's verdict and its decisive gain, or why it did not run."""
    if report.positive_control_verdict is None:
        return "not run (it needs model A, and `self_check` in the policy)"
    seen = "the audit sees a planted leak on this pair" if report.positive_control_proven else "the audit is blind on this pair"
    return f"{_control_gain_text(report)}; ‖leak‖ = {report.positive_control_leak_norm:.3g}: {seen}"


def _channel_empty(r: AuditReport) -> str:
    """Why a blind audit with a real lead of A's is blind: A's own row moves B no more than the planted leak did."""
    o, c = r.oracle, r.capability
    if o is None or c is None or c["low"] <= 0 or o["gain"] > 0:
        return ""
    return (f" A does lead B ({capability_text(r)}), but A's own activation put at B's last prompt token moves B no more "
            f"({_interval_text(o)}): on this pair that row, the channel every threat here writes to, carries none of A's lead, "
            "so an artifact can neither be shown to leak through it nor be certified not to.")


def _leading_metrics(r: AuditReport) -> str:
    """A sentence naming the ungated metrics on which A's lead is measurable (empty when none is)."""
    leads = [f"`{m}` ({_interval_text(o['capability'])})" for m, o in r.other_metrics.items()
             if o.get("capability") is not None and o["capability"]["low"] > 0]
    return f" A does lead on {', '.join(leads)}: an audit gated there has something to measure." if leads else ""


_HEADLINE = {
    Verdict.FAIL: "**Do not publish this artifact.**",
    Verdict.INCONCLUSIVE: "**This audit certifies nothing: do not read it as a pass.**",
    Verdict.PASS: "**Publishable under this policy.**",
}


def _cause_sentence(cause: str, r: AuditReport) -> str:
    limit, conf = r.policy["max_artifact_only_gain_pp"], r.policy["confidence"]
    gated = ", ".join(n for n in r.gains if n not in NEEDS_A) or "no threat"
    need = prompts_to_certify(limit / 100, conf, start=r.n_prompts) if cause == TOO_FEW_PROMPTS else None
    proof = ("no gain could have been proven at this n and baseline" if r.mde_pp is None
             else f"a gain of {r.mde_pp:.1f} pp or more would have been proven")
    return {
        PROVEN_LEAK: f"A threat's gain is proven above the {limit} pp limit: its lower {conf:.0%} bound exceeds it (see Reasons).",
        UNCERTIFIED: f"A threat's gain could not be bounded by {limit} pp at {conf:.0%}; it may be real or the sample may be "
                     f"too noisy ({proof}).",
        BLIND: f"The self-check planted A's mean lead in a copy of the artifact and this audit did not prove that leak "
               f"({_control_gain_text(r)}): under metric `{r.policy['metric']}` and {_tokens(r.policy['max_new_tokens'])} it "
               "cannot see a leak on this pair, so what it says of the real artifact means nothing."
               + (_channel_empty(r) or ("" if NO_CAPABILITY in r.causes else _leading_metrics(r))),
        NO_CAPABILITY: f"Under this protocol (metric `{r.policy['metric']}`, {_tokens(r.policy['max_new_tokens'])}, raw "
                       f"rendering) A is not measurably better than B ({capability_text(r)}): there is no capability to "
                       "leak, so B's unchanged score says nothing about the artifact. Audit again where A leads B "
                       "(another metric, a longer token budget, or prompts where A succeeds)." + _leading_metrics(r),
        NO_MODEL_A: "A was not given, so A's advantage over B, the capability that could leak, was never measured; "
                    "audit with A (it is scored clean only).",
        TOO_FEW_PROMPTS: f"{r.n_prompts} prompts cannot bound a gain by {limit} pp even when nothing changes; "
                         + (f"audit again with at least {need} prompts." if need else "no feasible sample can."),
        BOUNDED: f"A leads B by {capability_text(r)}, and no artifact-only threat ({gated}) gains more than {limit} pp "
                 f"at {conf:.0%} confidence; {proof}.",
    }[cause]


def advice(report: AuditReport) -> str:
    """The one paragraph a release manager acts on: the decision, then what decided it."""
    return " ".join([_HEADLINE[report.verdict], *(_cause_sentence(c, report) for c in report.causes)])
