"""Compile a policy against a crosscoder and apply it to a flat batch of token activations.

Engines (transformers hooks, the vLLM worker hook) hand :meth:`CompiledPolicy.apply` the
raw activations of the tokens of the requests that use this policy, plus which of those
tokens are prompt / last-prompt / generated; it returns the rows to write back, the events
to emit and the requests to abort. All feature math is in
:mod:`guardrail.features.interventions`. Each rule type has one handler in
:data:`RULE_HANDLERS`, looked up by the rule's exact type.

Failure handling: each rule runs inside ``try``; ``fail-open`` skips the rule (an ``error``
event is emitted), ``fail-closed`` aborts the requests whose tokens the rule was handling.
Whatever happens, non-finite values never reach the model (reverted rows are counted).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel

from guardrail.features import interventions as iv
from guardrail.features.ranking import RANKING_FILE, Rankings
from guardrail.policy.schema import AbortRule, AlertRule, ClampRule, Policy, PolicyError, SpliceRule, SteerRule
from guardrail.policy.telemetry import Telemetry, telemetry_for

MAX_EVENT_FEATURES = 8


class GuardError(RuntimeError):
    """A policy cannot be applied to this artifact/model (raised at install time)."""


# --------------------------------------------------------------------------- token positions
@dataclass
class TokenPositions:
    """Per-token facts an engine knows about a flat batch ``[N]``."""

    prompt: torch.Tensor  # bool: token is part of its request's prompt
    last_prompt: torch.Tensor  # bool: token is the last prompt token
    request: torch.Tensor  # long: index into ``request_ids``
    position: torch.Tensor  # long: absolute position in its sequence
    request_ids: list[str] = field(default_factory=list)

    @property
    def generated(self) -> torch.Tensor:
        return ~self.prompt

    def mask(self, positions: str) -> torch.Tensor:
        if positions == "all":
            return torch.ones_like(self.prompt)
        if positions == "prompt":
            return self.prompt
        if positions == "last_prompt":
            return self.last_prompt
        if positions == "generated":
            return ~self.prompt
        raise ValueError(f"unknown positions {positions!r}")

    def subset(self, rows: torch.Tensor) -> "TokenPositions":
        return TokenPositions(self.prompt[rows], self.last_prompt[rows], self.request[rows], self.position[rows], self.request_ids)

    def request_id(self, row: int) -> str:
        """The id of the request token ``row`` belongs to (its index when the engine gave no ids)."""
        req = int(self.request[row])
        return self.request_ids[req] if self.request_ids else str(req)


@dataclass
class ApplyResult:
    rows: torch.Tensor | None = None  # long [M]: tokens whose activation changes
    values: torch.Tensor | None = None  # [M, d]: their new raw activations
    events: list[dict[str, Any]] = field(default_factory=list)
    aborted: dict[str, str] = field(default_factory=dict)  # request id -> message
    nan_reverted: int = 0
    errors: int = 0


@dataclass
class EditState:
    """What the rules of one :meth:`CompiledPolicy.apply` call share: the covered tokens,
    their codes, and the edit built so far (``base + delta`` is written back).

    A handler commits to ``base``/``delta`` as its last step, so a rule that raises
    leaves the edit as the rules before it left it.
    """

    xs: torch.Tensor  # [M, d] A's raw activations of the covered tokens
    xb: torch.Tensor | None  # B's, under joint encoding
    f: torch.Tensor  # [M, D] their feature codes
    sub: TokenPositions
    result: ApplyResult
    base: torch.Tensor  # what the edits are added to: A's activation, or its splice
    delta: torch.Tensor

    def add_delta(self, rm: torch.Tensor, d: torch.Tensor) -> None:
        delta = self.delta.clone()
        delta[rm] += d
        self.delta = delta

    def set_base(self, rm: torch.Tensor, values: torch.Tensor) -> None:
        base = self.base.clone()
        base[rm] = values
        self.base = base


RuleFn = Callable[["CompiledPolicy", "CompiledRule", torch.Tensor, EditState], None]


@dataclass(frozen=True)
class RuleHandler:
    """How the engine runs one rule type.

    ``apply(policy, rule, rows, state)`` edits ``state`` on the rows the rule covers.
    ``rebases``: the rule replaces the base the other edits are added to (splice), so such
    rules run before every other rule. ``gated``: an alert-like rule with a ``threshold``,
    whose tokens are pre-screened by :func:`~guardrail.features.interventions.alert_candidates`.
    """

    apply: RuleFn
    rebases: bool = False
    gated: bool = False


@dataclass
class CompiledRule:
    rule: Any
    idx: torch.Tensor | None  # selected feature indices (None for splice)
    on_error: str
    handler: RuleHandler


# --------------------------------------------------------------------------- rule handlers
def _splice(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> None:
    x_hat = iv.reconstruct(policy.view, st.f[rm])
    spliced = iv.splice(st.xs[rm], x_hat, cr.rule.keep_error)
    for r in rm.tolist():
        st.result.events.append(policy._event(st.sub, r, cr.rule.id, cr.rule.action))
    st.set_base(rm, spliced)


def _fire_alert(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> torch.Tensor:
    """Emit the alert events of rows ``rm``; returns which rows fired."""
    rule, idx = cr.rule, cr.idx
    fired = iv.alert_mask(st.f[rm], idx, rule.threshold)
    hit = fired.any(dim=-1)
    if bool(hit.any()):
        feats = iv.top_features(st.f[rm][:, idx], idx, fired, MAX_EVENT_FEATURES)
        policy._emit(st.result, st.sub, rm, hit, rule.id, rule.action, feats, threshold=rule.threshold)
    return hit


def _alert(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> None:
    _fire_alert(policy, cr, rm, st)


def _abort(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> None:
    hit = _fire_alert(policy, cr, rm, st)
    for r in rm[hit].tolist():
        st.result.aborted.setdefault(st.sub.request_id(r), f"{cr.rule.message} (policy {policy.name}, rule {cr.rule.id})")


def _steer(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> None:
    rule, idx, view = cr.rule, cr.idx, policy.view
    if rule.mode == "scale":
        d = iv.steer_scale_delta(st.f[rm], idx, view.dirs_raw, rule.alpha)
        fired = (st.f[rm][:, idx] > 0).any(dim=-1)
    else:
        d = iv.steer_additive_delta(rm.numel(), idx, view.dirs_raw, rule.gain, view.typical_norm)
        fired = torch.ones(rm.numel(), dtype=torch.bool)
    vals = st.f[rm][:, idx]
    policy._emit(st.result, st.sub, rm, fired, rule.id, rule.action, iv.top_features(vals, idx, vals > 0, MAX_EVENT_FEATURES))
    st.add_delta(rm, d)


def _clamp(policy: "CompiledPolicy", cr: CompiledRule, rm: torch.Tensor, st: EditState) -> None:
    rule, idx, view = cr.rule, cr.idx, policy.view
    if rule.method == "decoder":
        d = iv.clamp_delta_decoder(st.f[rm], idx, view.dirs_raw, rule.value)
    else:
        current = st.base[rm] + st.delta[rm]
        d = iv.clamp_delta_encoder(view, current, idx, rule.value, None if st.xb is None else st.xb[rm])
    fired = (d != 0).any(dim=-1)
    vals = st.f[rm][:, idx]
    policy._emit(st.result, st.sub, rm, fired, rule.id, rule.action, iv.top_features(vals, idx, vals > 0, MAX_EVENT_FEATURES), value=rule.value)
    st.add_delta(rm, d)


# Keyed by the exact rule type, never by isinstance: AbortRule subclasses AlertRule, and a
# chain of isinstance tests only ran aborts as aborts because of the order of its branches.
# tests/test_policy_dispatch.py fails when a type of the schema's Rule union, or a field of
# one, reaches no handler.
RULE_HANDLERS: dict[type[BaseModel], RuleHandler] = {
    SteerRule: RuleHandler(_steer),
    ClampRule: RuleHandler(_clamp),
    SpliceRule: RuleHandler(_splice, rebases=True),
    AlertRule: RuleHandler(_alert, gated=True),
    AbortRule: RuleHandler(_abort, gated=True),
}


def handler_for(rule: BaseModel, where: str = "rule") -> RuleHandler:
    """The handler of ``rule``'s exact type; a type without one is refused at compile time."""
    handler = RULE_HANDLERS.get(type(rule))
    if handler is None:
        raise GuardError(f"{where}: unsupported rule type {type(rule).__name__}")
    return handler


# --------------------------------------------------------------------------- selection
def load_ranking(artifact_dir: str | Path | None) -> Rankings | None:
    """The artifact's ranking sidecar (:class:`~guardrail.features.ranking.Rankings`), None if absent."""
    if artifact_dir is None or not (Path(artifact_dir) / RANKING_FILE).exists():
        return None
    try:
        return Rankings.load(artifact_dir)
    except ValueError as exc:
        raise GuardError(str(exc)) from None


def resolve_selector(select: Any, partition: Any, dict_size: int, ranking: Rankings | None, where: str) -> torch.Tensor:
    """Feature indices a selector names; errors say which rule and what is missing."""
    if select.indices is not None:
        bad = [i for i in select.indices if i >= dict_size]
        if bad:
            raise GuardError(f"{where}.select.indices: {bad[:5]} out of range for a dictionary of {dict_size} features")
        chosen = list(dict.fromkeys(select.indices))
        if select.partition is not None:
            allowed = set(getattr(partition, select.partition))
            outside = [i for i in chosen if i not in allowed]
            if outside:
                raise GuardError(f"{where}.select.indices: {outside[:5]} are not in partition {select.partition}")
    elif select.ranked is not None:
        if ranking is None:
            raise GuardError(f"{where}.select.ranked: label {select.ranked!r} needs the artifact's {RANKING_FILE}, which is missing (run `guardrail rank`)")
        try:
            labels = ranking.get(select.negatives).labels
        except KeyError as exc:
            raise GuardError(f"{where}.select.negatives: the artifact's {RANKING_FILE}: {exc.args[0]}") from None
        if select.ranked not in labels:
            raise GuardError(f"{where}.select.ranked: the artifact's {select.negatives} ranking has no label {select.ranked!r} (labels: {sorted(labels)})")
        chosen = [int(i) for i in labels[select.ranked]]
        if select.partition is not None:
            allowed = set(getattr(partition, select.partition))
            chosen = [i for i in chosen if i in allowed]
        if select.top is not None:
            chosen = chosen[: select.top]
        if not chosen:
            raise GuardError(f"{where}.select: ranked label {select.ranked!r} has no feature in partition {select.partition}")
    else:
        chosen = list(getattr(partition, select.partition))
        if not chosen:
            raise GuardError(f"{where}.select.partition: {select.partition} is empty in this artifact (a standard crosscoder has no exclusive features)")
    return torch.tensor(chosen, dtype=torch.long)


# --------------------------------------------------------------------------- compiled policy
class CompiledPolicy:
    """A policy bound to a crosscoder: feature indices resolved, tensors precomputed."""

    def __init__(self, policy: Policy, cc: Any, *, artifact_dir: str | Path | None = None, telemetry: Telemetry | None = None, engine: str = "") -> None:
        self.policy = policy
        self.cc = cc
        self.engine = engine
        manifest = getattr(cc, "manifest", None)
        self.layer = policy.layer if policy.layer is not None else getattr(manifest, "layer", None)
        if policy.layer is not None and manifest is not None and manifest.layer is not None and manifest.layer != policy.layer:
            raise GuardError(f"policy {policy.name}: layer {policy.layer} but the artifact was trained at layer {manifest.layer}")
        if self.layer is None:
            raise GuardError(f"policy {policy.name}: no layer (the artifact manifest has none; set `layer:` in the policy)")
        self.view = iv.dictionary_view(cc, iv.MODEL_A)
        self.joint = policy.encoding == "joint"
        ranking = load_ranking(artifact_dir)
        partition = cc.partition
        self.rules: list[CompiledRule] = []
        for i, rule in enumerate(policy.rules):
            where = f"rules[{i}] ({rule.id})"
            handler = handler_for(rule, where)
            select = getattr(rule, "select", None)
            idx = None if select is None else resolve_selector(select, partition, self.view.dict_size, ranking, where)
            self.rules.append(CompiledRule(rule, idx, rule.on_error or policy.on_error, handler))
        tcfg = policy.telemetry
        self.telemetry = telemetry or telemetry_for(
            policy.alert_log_path(), otel=tcfg.otel, capture_content=tcfg.capture_content, queue_size=tcfg.queue_size
        )
        self.nan_reverted = 0
        self.errors = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.policy.name

    def positions_used(self) -> set[str]:
        return {r.rule.positions for r in self.rules}

    # ------------------------------------------------------------------ apply
    @torch.no_grad()
    def apply(self, x: torch.Tensor, pos: TokenPositions, x_b: torch.Tensor | None = None) -> ApplyResult:
        """Apply every rule to the tokens it covers. ``x`` is A's raw activation ``[N, d]``."""
        result = ApplyResult()
        if self.joint and x_b is None:
            raise GuardError(f"policy {self.name} uses joint encoding but the engine gave no B activation")
        rule_masks = self._gate_alerts([pos.mask(r.rule.positions) for r in self.rules], x, x_b)
        touched = torch.zeros_like(pos.prompt)
        for m in rule_masks:
            touched |= m
        if not bool(touched.any()):
            return result
        rows = touched.nonzero().squeeze(-1)
        xs = x[rows].float()
        xb = x_b[rows].float() if self.joint else None
        sub = pos.subset(rows)
        masks_sub = [m[rows] for m in rule_masks]
        f = iv.encode(self.view, xs, xb)
        state = EditState(xs, xb, f, sub, result, base=xs, delta=torch.zeros_like(xs))
        # rebasing rules (splice) first: they define the base the other edits are added to.
        order = sorted(range(len(self.rules)), key=lambda i: not self.rules[i].handler.rebases)
        for i in order:
            cr, m = self.rules[i], masks_sub[i]
            if not bool(m.any()):
                continue
            try:
                cr.handler.apply(self, cr, m.nonzero().squeeze(-1), state)
            except Exception as exc:  # noqa: BLE001 - a broken rule must not take the server down
                self._on_rule_error(cr, m, sub, exc, result)
        new = state.base + state.delta
        changed = (new != xs).any(dim=-1)
        if bool(changed.any()):
            safe, bad = iv.sanitize(new, xs)
            if bad:
                result.nan_reverted += bad
                with self._lock:
                    self.nan_reverted += bad
                result.events.append(self._event(sub, int(changed.nonzero()[0]), "nan-guard", "error", reason=f"{bad} non-finite rows reverted"))
            keep = changed
            result.rows = rows[keep]
            result.values = safe[keep].to(x.dtype)
        return result

    def _gate_alerts(self, masks: list[torch.Tensor], x: torch.Tensor, x_b: torch.Tensor | None) -> list[torch.Tensor]:
        """Drop from each alert rule the tokens where it cannot fire (see ``iv.alert_candidates``).

        A monitoring policy then encodes only the few tokens near its threshold; a token
        still covered by another rule is encoded anyway, and alerts stay exact.
        """
        out = []
        for cr, m in zip(self.rules, masks):
            if cr.handler.gated and bool(m.any()):
                rows = m.nonzero().squeeze(-1)
                xb = x_b[rows].float() if self.joint else None
                try:
                    cand = iv.alert_candidates(self.view, x[rows].float(), cr.idx, cr.rule.threshold, xb)
                except Exception:  # noqa: BLE001 - ungated, the rule meets its own on_error handling
                    cand = None
                if cand is not None:
                    m = m.clone()
                    m[rows] = cand
            out.append(m)
        return out

    def _emit(self, result, sub, rm, hit, rule_id, action, features, **extra) -> None:
        """One event per hit row of ``rm``, with its top features (already computed for all rows)."""
        for j in hit.nonzero().squeeze(-1).tolist():
            result.events.append(self._event(sub, int(rm[j]), rule_id, action, features=features[j], **extra))

    def _on_rule_error(self, cr, m, sub, exc, result) -> None:
        result.errors += 1
        with self._lock:
            self.errors += 1
        reason = f"{type(exc).__name__}: {exc}"[:300]
        rows = m.nonzero().squeeze(-1).tolist()
        result.events.append(self._event(sub, rows[0], cr.rule.id, "error", reason=reason, on_error=cr.on_error))
        if cr.on_error == "fail-closed":
            for r in rows:
                result.aborted.setdefault(sub.request_id(r), f"guardrail rule {cr.rule.id} of policy {self.name} failed ({reason}); request stopped (fail-closed)")

    def _event(self, sub: TokenPositions, r: int, rule: str, action: str, **extra: Any) -> dict[str, Any]:
        return {
            "policy": self.name,
            "rule": rule,
            "action": action,
            "request": sub.request_id(r),
            "position": int(sub.position[r]),
            "phase": "prompt" if bool(sub.prompt[r]) else "generated",
            "layer": self.layer,
            "engine": self.engine,
            **extra,
        }


def compile_policy(policy: Policy, artifact: Any = None, *, engine: str = "") -> CompiledPolicy:
    """Bind a policy to a crosscoder (an object, an artifact folder, or the policy's ``artifact``)."""
    from guardrail.dictionary import load_artifact

    artifact_dir = None
    if artifact is None:
        if policy.artifact is None:
            raise GuardError(f"policy {policy.name} names no artifact; pass one")
        artifact = policy.resolve_path(policy.artifact)
    if isinstance(artifact, (str, Path)):
        artifact_dir = Path(artifact)
        cc = load_artifact(artifact_dir)
        cc.artifact_dir = str(artifact_dir)
    else:
        cc = artifact
        src = getattr(cc, "artifact_dir", None) or getattr(cc, "path", None)
        artifact_dir = Path(src) if src else None
    return CompiledPolicy(policy, cc, artifact_dir=artifact_dir, engine=engine)


class PolicyStore:
    """Named compiled policies with atomic reload: an invalid new policy keeps the old one."""

    def __init__(self) -> None:
        self._policies: dict[str, CompiledPolicy] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> CompiledPolicy | None:
        return self._policies.get(name)

    def names(self) -> list[str]:
        return sorted(self._policies)

    def items(self):
        return list(self._policies.items())

    def set(self, name: str, compiled: CompiledPolicy) -> None:
        with self._lock:
            new = dict(self._policies)
            new[name] = compiled
            self._policies = new  # one reference swap: hooks see the old or the new dict

    def remove(self, name: str) -> None:
        with self._lock:
            self._policies = {k: v for k, v in self._policies.items() if k != name}

    def reload(self, name: str, source: str | Path | Policy, artifact: Any = None, engine: str = "") -> CompiledPolicy:
        """Parse + compile first; only a policy that fully compiles replaces the active one."""
        policy = Policy.load(source) if not isinstance(source, Policy) else source
        compiled = compile_policy(policy, artifact, engine=engine)
        self.set(name, compiled)
        return compiled


__all__ = [
    "RULE_HANDLERS",
    "ApplyResult",
    "CompiledPolicy",
    "CompiledRule",
    "EditState",
    "GuardError",
    "PolicyError",
    "PolicyStore",
    "RuleHandler",
    "TokenPositions",
    "compile_policy",
    "handler_for",
    "resolve_selector",
]
