"""Schema drift: every rule type of the policy schema, and every field of every rule, reaches the engine.

A rule type without a handler, or a field that nothing reads while a policy is compiled and
applied, is an option a policy author can write and the guard silently ignores. These tests
read the schema itself (the ``Rule`` union, each model's fields and their ``Literal`` values),
so a new type or field fails here until something consumes it.
"""

from __future__ import annotations

import json
import types
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import torch
from pydantic import BaseModel

from guard_fixtures import build_artifact
from guardrail.policy import Policy, TokenPositions, compile_policy
from guardrail.policy.engine import RULE_HANDLERS
from guardrail.policy.schema import RULE_TYPES, Selector, rule_actions
from guardrail.policy.telemetry import DECISION

# One rule of each type with only what it requires; variants below vary every Literal and
# bool field of it. A new rule type needs an entry here (the test says so).
BASE_RULES: dict[str, dict[str, Any]] = {
    "SteerRule": {"action": "steer", "select": {"partition": "shared"}},
    "ClampRule": {"action": "clamp", "select": {"partition": "a_exclusive"}},
    "SpliceRule": {"action": "splice"},
    "AlertRule": {"action": "alert", "select": {"partition": "a_exclusive"}},
    "AbortRule": {"action": "abort", "select": {"partition": "a_exclusive"}},
}
# Selectors that reach every branch of resolve_selector, used with a steer rule.
SELECTORS: list[dict[str, Any]] = [
    {"indices": [0, 1]},
    {"indices": [0], "partition": "a_exclusive"},
    {"partition": "b_exclusive"},
    {"ranked": "tool", "top": 2},
    {"ranked": "tool", "partition": "shared", "negatives": "template"},
]


def _unwrap(annotation: Any) -> list[Any]:
    """The members of an Optional/Union annotation (the annotation itself otherwise)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices(annotation: Any) -> list[Any]:
    """Every value a Literal or bool field can take ([] for open-ended fields)."""
    out: list[Any] = []
    for a in _unwrap(annotation):
        if get_origin(a) is Literal:
            out += list(get_args(a))
        elif a is bool:
            out += [False, True]
    return out


def _variants(rule_type: type[BaseModel]) -> list[dict[str, Any]]:
    """The base rule of ``rule_type``, then one copy per value of each of its Literal/bool fields."""
    base = BASE_RULES.get(rule_type.__name__)
    assert base is not None, f"{rule_type.__name__} is in the policy schema's Rule union but has no BASE_RULES sample here"
    out = [dict(base)]
    for name, info in rule_type.model_fields.items():
        out += [{**base, name: value} for value in _choices(info.annotation)]
    return out


def _policies() -> list[Policy]:
    """A one-rule policy per variant the schema accepts (a Literal value may be refused beside
    another field), then one per selector."""
    rows = [row for rule_type in RULE_TYPES for row in _variants(rule_type)]
    rows += [{**BASE_RULES["SteerRule"], "select": select} for select in SELECTORS]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(Policy.from_data({"name": "p", "telemetry": {"otel": False}, "rules": [{"id": f"r{i}", **row}]}))
        except ValueError:
            continue
    return out


def _models(rule_type: type[BaseModel]) -> set[type[BaseModel]]:
    """``rule_type`` and every pydantic model its fields hold (the Selector)."""
    out = {rule_type}
    for info in rule_type.model_fields.values():
        for a in _unwrap(info.annotation):
            if isinstance(a, type) and issubclass(a, BaseModel):
                out |= _models(a)
    return out


@pytest.fixture(scope="module")
def art(tiny_pair, tmp_path_factory):
    """The guard tests' DFC, its ranking given a template contrast too (``negatives: template``)."""
    out = tmp_path_factory.mktemp("dispatch") / "dfc"
    path, info = build_artifact(tiny_pair, out)
    plain = json.loads((path / "ranking.json").read_text())
    contrasts = {name: {**plain, "negatives": name} for name in ("plain", "template")}
    (path / "ranking.json").write_text(json.dumps({"format": "guardrail.ranking", **contrasts}))
    return {"path": path, **info}


def _positions(n: int) -> TokenPositions:
    """Two requests; the first half of each is prompt, the rest generated, so every ``positions`` value covers tokens."""
    half = n // 2
    request = (torch.arange(n) >= half).long()
    position = torch.arange(n) - request * half
    prompt = position < max(half // 2, 1)
    last = prompt & ~torch.roll(prompt, -1)
    return TokenPositions(prompt, last, request, position, ["r0", "r1"])


def test_every_rule_type_has_exactly_one_handler():
    union = set(RULE_TYPES)
    missing = sorted(t.__name__ for t in union - set(RULE_HANDLERS))
    stale = sorted(t.__name__ for t in set(RULE_HANDLERS) - union)
    assert not missing, f"rule types of the policy schema with no handler in guardrail.policy.engine.RULE_HANDLERS: {missing}"
    assert not stale, f"handlers for types that are not in the policy schema's Rule union: {stale}"


def test_every_action_has_a_telemetry_decision():
    actions = {a for t in RULE_TYPES for a in rule_actions(t)}
    assert actions - set(DECISION) == set(), "actions with no gen_ai.guardrail.decision.type in telemetry.DECISION"


def test_variants_cover_every_literal_value():
    """The samples below reach each value of each Literal/bool field the schema accepts alone."""
    rules = [p.rules[0] for p in _policies()]
    for rule_type in RULE_TYPES:
        mine = [r for r in rules if type(r) is rule_type]
        for name, info in rule_type.model_fields.items():
            if choices := _choices(info.annotation):
                assert set(choices) <= {getattr(r, name) for r in mine}, (rule_type.__name__, name)
    selectors = [r.select for r in rules if isinstance(getattr(r, "select", None), Selector)]
    for name, info in Selector.model_fields.items():
        if choices := _choices(info.annotation):
            assert set(choices) <= {getattr(s, name) for s in selectors}, ("Selector", name)


def test_every_rule_field_is_read_by_the_engine(art):
    """Compile and apply every variant while recording which model fields are read.

    The policies are validated before recording starts, so the schema's own validators do
    not count: only the engine (compilation, selection, the handlers, the apply loop) does.
    """
    policies = _policies()
    tracked = set().union(*(_models(t) for t in RULE_TYPES))
    reads: set[tuple[type, str]] = set()

    def recorder(original):
        def getattribute(self, name):
            if name in type(self).model_fields:
                reads.add((type(self), name))
            return original(self, name)

        return getattribute

    x = art["acts"][:, 0]
    pos = _positions(x.shape[0])
    originals = {cls: cls.__getattribute__ for cls in tracked}
    with pytest.MonkeyPatch.context() as mp:
        for cls, original in originals.items():
            mp.setattr(cls, "__getattribute__", recorder(original))
        for policy in policies:
            result = compile_policy(policy, art["path"]).apply(x, pos)
            assert result.errors == 0, (policy.rules[0], result.events)
    unread = sorted(f"{cls.__name__}.{name}" for cls in tracked for name in cls.model_fields if (cls, name) not in reads)
    assert not unread, f"policy fields no engine code reads (a policy author could set them to no effect): {unread}"
