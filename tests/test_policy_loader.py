"""The policy loader under hostile input: alias bombs, oversized files, deep nesting, odd bytes."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardrail.policy import Policy, PolicyError
from guardrail.policy import schema as policy_schema

# The file from the report: nine levels of anchors, each a list of nine aliases of the one
# before, 9^9 (387 million) leaves once expanded. Today's loaders that expand aliases hang.
BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
) + "\n"

VALID = "name: p\nrules:\n  - {id: r, action: alert, select: {partition: a_exclusive}}\n"


class _ConstructionBudget:
    """Counts objects PyYAML's constructor builds and stops the loader past a budget.

    A loader that refuses the bomb builds at most a handful of objects; one that expands
    aliases builds hundreds of millions. The budget turns that hang into a fast failure.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = yaml.constructor.BaseConstructor.construct_object

        def counted(constructor, node, deep=False):
            self.calls += 1
            if self.calls > self.limit:
                raise AssertionError(f"the loader built more than {self.limit} YAML objects from a {len(BOMB)}-byte file")
            return original(constructor, node, deep=deep)

        monkeypatch.setattr(yaml.constructor.BaseConstructor, "construct_object", counted)


def test_alias_bomb_is_refused_before_expansion(tmp_path, monkeypatch):
    budget = _ConstructionBudget(limit=10_000)
    budget.install(monkeypatch)
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(PolicyError, match=r"<yaml> \(line 1\): .*anchor") as info:
        Policy.load(path)
    assert info.value.fields == ["<yaml>"]
    assert budget.calls < 100


@pytest.mark.parametrize(
    "text, line",
    [
        ("name: &n p\nrules: []\n", 1),  # an anchor alone
        ("name: p\nrules:\n  - &r {id: r, action: alert, select: {partition: a_exclusive}}\n  - *r\n", 3),
        ("base: &b {x: 1}\nname: p\nrules:\n  - <<: *b\n", 1),  # merge keys need an alias
    ],
)
def test_anchors_and_aliases_are_refused_naming_the_line(text, line):
    with pytest.raises(PolicyError, match=rf"<yaml> \(line {line}\): .*(anchor|alias)"):
        Policy.from_yaml(text)


def test_oversized_file_is_refused_unparsed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(policy_schema, "PolicyYAMLLoader", lambda *a: calls.append(a))
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (policy_schema.MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match=rf"larger than {policy_schema.MAX_POLICY_BYTES} bytes"):
        Policy.load(path)
    with pytest.raises(PolicyError, match="larger than"):
        Policy.from_yaml("#" * (policy_schema.MAX_POLICY_BYTES + 1))
    assert calls == []


def test_endless_file_is_read_only_up_to_the_limit(monkeypatch):
    """A device or pipe that never ends (``/dev/zero``) is refused after the limit, not read to the end."""
    zero = Path("/dev/zero")
    if not zero.exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(PolicyError, match="larger than"):
        Policy.load(zero)


def test_nesting_deeper_than_the_limit_is_refused():
    deep = policy_schema.MAX_YAML_DEPTH + 1
    with pytest.raises(PolicyError, match="nested deeper than"):
        Policy.from_yaml("name: p\nrules: " + "[" * deep + "]" * deep + "\n")
    with pytest.raises(PolicyError, match="nested deeper than"):
        Policy.from_yaml("[" * (policy_schema.MAX_POLICY_BYTES - 1))


def test_too_many_nodes_are_refused():
    n = policy_schema.MAX_YAML_NODES + 1
    with pytest.raises(PolicyError, match="more than"):
        Policy.from_yaml("[" + "0," * n + "]")


def test_limits_leave_room_for_real_policies():
    """The largest selector the schema allows still loads (4096 indices in one rule)."""
    rule = {"id": "r", "action": "alert", "select": {"indices": list(range(4096))}}
    policy = Policy.from_yaml(yaml.safe_dump({"name": "p", "rules": [rule] * 1}))
    assert len(policy.rules[0].select.indices) == 4096
    root = Path(__file__).resolve().parents[1] / "policies"
    for path in root.glob("*.yaml"):
        Policy.load(path)


def test_committed_json_schema_is_the_generated_one():
    committed = (Path(__file__).resolve().parents[1] / "policies" / "policy.schema.json").read_text()
    assert json.loads(committed) == policy_schema.policy_json_schema(), "run `guardrail policy schema -o policies/policy.schema.json`"


# --------------------------------------------------------------------------- property-based
_names = st.text(alphabet="abcdefghij", min_size=1, max_size=3)


def _sizes(small: int, large: list[int]) -> st.SearchStrategy[int]:
    """Small sizes and a few near and past the loader's limits (shrinking alone rarely reaches them)."""
    return st.one_of(st.integers(1, small), st.sampled_from(large))


def _alias_doc(anchors: list[str], width: int) -> str:
    """Nested anchors, each level a list of ``width`` aliases of the level before (a bomb when deep)."""
    lines = [f"{anchors[0]}: &{anchors[0]} [x]"]
    for prev, cur in zip(anchors, anchors[1:]):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n" + VALID


_alias_docs = st.builds(_alias_doc, st.lists(_names, min_size=1, max_size=12, unique=True), st.integers(1, 12))
_deep = st.builds(lambda d, o, c: "name: p\nrules: " + o * d + c * d, _sizes(40, [1000, 70_000]), st.sampled_from(["[", "{a: ", "- "]), st.sampled_from(["]", "}", ""]))
def _huge_scalar_doc(n: int, ch: str, quoted: bool) -> str:
    q = '"' if quoted else ""
    return f"name: {q}{ch * n}{q}\nrules: []\n"


_huge_scalar = st.builds(_huge_scalar_doc, _sizes(64, [4096, 65_000, 300_000]), st.sampled_from(["a", "9", " ", "\\", "é", "\x00", "\ufeff"]), st.booleans())
_encodings = st.builds(lambda text, enc: text.encode(enc, errors="replace"), st.sampled_from([VALID, BOMB, "name: é\nrules: []\n"]), st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]))
_tags = st.sampled_from(["!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!custom x", "!!timestamp 2001-12-14", "? [a, b]\n: c", "{[a]: b}", "%YAML 1.1\n---\na", "a\n---\nb", "--- !!str\n"])
_documents = st.one_of(
    _alias_docs.map(str.encode),
    _deep.map(str.encode),
    _huge_scalar.map(lambda s: s.encode("utf-8", errors="surrogatepass")),
    _encodings,
    _tags.map(lambda t: (VALID + "x: " + t + "\n").encode()),
    st.binary(max_size=2000),
    st.lists(st.sampled_from([VALID.encode(), BOMB.encode(), b"&a ", b"*a ", b"[", b"]", b"{", b"}", b": ", b"- ", b"\n", b"\t", b"'", b'"', b"\\u", b"\xff", b"\x00"]), max_size=60).map(b"".join),
)


@settings(max_examples=300, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(data=_documents)
def test_loader_never_hangs_and_raises_only_policy_error(tmp_path, data):
    """Generated hostile YAML (aliases, nesting, huge scalars, encodings, tags) loads or raises PolicyError."""
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    try:
        Policy.load(path)
    except PolicyError as exc:
        assert exc.problems and all(isinstance(f, str) and f for f in exc.fields)
