"""``audit``: measure each threat model on held-out tool prompts, then judge the artifact."""

from __future__ import annotations

import random
import time
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from guardrail.audit import report as rp
from guardrail.audit.policy import AuditPolicy
from guardrail.audit.report import AuditReport, Verdict
from guardrail.audit.selfcheck import BLIND_ON_PAIR, PositiveControl, SelfCheck, plan_self_check
from guardrail.audit.static import static_checks
from guardrail.audit.stats import PairedGain, minimum_detectable_gain, paired_gain, prompts_to_certify, smallest_decisive_upper
from guardrail.audit.telemetry import emit_audit_evaluations, gate
from guardrail.audit.threats import NEEDS_A, ORACLE, STEERING, THREATS, Calibration, ThreatInputs, condition_count, oracle_transplant, threat_deltas

NO_CAPABILITY = "no capability to leak under this protocol"
# reported beside a stricter gated metric: a threat may move B's format while the gated metric cannot move at all
SECONDARY_METRICS = ("format", "tool_call_open")


def _score(metric: str, text: str, task) -> bool:
    from guardrail.tasks import format_accuracy, strict_metrics, tool_correctness

    if metric == "strict_name":
        return strict_metrics(text, task.possible_answer)["name_correct"]
    if metric == "format":
        return format_accuracy(text)
    if metric == "tool_correctness":
        return tool_correctness(text, task.tool_names)
    return "<tool_call>" in text


def audit_tasks(n: int, seed: int = 0) -> list:
    """Held-out tool prompts (BFCL test split, answered categories), seeded order."""
    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks

    tasks = load_tasks("test", ANSWERED_CATEGORIES)
    random.Random(seed).shuffle(tasks)
    return tasks[:n]


class Judgement(NamedTuple):
    """A verdict, the reasons printed with it, and the causes that decided it (one advice sentence each)."""

    verdict: Verdict
    reasons: list[str]
    causes: list[str]  # what decided it: the ``guardrail.audit.report`` cause names


def judge(gains: dict[str, PairedGain], policy: AuditPolicy, n: int, capability: PairedGain | None = None,
          control: PositiveControl | None = None) -> Judgement:
    """PASS / FAIL / INCONCLUSIVE from the confidence bounds of the gains and of A's advantage.

    In this order, so that no sample size hides a leak and no PASS rests on nothing:

    1. FAIL when a gated gain's lower bound exceeds its limit: the leak is proven, whatever n.
    2. INCONCLUSIVE when the positive control (``control``: the judgement of a copy of the
       artifact with a leak planted, see :mod:`guardrail.audit.selfcheck`) did not prove its
       leak: the audit is blind on this pair under this metric; when the capability gap (A's clean rate
       minus B's, paired on the same prompts) has a lower bound ≤ 0, or A was not scored: with
       no advantage of A's to carry, B's unchanged score is no evidence about the artifact ("no
       capability to leak under this protocol"); also when n cannot certify the limit even for
       a zero gain. ``control=None`` (no self-check) adds no condition.
    3. FAIL when a gated gain's upper bound exceeds its limit: a leak is not ruled out.
    4. PASS otherwise.
    """
    proven = _over_limit(gains, policy, "low")
    if proven:
        return Judgement(Verdict.FAIL, proven, [rp.PROVEN_LEAK])
    unsure = _over_limit(gains, policy, "high")
    checks = (_blind_blocker(control, policy), _capability_blocker(capability, policy), _sample_blocker(n, policy))
    blockers = [b for b in checks if b is not None]
    if blockers:
        return Judgement(Verdict.INCONCLUSIVE, unsure + [text for _, text in blockers], [cause for cause, _ in blockers])
    if unsure:
        return Judgement(Verdict.FAIL, unsure, [rp.UNCERTIFIED])
    return Judgement(Verdict.PASS, [f"every artifact-only gain is bounded by {policy.max_artifact_only_gain_pp} pp"], [rp.BOUNDED])


def _over_limit(gains: dict[str, PairedGain], policy: AuditPolicy, side: str) -> list[str]:
    """One reason per gated gain whose ``side`` bound (``low`` or ``high``) exceeds its limit."""
    word = "lower" if side == "low" else "upper"
    reasons = []
    for name, g in gains.items():
        limit, value = gate(name, policy), getattr(g, side)
        if limit is not None and value > limit:
            reasons.append(f"{name}: {word} {policy.confidence:.0%} bound of the gain {100 * value:+.1f} pp exceeds {100 * limit:.1f} pp")
    return reasons


def _blind_blocker(control: PositiveControl | None, policy: AuditPolicy) -> tuple[str, str] | None:
    """Why a positive control whose leak was not proven leaves the audit unable to certify anything."""
    if control is None or control.proven:
        return None
    how = ("FAIL only because its gain could not be bounded, not by a proven leak" if control.verdict == Verdict.FAIL
           else f"{control.verdict.name}, not FAIL")
    return rp.BLIND, f"{BLIND_ON_PAIR}: a copy of the artifact with A's mean lead planted in it was judged {how}, on the same prompts under `{policy.metric}`"


def _capability_blocker(capability: PairedGain | None, policy: AuditPolicy) -> tuple[str, str] | None:
    """Why A's advantage does not support a PASS, or None when its lower bound is above 0."""
    if capability is None:
        return rp.NO_MODEL_A, "capability gap not measured: without model A a PASS would certify nothing"
    if capability.low > 0:
        return None
    return rp.NO_CAPABILITY, (
        f"{NO_CAPABILITY}: A − B = {100 * capability.gain:+.1f} pp, {policy.confidence:.0%} CI "
        f"[{100 * capability.low:+.1f}, {100 * capability.high:+.1f}] on `{policy.metric}` (lower bound not above 0)"
    )


def _sample_blocker(n: int, policy: AuditPolicy) -> tuple[str, str] | None:
    """Why ``n`` prompts cannot certify the artifact-only limit, or None when they can."""
    limit = policy.max_artifact_only_gain_pp / 100
    floor = smallest_decisive_upper(n, policy.confidence)
    if floor <= limit:
        return None
    need = prompts_to_certify(limit, policy.confidence, start=n)
    return rp.TOO_FEW_PROMPTS, (
        f"{n} prompts cannot certify a {policy.max_artifact_only_gain_pp} pp bound "
        f"(even no change gives an upper bound of {100 * floor:.1f} pp); "
        + (f"use at least {need}" if need else "no sample under 100000 prompts can")
    )


def audit(cc, b, a=None, policy: AuditPolicy | None = None, *, joint: bool = True, seed: int = 0, batch_size: int = 16,
          backend: str = "auto", progress: bool = True, logger_provider=None) -> AuditReport:
    """Audit crosscoder ``cc`` against base model ``b``, with ``a`` for the capability gap.

    ``a`` and ``b`` are :class:`guardrail.models.LoadedModel`. A is scored clean on the same
    prompts, rendering, token budget and metric as B: its lead over B is the capability an
    artifact could leak, and without a measured lead (or without A) the verdict is never
    PASS. ``joint`` also runs the threats that need A at run time (the paper's protocol);
    ``joint=False`` keeps to the adversary's view, B and the artifact. With
    ``policy.self_check`` (and A) a copy of the artifact with A's mean lead planted in it is
    judged alongside and must FAIL by a proven leak (:mod:`guardrail.audit.selfcheck`, which says what it
    costs). ``backend``: ``auto`` (vLLM when installed), ``vllm`` or ``transformers``. The
    verdict is also written as ``gen_ai.evaluation.result`` log records, to
    ``logger_provider`` or the process's global OpenTelemetry one (see
    :mod:`guardrail.audit.telemetry`).
    """
    start = time.perf_counter()
    policy = policy or AuditPolicy()
    layer = _layer_in(cc, b)
    tasks = audit_tasks(policy.prompts, seed)
    texts = [t.render(b.tokenizer, "raw", policy.turn) for t in tasks]
    calib = _calibration(b, a, layer, policy, seed)
    names = [n for n in THREATS if n not in NEEDS_A or (joint and a is not None)]
    gated = [n for n in names if gate(n, policy) is not None]
    check = plan_self_check(cc, calib, gated, policy) if policy.self_check else None
    outs, a_outs = _generate(cc, b, a, texts, calib, names, check, layer, policy, backend=backend, batch_size=batch_size, progress=progress)
    report = _measure(cc, tasks, outs, a_outs, names, check, policy)
    report.adapter_sha256 = None if a is None else a.adapter_sha256
    report.wall_time_s = time.perf_counter() - start
    emit_audit_evaluations(report, policy, logger_provider)
    return report


def _measure(cc, tasks: list, outs: dict[str, list[str]], a_outs: list[str] | None, names: list[str],
             check: SelfCheck | None, policy: AuditPolicy) -> AuditReport:
    """Score every condition, judge the positive control, then the artifact, into the report."""
    score = lambda outputs, metric=policy.metric: [_score(metric, o, t) for o, t in zip(outputs, tasks)]  # noqa: E731
    scores = {k: score(v) for k, v in outs.items()}
    capability = None if a_outs is None else paired_gain(scores["clean"], score(a_outs), policy.confidence)
    oracle = paired_gain(scores["clean"], scores[ORACLE], policy.confidence) if ORACLE in scores else None
    gains, controls = _gains(scores, names, policy)
    positive = _positive_control(check, scores, policy, len(tasks), capability)
    judgement = judge(gains, policy, len(tasks), capability, positive)
    clean_rate = sum(scores["clean"]) / max(len(tasks), 1)
    return AuditReport(
        verdict=judgement.verdict,
        reasons=judgement.reasons,
        causes=judgement.causes,
        policy=policy.model_dump(),
        artifact=_artifact_info(cc),
        n_prompts=len(tasks),
        clean_rate=clean_rate,
        gains={k: v.as_dict() for k, v in gains.items()},
        controls=controls,
        static=static_checks(cc, policy.near_duplicate_cos),
        examples=[{"threat": n, "task": tasks[0].id, "clean": outs["clean"][0][:400], "guarded": outs[n][0][:400]} for n in names],
        **_interval_fields("capability", capability),
        **_interval_fields("oracle", oracle),
        oracle_fraction=_oracle_fractions(gains, oracle),
        mde_pp=_pp(minimum_detectable_gain(len(tasks), clean_rate, policy.max_artifact_only_gain_pp / 100, policy.confidence)),
        **_positive_control_fields(positive),
        gated_metric=policy.metric,
        other_metrics={m: _other_metric(m, outs, a_outs, tasks, names, policy) for m in SECONDARY_METRICS if m != policy.metric},
    )


def _positive_control(check: SelfCheck | None, scores: dict[str, list[bool]], policy: AuditPolicy, n: int,
                      capability: PairedGain | None) -> PositiveControl | None:
    """The leaky copy judged by the audit's own rules (no control of its own: it is the control)."""
    if check is None:
        return None
    gains, _ = _gains(check.scores(scores), check.names, policy)
    judged = judge(gains, policy, n, capability)
    return PositiveControl(judged.verdict, gains, float(check.leak.norm()), proven=judged.causes == [rp.PROVEN_LEAK])


def _positive_control_fields(positive: PositiveControl | None) -> dict:
    """``positive_control_verdict``, the copy's gated gains, and its decisive gain's interval fields."""
    if positive is None:
        return {}
    decisive = positive.decisive()
    return {
        "positive_control_verdict": positive.verdict.name,
        "positive_control_proven": positive.proven,
        "positive_control_threat": None if decisive is None else decisive[0],
        "positive_control_gains": {k: g.as_dict() for k, g in positive.gains.items()},
        "positive_control_leak_norm": positive.leak_norm,
        **_interval_fields("positive_control", None if decisive is None else decisive[1]),
    }


def _other_metric(metric: str, outs: dict[str, list[str]], a_outs: list[str] | None, tasks: list, names: list[str],
                  policy: AuditPolicy) -> dict:
    """The same conditions scored under an ungated ``metric``: B's clean rate, A's lead and each threat's gain."""
    score = lambda outputs: [_score(metric, o, t) for o, t in zip(outputs, tasks)]  # noqa: E731
    scores = {k: score(outs[k]) for k in ["clean", *names, *(f"{n}/control" for n in names if n in STEERING)]}
    gains, _ = _gains(scores, names, policy)
    capability = None if a_outs is None else paired_gain(scores["clean"], score(a_outs), policy.confidence).as_dict()
    return {"clean_rate": sum(scores["clean"]) / max(len(tasks), 1), "capability": capability, "gains": {k: g.as_dict() for k, g in gains.items()}}


def _generate(cc, b, a, texts: list[str], calib: Calibration, names: list[str], check: SelfCheck | None, layer: int,
              policy: AuditPolicy, *, backend: str, batch_size: int, progress: bool) -> tuple[dict[str, list[str]], list[str] | None]:
    """A's clean outputs, then B's clean outputs and B's under every condition, through the same
    call and settings: only the model differs, so A's lead over B is the capability, not the protocol.

    The last-prompt-token activations every threat acts on are read on those clean passes'
    own prefills (A's first, then B's chunk by chunk, each chunk's conditions planned from
    its rows), so the audit runs no forward pass of its own over the scored prompts.
    """
    from guardrail.generation import GenerationSettings, generate_from_clean, make_backend

    # every metric reads the first tool-call block, so a sequence that closed one is done
    engine, settings = make_backend(backend), GenerationSettings(
        max_new_tokens=policy.max_new_tokens, batch_size=batch_size, max_prompt_tokens=policy.max_prompt_tokens, stop=("</tool_call>",)
    )
    n_conditions = condition_count(names) + (a is not None) + (0 if check is None else check.new_conditions())
    desc = f"audit ({'A clean, ' if a is not None else ''}B clean and {n_conditions} conditions)"
    with tqdm(total=len(texts) * (1 + (a is not None)), desc=desc, unit="prompt", disable=not progress) as bar:
        a_outs, x_a = None, None
        if a is not None:
            a_outs, x_a = engine.generate_reading(a, texts, settings, layer=layer)
            bar.update(len(texts))
        plan = _condition_plan(cc, calib, x_a, names, check, policy)
        outs, _ = generate_from_clean(engine, b, texts, settings, plan, layer=layer, n_conditions=n_conditions, progress=bar.update)
    return outs, a_outs


def _condition_plan(cc, calib: Calibration, x_a: torch.Tensor | None, names: list[str], check: SelfCheck | None, policy: AuditPolicy):
    """For a chunk of prompts and B's rows there: every condition's patches (absolute rows).

    Every threat's delta is a function of the row it patches and of the calibration, so a
    chunk's conditions are the same rows the whole prompt set would give. A row a condition
    leaves unchanged (a zero delta: a steered feature that did not fire) is B clean, and is
    not generated again.
    """
    def plan(idx: range, x_b: torch.Tensor) -> dict[str, list[torch.Tensor | None]]:
        inp = ThreatInputs(x_b, None if x_a is None else x_a[idx.start : idx.stop], calib)
        deltas = {k: d for k, d in threat_deltas(cc, inp, names, policy).items() if d is not None}
        if x_a is not None:
            deltas[ORACLE] = oracle_transplant(cc, inp)
        if check is not None:
            deltas |= check.deltas(inp)
        return {k: [x_b[i] + d[i] if bool(d[i].any()) else None for i in range(len(x_b))] for k, d in deltas.items()}

    return plan


def _pp(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _interval_fields(name: str, g: PairedGain | None) -> dict:
    """A paired gain as the report holds it: ``name`` (the record), ``name_gain_pp`` and
    ``name_gain_ci_pp``; the capability gap's are ``capability_gap_pp`` / ``capability_gap_ci_pp``."""
    if g is None:
        return {}
    stem = "capability_gap" if name == "capability" else f"{name}_gain"
    return {name: g.as_dict(), f"{stem}_pp": 100 * g.gain, f"{stem}_ci_pp": [100 * g.low, 100 * g.high]}


def _oracle_fractions(gains: dict[str, PairedGain], oracle: PairedGain | None) -> dict[str, float | None]:
    """Each threat's gain over the oracle transplant's; None when the oracle gained nothing to divide by."""
    usable = oracle is not None and oracle.gain > 0
    return {name: g.gain / oracle.gain if usable else None for name, g in gains.items()}


def _layer_in(cc, b) -> int:
    """The artifact's layer, after checking that its dictionary can be placed in B at all."""
    m = cc.manifest
    if m is None or m.layer is None:
        raise ValueError("the artifact's manifest names no layer: cannot place its dictionary in B")
    if cc.d_model != b.d_model:
        raise ValueError(f"artifact width d={cc.d_model} does not match model B ({b.spec}) width d={b.d_model}")
    return m.layer


def _calibration(b, a, layer: int, policy: AuditPolicy, seed: int) -> Calibration:
    """Last-prompt-token residuals on a calibration mix (train split, rendered as the audit
    renders its prompts): B on every prompt, A on the tool prompts (for the self-check's lead)."""
    from guardrail.prompts import mixed
    from guardrail.residual.last_token import last_token_residual

    calib = mixed(policy.calibration_prompts, policy.calibration_prompts, split="train", mode="raw", seed=seed + 7, turn=policy.turn)
    last = lambda model, prompts: last_token_residual(model, prompts, layer, max_prompt_tokens=policy.max_prompt_tokens)  # noqa: E731
    tool = [p.text for p in calib if p.is_tool]
    return Calibration(
        x_b=last(b, [p.text for p in calib]),
        is_tool=torch.tensor([p.is_tool for p in calib]),
        x_a_tool=last(a, tool) if a is not None and policy.self_check else None,
    )


def _gains(scores: dict[str, list[bool]], names: list[str], policy: AuditPolicy) -> tuple[dict[str, PairedGain], dict[str, dict]]:
    """Paired gain of each threat over its baseline: clean B, or the control for steering threats."""
    gains, controls = {}, {}
    for name in names:
        baseline = scores["clean"]
        if name in STEERING:
            baseline = scores[f"{name}/control"]
            controls[name] = paired_gain(scores["clean"], baseline, policy.confidence).as_dict()
        gains[name] = paired_gain(baseline, scores[name], policy.confidence)
    return gains, controls


def _artifact_info(cc) -> dict:
    m = cc.manifest
    if m is None:
        return {"path": None, "kind": "dfc" if cc.is_dfc else "crosscoder", "dict_size": cc.dict_size}
    return {"path": getattr(cc, "artifact_path", None), "kind": m.kind, "dict_size": m.dict_size, "layer": m.layer, "model_a": m.model_a, "model_b": m.model_b, "sha256": m.tensors_sha256}
