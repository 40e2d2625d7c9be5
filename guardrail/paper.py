"""The paper's settings that the package reuses, each written once.

"Localizing RL-Induced Tool Use to a Single Crosscoder Feature" reads layer 13 of
Qwen2.5-3B's 36 decoder layers and steers with α in {1, 6, 16, 32, 64}; its paired
activations stack model A (after RL) at index 0 and model B (before) at index 1, the layout
of every ``[N, 2, d]`` tensor here. Defaults elsewhere (the collection layer, the eval
harness, the demo) come from these names so that they cannot drift apart.
"""

from __future__ import annotations

MODEL_A = 0  # index of A (the model after RL) in paired tensors and crosscoder halves
MODEL_B = 1  # index of B (the base model)

PAPER_LAYER = 13  # Qwen2.5-3B: the output of model.model.layers[13]
PAPER_N_LAYERS = 36
PAPER_DEPTH = PAPER_LAYER / PAPER_N_LAYERS  # the relative depth other models are read at

PAPER_ALPHAS: tuple[float, ...] = (1.0, 6.0, 16.0, 32.0, 64.0)  # the steering factors of the saturation curves


def paper_layer(n_layers: int) -> int:
    """The decoder layer at the paper's relative depth in a model of ``n_layers`` layers."""
    return min(n_layers - 1, round(PAPER_DEPTH * n_layers))
