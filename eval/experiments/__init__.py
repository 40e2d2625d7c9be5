"""The paper's experiments, each a function of a :class:`RunContext` and dictionaries."""

from guardrail.eval.experiments.ablation import run_ablation
from guardrail.eval.experiments.common import RunContext, dictionary_health
from guardrail.eval.experiments.explain import run_explain
from guardrail.eval.experiments.geometry import run_geometry
from guardrail.eval.experiments.splice import run_splice, splice_patches
from guardrail.eval.experiments.steering import run_steering, steer_patches
from guardrail.eval.experiments.sweep import run_sweep, sweep_statistics, train_variants

__all__ = [
    "RunContext", "dictionary_health", "run_ablation", "run_explain", "run_geometry", "run_splice", "run_steering",
    "run_sweep", "splice_patches", "steer_patches", "sweep_statistics", "train_variants",
]
