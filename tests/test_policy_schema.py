"""The exported policy JSON Schema, checked by a real JSON Schema validator (``jsonschema``).

Editors validate policy files with the schema alone (``policies/policy.schema.json``), so it must
accept every policy we ship and refuse what the loader refuses wherever JSON Schema can say
so: unknown fields, values outside an enum, wrong types, bounds. Rules that relate two fields
(model validators) are not in the exported schema; each such example is listed below with the
rule, and the test asserts the schema lets it through, so a schema that learns one of them
moves it to the other list. Refusals of the YAML text itself (anchors, aliases, tags,
duplicate keys, size and depth limits) happen before any schema sees data and are not compared.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from guardrail.audit.policy import AuditPolicy
from guardrail.policy import Policy, PolicyError, policy_json_schema
from guardrail.policy.schema import MAX_ALPHA, MAX_CLAMP, MAX_GAIN

SCHEMA = policy_json_schema()
ALERT = {"id": "r", "action": "alert", "select": {"partition": "a_exclusive"}}


def _policy(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "p", "rules": list(rules), **top}


def _rule(action: str, **fields: Any) -> dict[str, Any]:
    return {"id": "r", "action": action, "select": {"partition": "a_exclusive"}, **fields}


# Refused by the loader and by the schema: tests/test_guard.py, test_security.py, test_policy_watch.py and the fuzzers' vocabulary.
BOTH_REFUSE: dict[str, dict[str, Any]] = {
    "clamp value 1e9 (test_guard)": _policy(_rule("clamp", value=1e9)),
    "typo alpah (test_guard)": _policy({"id": "s", "action": "steer", "select": {"indices": [1]}, "alpah": 3}),
    "no rules (test_guard)": _policy(),
    "unknown partition 'nowhere' (reload test)": _policy({"id": "a", "action": "alert", "select": {"partition": "nowhere"}}),
    "unknown action 'explode' (fuzz)": _policy({"id": "r", "action": "explode"}),
    "unknown top-level field": _policy(ALERT, x=1),
    "on_error outside its enum": _policy(ALERT, on_error="fail-sometimes"),
    "positions outside its enum": _policy(_rule("alert", positions="everywhere")),
    "rule id with a space": _policy({**ALERT, "id": "two words"}),
    "rules as a mapping": {"name": "p", "rules": {"id": "r"}},
    "indices as a string": _policy({"id": "r", "action": "alert", "select": {"indices": "1, 2"}}),
    "threshold as a list": _policy(_rule("alert", threshold=[1])),
    **{f"{action}.{field} above its bound (test_security)": _policy(_rule(action, **{field: 1.0001 * limit, **extra}))
       for (action, field, limit, extra) in (("steer", "alpha", MAX_ALPHA, {}), ("steer", "gain", MAX_GAIN, {"mode": "additive"}),
                                             ("clamp", "value", MAX_CLAMP, {}), ("alert", "threshold", MAX_CLAMP, {}))},
    "steer.alpha below its bound (test_security)": _policy(_rule("steer", alpha=-1.0001 * MAX_ALPHA)),
    "clamp.value negative (test_security)": _policy(_rule("clamp", value=-1.0)),
    "alert.threshold infinite (test_security)": _policy(_rule("alert", threshold=math.inf)),
    "steer.alpha minus infinity (test_security)": _policy(_rule("steer", alpha=-math.inf)),
}

# Refused by the loader only: the rule relates fields, or is one JSON Schema cannot state.
LOADER_ONLY: dict[str, tuple[str, dict[str, Any]]] = {
    "empty selector": ("select needs at least one of indices, partition, ranked (model validator)",
                       _policy({"id": "r", "action": "alert", "select": {}})),
    "indices with ranked": ("indices or ranked, not both (model validator)",
                            _policy({"id": "r", "action": "alert", "select": {"indices": [1], "ranked": "tool"}})),
    "top without ranked": ("select.top only with select.ranked (model validator)",
                           _policy({"id": "r", "action": "alert", "select": {"partition": "a_exclusive", "top": 1}})),
    "negatives without ranked (test_ranking)": ("select.negatives only with select.ranked (model validator)",
                                                _policy(_rule("alert") | {"select": {"partition": "a_exclusive", "negatives": "template"}})),
    "gain in scale mode": ("gain applies to mode additive (model validator)", _policy(_rule("steer", gain=0.5))),
    "alpha in additive mode": ("alpha applies to mode scale (model validator)", _policy(_rule("steer", mode="additive", alpha=4.0))),
    "duplicate rule ids": ("rule ids unique within the policy (model validator)", _policy(ALERT, ALERT)),
    "two splice rules": ("at most one splice rule (model validator)",
                         _policy({"id": "a", "action": "splice"}, {"id": "b", "action": "splice"})),
    "NaN threshold (test_security)": ("not a number: JSON has no NaN and every comparison with it is false (allow_inf_nan=False)",
                                      _policy(_rule("alert", threshold=math.nan))),
}


def _schema_errors(data: dict[str, Any], schema: dict[str, Any] = SCHEMA) -> list[str]:
    return [e.message for e in Draft202012Validator(schema).iter_errors(data)]


def _shipped(folder: str) -> list[tuple[str, dict[str, Any]]]:
    """The YAML files of a shipped policy folder, read from the installed package (what a user gets)."""
    root = resources.files("guardrail.policies")
    folder_root = root.joinpath(folder) if folder else root
    return [(p.name, yaml.safe_load(p.read_text())) for p in sorted(folder_root.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")]


def test_the_exported_schema_is_a_valid_2020_12_schema():
    Draft202012Validator.check_schema(SCHEMA)
    Draft202012Validator.check_schema(AuditPolicy.model_json_schema())


@pytest.mark.parametrize("name,data", _shipped(""), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_guard_policy_validates(name, data):
    assert _schema_errors(data) == [], name
    Policy.from_data(data, name)


@pytest.mark.parametrize("name,data", _shipped("audit"), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shipped_audit_policy_validates_against_its_schema(name, data):
    assert _schema_errors(data, AuditPolicy.model_json_schema()) == [], name
    AuditPolicy.model_validate(data)


def test_there_are_shipped_policies_to_check():
    assert len(_shipped("")) >= 3 and len(_shipped("audit")) >= 1


@pytest.mark.parametrize("case", sorted(BOTH_REFUSE))
def test_the_schema_refuses_what_the_loader_refuses(case):
    data = BOTH_REFUSE[case]
    with pytest.raises(PolicyError):
        Policy.from_data(data)
    assert _schema_errors(data), f"{case}: the loader refuses it, the schema lets it through"


@pytest.mark.parametrize("case", sorted(LOADER_ONLY))
def test_rules_the_schema_cannot_state_are_listed(case):
    rule, data = LOADER_ONLY[case]
    with pytest.raises(PolicyError):
        Policy.from_data(data)
    assert _schema_errors(data) == [], f"{case}: the schema now refuses it ({rule}); move it to BOTH_REFUSE"
