"""Policy files: YAML validated by strict pydantic models.

A policy names an artifact (crosscoder folder) and a list of rules. Each rule selects
features (by index, by partition, or by a ranked label stored in the artifact's
``ranking.json``), an action, the token positions it applies to, and what happens when its
hook fails (``on_error``). Numbers that reach the model (gains, clamp values) are bounded
here, so a typo cannot push the residual stream to infinity.

Errors name the field and the YAML line: ``rules[1].threshold (line 14): ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

Positions = Literal["last_prompt", "prompt", "generated", "all"]
OnError = Literal["fail-open", "fail-closed"]
PartitionName = Literal["a_exclusive", "b_exclusive", "shared"]

# Bounds on what a policy may inject into the residual stream.
MAX_ALPHA = 256.0  # the paper sweeps α up to 64
MAX_GAIN = 16.0  # additive gain, in units of the site's typical norm
MAX_CLAMP = 1.0e4  # feature activations are ReLU outputs: ≥ 0
MAX_FEATURES = 65536
RULE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class PolicyError(ValueError):
    """A policy file is invalid; ``problems`` lists (field path, line, message)."""

    def __init__(self, source: str, problems: list[tuple[str, int | None, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{field}{f' (line {line})' if line else ''}: {msg}" for field, line, msg in problems]
        super().__init__(f"invalid policy {source}:\n  " + "\n  ".join(lines))

    @property
    def fields(self) -> list[str]:
        return [p[0] for p in self.problems]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_Strict):
    """Which features a rule acts on: explicit indices, a partition, a ranked label, or a mix.

    ``{partition: a_exclusive}`` is every A-exclusive feature; ``{ranked: tool, top: 1}`` is
    the best-ranked feature of label ``tool`` in ``ranking.json``; combining ``partition`` with
    ``ranked`` keeps only ranked features of that partition (then takes ``top``).
    ``negatives`` picks the contrast the label was ranked in: ``plain`` (tool prompts vs
    ordinary prompts, the paper's) or ``template`` (vs prompts under the same tool template
    where no tool applies), which does not reward features that only mark the template.
    """

    indices: list[Annotated[int, Field(ge=0, lt=MAX_FEATURES)]] | None = Field(default=None, min_length=1, max_length=4096)
    partition: PartitionName | None = None
    ranked: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    top: int | None = Field(default=None, ge=1, le=4096)
    negatives: Literal["plain", "template"] = Field(
        default="plain",
        description="which ranking `ranked` reads: plain = tool vs ordinary prompts (the paper's); template = tool prompts vs prompts under the same tool template where no tool applies",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Selector":
        if self.indices is None and self.partition is None and self.ranked is None:
            raise ValueError("select needs at least one of indices, partition, ranked")
        if self.indices is not None and self.ranked is not None:
            raise ValueError("select: give indices or ranked, not both")
        if self.top is not None and self.ranked is None:
            raise ValueError("select.top only applies with select.ranked")
        if "negatives" in self.model_fields_set and self.ranked is None:
            raise ValueError("select.negatives only applies with select.ranked")
        return self


class _RuleBase(_Strict):
    id: str = Field(pattern=RULE_ID, description="unique within the policy; appears in every event")
    on_error: OnError | None = Field(default=None, description="override the policy's on_error for this rule")


class SteerRule(_RuleBase):
    """Amplify/steer features. ``mode: scale`` is the paper's δ = Σ(α−1)·f_i·d_i; ``additive``
    adds g·‖x‖_typ·d_i/‖d_i‖ whether or not the feature fired."""

    action: Literal["steer", "amplify"]
    select: Selector
    mode: Literal["scale", "additive"] = "scale"
    alpha: float = Field(default=1.0, ge=-MAX_ALPHA, le=MAX_ALPHA, allow_inf_nan=False)
    gain: float = Field(default=0.0, ge=-MAX_GAIN, le=MAX_GAIN, allow_inf_nan=False)
    positions: Positions = "last_prompt"

    @model_validator(mode="after")
    def _mode_params(self) -> "SteerRule":
        if self.mode == "scale" and "gain" in self.model_fields_set:
            raise ValueError("gain applies to mode: additive; scale mode uses alpha")
        if self.mode == "additive" and "alpha" in self.model_fields_set:
            raise ValueError("alpha applies to mode: scale; additive mode uses gain")
        return self


class ClampRule(_RuleBase):
    """Set features to ``value`` (usually 0). ``method: encoder`` makes the smallest edit after
    which re-encoding reads the value; ``decoder`` adds Σ(v − f_i)·d_i (reconstruction edit)."""

    action: Literal["clamp"]
    select: Selector
    value: float = Field(default=0.0, ge=0.0, le=MAX_CLAMP, allow_inf_nan=False)
    method: Literal["encoder", "decoder"] = "encoder"
    positions: Positions = "all"


class SpliceRule(_RuleBase):
    """Replace A's activation by the crosscoder's reconstruction (the paper's splice)."""

    action: Literal["splice"]
    keep_error: bool = Field(default=False, description="add back the error term x − x̂")
    positions: Positions = "last_prompt"


class AlertRule(_RuleBase):
    """Emit an event when any selected feature is above ``threshold``."""

    action: Literal["alert"]
    select: Selector
    threshold: float = Field(default=0.0, ge=0.0, le=MAX_CLAMP, allow_inf_nan=False)
    positions: Positions = "all"


class AbortRule(AlertRule):
    """Like alert, then stop the request with a clear error message."""

    action: Literal["abort"]  # type: ignore[assignment]
    message: str = Field(default="request stopped by guardrail policy", max_length=200)


Rule = Annotated[Union[SteerRule, ClampRule, SpliceRule, AlertRule, AbortRule], Field(discriminator="action")]
# The rule models of the union, read from it so there is one list to extend.
RULE_TYPES: tuple[type[_RuleBase], ...] = get_args(get_args(Rule)[0])


def rule_actions(rule_type: type[_RuleBase]) -> tuple[str, ...]:
    """The ``action`` values that select ``rule_type`` (``steer`` and ``amplify`` both select SteerRule)."""
    return get_args(rule_type.model_fields["action"].annotation)


class TelemetryConfig(_Strict):
    """Where events go. Content (prompt text, token ids) is never exported unless opted in."""

    alert_log: str | None = Field(
        default=None,
        description="JSONL file for fired rules; a relative path is under $GUARDRAIL_HOME (not beside the policy file, which may sit in an installed package)",
    )
    otel: bool = True
    capture_content: bool = False
    queue_size: int = Field(default=10000, ge=1, le=1_000_000)


class Policy(_Strict):
    """A named set of rules applied at one crosscoder's site."""

    name: str = Field(pattern=RULE_ID)
    description: str = Field(default="", max_length=2000)
    artifact: str | None = Field(default=None, description="crosscoder artifact folder; relative to the policy file")
    layer: int | None = Field(default=None, ge=0, description="if given, must match the artifact's layer")
    encoding: Literal["single", "joint"] = Field(
        default="single",
        description=(
            "single: features from the served model A alone (A-exclusive pre-activations exact; their codes exact only "
            "under a per-partition top-k, approximate under the paper's joint top-k); joint: the paper's, needs B too"
        ),
    )
    on_error: OnError = "fail-open"
    telemetry: TelemetryConfig = TelemetryConfig()
    rules: list[Rule] = Field(min_length=1, max_length=256)
    _source: str | None = PrivateAttr(default=None)  # file the policy was read from

    @property
    def source(self) -> str | None:
        return self._source

    @model_validator(mode="after")
    def _unique_ids(self) -> "Policy":
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"duplicate rule id {rule.id!r}")
            seen.add(rule.id)
        if sum(isinstance(r, SpliceRule) for r in self.rules) > 1:
            raise ValueError("at most one splice rule per policy")
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        """Read and validate a YAML policy file; raises :class:`PolicyError` naming field + line.

        Files over ``MAX_POLICY_BYTES`` are refused unparsed, and YAML anchors/aliases are
        refused (see :class:`PolicyYAMLLoader`).
        """
        path = Path(path)
        policy = cls.from_yaml(read_policy_text(path), source=str(path))
        policy._source = str(path.resolve())
        return policy

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> "Policy":
        data, lines = parse_yaml_with_lines(text, source)
        return cls.from_data(data, source, lines)

    @classmethod
    def from_data(cls, data: Any, source: str = "<data>", lines: dict[tuple, int] | None = None) -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError(source, [("<root>", 1 if lines is not None else None, f"a policy is a mapping, got {type(data).__name__}")])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(source, _problems(exc, lines or {})) from None

    def resolve_path(self, value: str | None) -> Path | None:
        """A path from the policy, relative to the policy file's folder."""
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p

    def alert_log_path(self) -> Path | None:
        """Where this policy's JSONL alert log goes: absolute as written, else under ``$GUARDRAIL_HOME``.

        Never relative to the policy file: the shipped policies live inside the installed
        package, and telemetry must not be written into site-packages.
        """
        value = self.telemetry.alert_log
        if value is None:
            return None
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        from guardrail.paths import home

        return home() / p

    def with_alert_log(self, path: str | Path) -> "Policy":
        """A copy whose alert log is ``path`` (a command line's ``--alert-log``), same source file."""
        telemetry = self.telemetry.model_copy(update={"alert_log": str(Path(path).expanduser().resolve())})
        copy = self.model_copy(update={"telemetry": telemetry})
        copy._source = self._source
        return copy

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of policy files, for editors (yaml-language-server) and other tools."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "guardrail policy"
    return schema


def schema_text() -> str:
    return json.dumps(policy_json_schema(), indent=2)


# --------------------------------------------------------------------------- YAML with lines
# Limits on what the loader reads. The largest policy the schema allows is far smaller than
# any of them; they exist so that a hostile file costs at most its own bytes to refuse.
MAX_POLICY_BYTES = 64 * 1024
MAX_YAML_DEPTH = 32  # nested collections; a policy needs 5
MAX_YAML_NODES = 20_000  # scalars + collections; a rule of 4096 indices is 4100


class _DuplicateKey(ValueError):
    pass


class PolicyYAMLRefused(yaml.MarkedYAMLError):
    """A construct policies never need (an anchor, an alias, too deep, too many nodes)."""


class PolicyYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, composing one policy document within fixed bounds.

    Anchors and aliases are refused at the composer, before any node is built: expanding
    aliases is what makes a nine-line "billion laughs" file cost gigabytes, and no policy
    needs them. Flow collections (``[[[…``) are bounded in the scanner, whose bookkeeping
    grows with the square of their depth; block nesting and the node count are bounded in
    the composer. Each refusal carries the mark (line) where it happened.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    # scanner: bound flow nesting before its cost grows
    def fetch_flow_collection_start(self, TokenClass):  # noqa: N803 - PyYAML's signature
        if self.flow_level >= MAX_YAML_DEPTH:
            raise PolicyYAMLRefused(None, None, f"collections nested deeper than {MAX_YAML_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    # composer: no anchors, no aliases, bounded depth and size
    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise PolicyYAMLRefused(None, None, f"alias *{event.anchor}: policies do not use YAML anchors or aliases", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise PolicyYAMLRefused(None, None, f"anchor &{event.anchor}: policies do not use YAML anchors or aliases", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise PolicyYAMLRefused(None, None, f"more than {MAX_YAML_NODES} YAML nodes", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise PolicyYAMLRefused(None, None, f"collections nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_large(source: str, size: int | str) -> PolicyError:
    return PolicyError(source, [("<file>", None, f"policy file larger than {MAX_POLICY_BYTES} bytes ({size}); policies are small, this is not one")])


def read_policy_text(path: Path) -> str:
    """The file's text, reading at most ``MAX_POLICY_BYTES + 1`` bytes (a pipe or device may never end)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(str(path), [("<file>", None, f"cannot read: {exc}")]) from exc
    if len(raw) > MAX_POLICY_BYTES:
        raise _too_large(str(path), "at least " + str(len(raw)) + " bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [("<file>", None, f"not UTF-8 text: {exc}")]) from exc


def parse_yaml_with_lines(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML safely and map every path (tuple of keys/indices) to its 1-based line."""
    if len(text) > MAX_POLICY_BYTES or len(text.encode("utf-8", errors="surrogatepass")) > MAX_POLICY_BYTES:
        raise _too_large(source, f"{len(text)} characters")
    loader = None
    try:
        loader = PolicyYAMLLoader(text)  # the reader refuses control characters here
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(source, [("<yaml>", line, str(getattr(exc, "problem", None) or exc))]) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. malformed unicode escapes
        raise PolicyError(source, [("<yaml>", None, str(exc))]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise PolicyError(source, [("<root>", 1, "empty policy file")])
    lines: dict[tuple, int] = {}
    try:
        data = _construct(node, (), lines, yaml.constructor.SafeConstructor())
    except _DuplicateKey as exc:
        path, line = exc.args
        raise PolicyError(source, [(_fmt(path), line, "duplicate key")]) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)  # e.g. a !!python/... tag the safe loader refuses
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(source, [("<yaml>", line, str(getattr(exc, "problem", None) or exc))]) from None
    return data, lines


def _construct(node: yaml.Node, path: tuple, lines: dict[tuple, int], constructor: yaml.constructor.SafeConstructor) -> Any:
    """Plain data from a composed node tree (no aliases: every node is visited once)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise ValueError(f"line {key_node.start_mark.line + 1}: mapping keys must be plain scalars")
            if key in out:
                raise _DuplicateKey(path + (key,), key_node.start_mark.line + 1)
            out[key] = _construct(value_node, path + (key,), lines, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(child, path + (i,), lines, constructor) for i, child in enumerate(node.value)]
    return constructor.construct_object(node, deep=True)


_TAGS = {action for rule_type in RULE_TYPES for action in rule_actions(rule_type)}  # pydantic's union tags


def _problems(exc: ValidationError, lines: dict[tuple, int]) -> list[tuple[str, int | None, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # drop union tags pydantic inserts (rules.0.clamp.value → rules.0.value)
        clean = tuple(p for i, p in enumerate(loc) if not (isinstance(p, str) and p in _TAGS and i > 0 and isinstance(loc[i - 1], int)))
        line = None
        for cut in range(len(clean), -1, -1):
            if clean[:cut] in lines:
                line = lines[clean[:cut]]
                break
        out.append((_fmt(clean) or "<root>", line, err["msg"]))
    return out


def _fmt(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s
