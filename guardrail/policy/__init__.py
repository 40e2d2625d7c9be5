"""Declarative guardrail policies: schema (YAML + pydantic), compilation against a
crosscoder, application to token activations, and telemetry."""

from guardrail.policy.engine import CompiledPolicy, GuardError, PolicyStore, TokenPositions, compile_policy
from guardrail.policy.schema import Policy, PolicyError, Selector, policy_json_schema
from guardrail.policy.telemetry import Telemetry


def guard(model_or_loaded, artifact, policy, **kwargs):
    """Context manager applying ``policy`` to a transformers model (see guardrail.residual.hf_guard)."""
    from guardrail.residual.hf_guard import guard as _guard

    return _guard(model_or_loaded, artifact, policy, **kwargs)


def install_guard(llm, artifact, policies, **kwargs):
    """Install named policies into an in-process vLLM engine (see guardrail.vllm.driver)."""
    from guardrail.vllm.driver import install_guard as _install

    return _install(llm, artifact, policies, **kwargs)


__all__ = [
    "CompiledPolicy",
    "GuardError",
    "Policy",
    "PolicyError",
    "PolicyStore",
    "Selector",
    "Telemetry",
    "TokenPositions",
    "compile_policy",
    "guard",
    "install_guard",
    "policy_json_schema",
]
