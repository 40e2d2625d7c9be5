"""The embedded model organism: B = SmolLM2-135M-Instruct, A = B + a tool-use RL LoRA.

``build`` trains A (weak supervised warm start, then GRPO with the ToolRL reward),
``evaluate`` measures a model on held-out BFCL tasks, ``assets`` holds the shipped result.
"""

from guardrail.organism.assets import shipped_adapter, shipped_manifest, shipped_warmstart
from guardrail.organism.build import BuildConfig, build
from guardrail.organism.evaluate import EvalResult, evaluate, examples_markdown, score_outputs

__all__ = ["BuildConfig", "EvalResult", "build", "evaluate", "examples_markdown", "score_outputs",
           "shipped_adapter", "shipped_manifest", "shipped_warmstart"]
