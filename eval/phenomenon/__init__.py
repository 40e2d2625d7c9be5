"""The phenomenon on one pair, measured with controls: steer on, clamp off, alarm ahead.

``run_phenomenon(PhenomenonConfig(pair="organism"))`` (``guardrail eval phenomenon``):

* ``protocols`` — how prompts are rendered: the hedge protocol (A can call but often does
  not) and the deployment protocol (A calls);
* ``artifact`` — the DFC, trained and ranked on the train split under both protocols;
* ``steer`` — one A-exclusive feature, α from dev, controls at the same ‖δ‖;
* ``kill`` — clamping the top features against clamping random live ones;
* ``alert`` — one feature's score at the last prompt token against A's own behaviour;
* ``outputs`` — greedy outputs per condition, cached; ``report`` — the page.
"""

from guardrail.eval.phenomenon.run import PhenomenonConfig, run_phenomenon

__all__ = ["PhenomenonConfig", "run_phenomenon"]
