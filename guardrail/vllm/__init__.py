"""Everything guardrail does inside vLLM, in one folder (the contract is in ``docs/architecture.md``).

- :mod:`~guardrail.vllm.engine`: ``LLM(...)`` settings that work on CPU, KV-cache sizes, the folder an engine loads;
- :mod:`~guardrail.vllm.layout`: which rows of the flattened batch belong to which request, and what each token is;
- :mod:`~guardrail.vllm.requests`: what a request carries in ``SamplingParams.extra_args`` (policy, patch);
- :mod:`~guardrail.vllm.worker`: the one decoder-layer hook, applying policies and patches per request;
- :mod:`~guardrail.vllm.patches`: the only place where vLLM's own objects are patched;
- :mod:`~guardrail.vllm.driver`: installing the hook on an in-process engine, and its handle;
- :mod:`~guardrail.vllm.plugin` and :mod:`~guardrail.vllm.serve`: ``vllm serve`` with policies (``guardrail serve``);
- :mod:`~guardrail.vllm.generation`: the vLLM generation backend; :mod:`~guardrail.vllm.mirror`: the organism build's engine.
- :mod:`~guardrail.vllm.collection`: activation collection on vLLM (``collect(..., engine="vllm")``).

Importing this package does not import vLLM: the modules import it where they use it, so
the rest of guardrail runs where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it)."""
    return importlib.util.find_spec("vllm") is not None
