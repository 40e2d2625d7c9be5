"""guardrail: feature-level monitoring and control of tool-using LLM agents.

The whole flow, in the vocabulary this package exports::

    import guardrail as gr

    pair  = gr.load_pair("organism")                       # A = tool-use RL model, B = its base
    site  = gr.Site(layer=11, positions="prompt", last_n=32)
    cache = gr.collect(pair, gr.prompts.mixed(), site, "runs/cache")
    dfc   = gr.train(cache, gr.DFCConfig(dict_size=2048, k=32, exclusive=0.05), "runs/dfc")
    ranks = gr.rank("runs/dfc", cache)                    # saved beside the artifact
    with gr.guard(pair.a, "runs/dfc", "policies/tool-use-kill-switch.yaml") as model:
        print(model.generate("..."))
    report = gr.audit(gr.load_artifact("runs/dfc"), pair.b, pair.a)

Names resolve lazily, so ``import guardrail`` stays cheap for the CLI and for engines
that only need the policy schema.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_pair": "guardrail.models",
    "load_model": "guardrail.models",
    "ModelPair": "guardrail.models",
    "Site": "guardrail.residual",
    "collect": "guardrail.activations",
    "ActivationCache": "guardrail.activations",
    "CrosscoderConfig": "guardrail.dictionary",
    "DFCConfig": "guardrail.dictionary",
    "Crosscoder": "guardrail.dictionary",
    "Partition": "guardrail.dictionary",
    "load_artifact": "guardrail.dictionary",
    "save_artifact": "guardrail.dictionary",
    "train": "guardrail.training",
    "TrainingConfig": "guardrail.training",
    "rank": "guardrail.features.ranking",
    "Ranking": "guardrail.features.ranking",
    "Rankings": "guardrail.features.ranking",
    "Policy": "guardrail.policy",
    "guard": "guardrail.policy",
    "install_guard": "guardrail.policy",
    "audit": "guardrail.audit",
    "AuditPolicy": "guardrail.audit",
}
_MODULES = {"prompts": "guardrail.prompts", "tasks": "guardrail.tasks", "interventions": "guardrail.features.interventions"}

__all__ = sorted([*_EXPORTS, *_MODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guardrail' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
