"""What a vLLM request carries for guardrail, in ``SamplingParams.extra_args``.

- ``{"guardrail_policy": name}`` picks one of the installed policies (``"none"`` opts out
  where allowed; a request that names none gets the engine's default policy, if any);
- ``{"guardrail_patch": {"layer": L, "vector": [...]}}`` replaces the residual after layer L
  at the request's last prompt token, once, during its prefill (the paper's protocol);
- ``{"guardrail_read": {"layer": L, "positions": "last" | "prompt", "last_n": N}}`` keeps the
  residual after layer L (after any patch) at the request's last prompt token (``"last"``, the
  default) or at its prompt tokens (``"prompt"``: all of them, or the last N), for the caller to
  take once the request is done.

A request that carries neither is never written, so it is token-identical to an unguarded engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

POLICY_KEY = "guardrail_policy"
PATCH_KEY = "guardrail_patch"
READ_KEY = "guardrail_read"
NO_POLICY = "none"


def request_extra(runner: Any, req_id: str) -> dict[str, Any]:
    """The ``extra_args`` of a running request (empty when it has none)."""
    state = runner.requests.get(req_id)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    return extra if isinstance(extra, dict) else {}


def patch_args(vector: Sequence[float], layer: int) -> dict[str, Any]:
    """``extra_args`` of a request whose last prompt token is patched after ``layer``."""
    return {PATCH_KEY: {"layer": int(layer), "vector": list(vector)}}


def patch_vector(extra: dict[str, Any], layer: int) -> list[float] | None:
    """The vector a request asks to write after ``layer``, or None."""
    patch = extra.get(PATCH_KEY)
    if not isinstance(patch, dict) or patch.get("layer") != layer:
        return None
    return patch.get("vector")


ReadPositions = Literal["last", "prompt"]


@dataclass(frozen=True)
class ReadRequest:
    """Which prompt positions a request keeps after ``layer`` (``guardrail_read``)."""

    layer: int
    positions: ReadPositions = "last"
    last_n: int | None = None  # with "prompt": only the last N prompt tokens

    def first_position(self, n_prompt: int) -> int:
        """The first kept position of a prompt of ``n_prompt`` tokens (the rest up to its end are kept)."""
        if self.positions == "last":
            return n_prompt - 1
        return 0 if self.last_n is None else max(n_prompt - self.last_n, 0)

    def extra_args(self) -> dict[str, Any]:
        """The ``extra_args`` of a request that asks for this read."""
        if self.positions not in ("last", "prompt"):
            raise ValueError(f"read positions must be 'last' or 'prompt', not {self.positions!r}")
        read: dict[str, Any] = {"layer": int(self.layer), "positions": self.positions}
        if self.last_n is not None:
            read["last_n"] = int(self.last_n)
        return {READ_KEY: read}


def read_args(layer: int, positions: ReadPositions = "last", last_n: int | None = None) -> dict[str, Any]:
    """``extra_args`` of a request whose residual after ``layer`` is kept at ``positions``."""
    return ReadRequest(layer, positions, last_n).extra_args()


def read_request(extra: dict[str, Any], layer: int) -> ReadRequest | None:
    """What a request asks to keep after ``layer``, or None."""
    read = extra.get(READ_KEY)
    if not isinstance(read, dict) or read.get("layer") != layer:
        return None
    return ReadRequest(layer, read.get("positions", "last"), read.get("last_n"))


def policy_choice_problem(extra_args: Any, names: Iterable[str], allow_none: bool) -> str | None:
    """Why a request's choice of policy cannot be served, or None when it can.

    ``guardrail serve`` asks this where the request arrives, so that a typo in a policy name
    is an HTTP 400 naming the policy, not a completion whose text is an abort message. The
    worker still stops such a request (in-process engines have no HTTP layer).
    """
    if not isinstance(extra_args, dict) or POLICY_KEY not in extra_args:
        return None  # no choice: the server's default policy applies
    name = extra_args[POLICY_KEY]
    known = sorted(names)
    if not isinstance(name, str):
        return f"{POLICY_KEY} must be a policy name (a string), got {type(name).__name__}; this server has {known}"
    if name == NO_POLICY:
        return None if allow_none else f"{POLICY_KEY}: {NO_POLICY!r} (opting out of the guard) is not allowed on this server; policies: {known}"
    if name not in known:
        extra = f' or "{NO_POLICY}"' if allow_none else ""
        return f"unknown guardrail policy {name!r}; this server has {known}{extra}"
    return None
