"""The audit's positive control: a copy of the artifact that leaks on purpose, audited alongside.

An audit that cannot move its metric on a pair (a strict metric, a short token budget, a B
far from A) passes every artifact, leaky or not, and its PASS says nothing. So the audit
also judges a copy of the artifact known to leak, on the same prompts, settings and metric,
and must FAIL it by a proven leak (a lower bound over the limit); if it does not, the real
artifact's verdict is INCONCLUSIVE: the audit is blind on this pair under this metric
(:func:`guardrail.audit.run.judge`).

The planted leak is A's mean lead at the site: the mean of ``x_A − x_B`` at the last prompt
token over the calibration's tool prompts (rendered as the audit renders its prompts, and
disjoint from them), added to the B-side decoder bias of the copy. Every reconstruction of B
then carries it, whatever B's activation, which is what the gated ``b_only_splice`` threat
measures. A bias, not an always-firing feature, because that is all such a feature would
be, and a bias changes no feature's code: every steering threat (and its artifact-free
control) gets exactly the real artifact's deltas, so their outputs are shared.

Cost: the copy's conditions join the audit's one generation pass, and a row that writes the
same vector into the same prompt as a condition the audit generates anyway is generated
once (:func:`guardrail.generation.generate_from_clean`): new are the B-only splice, plus the
joint splice when the policy gates it. Under the default policy that is one more greedy
condition of B over the audit prompts (on vLLM the prompt is already in the prefix cache,
so only the patched last token is recomputed), and A's activation on the calibration's
tool prompts. Without A there is no lead to plant and the check is not run (such an
audit is INCONCLUSIVE anyway: nothing measured A's advantage).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from guardrail.audit.report import Verdict
from guardrail.audit.stats import PairedGain
from guardrail.audit.threats import STEERING, Calibration, ThreatInputs, threat_deltas
from guardrail.paper import MODEL_B

PREFIX = "self_check/"  # the copy's conditions among the audit's generated ones
BLIND_ON_PAIR = "the audit is blind on this pair under this metric"


@torch.no_grad()
def leaky_artifact(cc, leak: torch.Tensor):
    """A copy of ``cc`` whose B-side reconstruction always adds ``leak`` (raw residual units, ``[d]``).

    The one construction of a deliberately leaky artifact: the audit's self-check plants A's
    mean lead with it, and the tests plant a direction they know moves the tiny B. The copy
    shares every tensor but ``b_dec`` with ``cc`` (read-only, so a large dictionary is not
    held twice)."""
    shared = {id(t): t for name, t in [*cc.named_parameters(), *cc.named_buffers()] if name != "b_dec"}  # only b_dec changes
    out = copy.deepcopy(cc, memo=shared)
    out.b_dec[MODEL_B] += leak.to(out.b_dec.dtype) / out.act_std[MODEL_B]
    return out


def planted_leak(calib: Calibration) -> torch.Tensor | None:
    """A's mean lead over B at the site, on the calibration's tool prompts; None without A."""
    if calib.x_a_tool is None:
        return None
    return (calib.x_a_tool - calib.x_b[calib.is_tool]).mean(0)


@dataclass
class SelfCheck:
    """The leaky copy and the gated threats it is judged on, under the audit's policy."""

    names: list[str]  # the gated threats the copy is judged on
    leak: torch.Tensor
    artifact: object  # the copy (:func:`leaky_artifact`)
    policy: object  # the audit's ``AuditPolicy``

    def deltas(self, inp: ThreatInputs) -> dict[str, torch.Tensor]:
        """The copy's patched conditions on these prompts, under prefixed names."""
        made = threat_deltas(self.artifact, inp, self.names, self.policy)
        return {PREFIX + k: d for k, d in made.items() if d is not None}

    def new_conditions(self) -> int:
        """How many of the copy's conditions are not the audit's own: its splices (a bias changes
        no feature's code, so its steering threats and their controls write the audit's rows)."""
        return sum(n not in STEERING for n in self.names)

    def scores(self, scores: dict[str, list[bool]]) -> dict[str, list[bool]]:
        """The copy's per-condition scores (its clean B is the audit's), under the threats' own names."""
        made = [k for k in scores if k.startswith(PREFIX)]
        return {"clean": scores["clean"], **{k[len(PREFIX):]: scores[k] for k in made}}


def plan_self_check(cc, calib: Calibration, names: list[str], policy) -> SelfCheck | None:
    """The copy with A's mean lead planted, judged on the gated threats ``names``; None without A."""
    leak = planted_leak(calib)
    if leak is None:
        return None
    return SelfCheck(names, leak, leaky_artifact(cc, leak), policy)


@dataclass
class PositiveControl:
    """The copy's verdict under the audit's own rules, its gated gains, and the leak's size.

    ``proven``: the copy FAILed because a gain's lower bound exceeds the limit. Only that shows
    the audit can see a leak on this pair: a FAIL because no gain could be bounded is what any
    noisy audit says of any artifact, the planted one included.
    """

    verdict: Verdict
    gains: dict[str, PairedGain]
    leak_norm: float
    proven: bool = False

    def decisive(self) -> tuple[str, PairedGain] | None:
        """The gated gain with the highest lower bound: the one closest to proving the leak."""
        return max(self.gains.items(), key=lambda kv: kv[1].low, default=None)
