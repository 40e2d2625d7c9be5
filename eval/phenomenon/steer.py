"""One feature turns tool use on: the paper's single-feature steer under the hedge protocol.

δ = (α − 1)·f_i·d_i^A added to A's raw activation at the last prompt token, once, at
prefill (:func:`guardrail.features.interventions.steer_scale_delta`), with ``i`` the top
tool-signed A-exclusive feature of the train-split ranking. ``f_i`` comes from two
encodings, shown side by side: the paper's joint encoding (A's and B's activations) and the
single-model encoding a served A can compute alone (the headline, since that is what the
``amplify`` policy does in deployment).

Controls, each at the headline's ‖δ‖ on every prompt, so only the direction differs:

* a random direction (Gaussian, seeded, one per prompt);
* a random live A-exclusive feature's decoder direction (fires on ≥ 1 % of train tool
  prompts, not among the top three tool features).

α is chosen on the dev split (the largest min(lenient gain, strict gain), smallest α on a
tie) and only then applied to the test split.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from guardrail.eval.phenomenon.artifact import live_a_exclusive
from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.eval.phenomenon.outputs import OutputStore, scored
from guardrail.eval.suites import EvalItem
from guardrail.features import interventions as iv
from guardrail.stats import mcnemar, paired_gain

ENCODINGS = ("single", "joint")
HEADLINE = "single"
METRICS = {"tool_correctness": "lenient tool correctness", "name_correct": "strict tool-name accuracy",
           "format_accuracy": "format accuracy"}


def feature_delta(view: iv.DictionaryView, xa: torch.Tensor, xb: torch.Tensor, feature: int, alpha: float,
                  encoding: str) -> torch.Tensor:
    """δ of the paper's scale steer on one feature, ``[N, d]``; zero where the feature did not fire."""
    f = iv.encode(view, xa, xb if encoding == "joint" else None)
    return iv.steer_scale_delta(f, torch.tensor([feature]), view.dirs_raw, alpha)


def norm_matched(delta: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``directions`` (``[N, d]`` or ``[d]``) rescaled row by row to ``‖delta‖``."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit.expand_as(delta) * delta.norm(dim=-1, keepdim=True)


def random_directions(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def control_feature(ranking: Any, seed: int, avoid: int = 3) -> int:
    """A random live A-exclusive feature outside the top ``avoid`` tool features."""
    live = live_a_exclusive(ranking, avoid)
    if not live:
        raise NotMeasurable("no live A-exclusive feature outside the top tool features: nothing to use as a control")
    return random.Random(seed).choice(live)


def conditions(view: iv.DictionaryView, xa: torch.Tensor, xb: torch.Tensor, feature: int, control: int, alpha: float,
               seed: int, encodings: Sequence[str] = ENCODINGS) -> dict[str, torch.Tensor]:
    """Deltas ``[N, d]`` per condition: the steer per encoding, and the two controls at the headline's norm."""
    deltas = {f"steer-{e}": feature_delta(view, xa, xb, feature, alpha, e) for e in encodings}
    head = deltas[f"steer-{HEADLINE}"]
    deltas["random-direction"] = norm_matched(head, random_directions(len(xa), xa.shape[1], seed))
    deltas["random-feature"] = norm_matched(head, view.dirs_raw[control])
    return deltas


@dataclass(frozen=True)
class Gain:
    """A paired gain in percentage points with its Newcombe interval and exact McNemar p."""

    clean: float
    steered: float
    gain_pp: float
    ci_pp: tuple[float, float]
    gained: int
    lost: int
    p_mcnemar: float

    @classmethod
    def of(cls, clean: Sequence[int], steered: Sequence[int]) -> "Gain":
        g, m = paired_gain(clean, steered), mcnemar(clean, steered, "greater")
        return cls(g.clean, g.guarded, 100 * g.gain, (100 * g.low, 100 * g.high), g.gained, g.lost, m.p)


def gains(clean: list[dict], steered: list[dict]) -> dict[str, Gain]:
    return {k: Gain.of([r[k] for r in clean], [r[k] for r in steered]) for k in METRICS}


def generate_deltas(store: OutputStore, items: Sequence[EvalItem], xa: torch.Tensor, deltas: dict[str, torch.Tensor],
                    clean: str, prefix: str) -> dict[str, list[dict]]:
    """Scored outputs of the clean prompts (condition ``clean``) and of every delta (``prefix`` + its
    name; rows with δ = 0 are patched to themselves, which decodes as the clean prompt does)."""
    patches = {f"{prefix}{name}": [x + d for x, d in zip(xa, delta)] for name, delta in deltas.items()}
    outs = store.patched(items, {clean: None, **patches})
    rows = {name[len(prefix):]: scored(items, outs[name], name) for name in patches}
    return {"clean": scored(items, outs[clean], "clean"), **rows}


def choose_alpha(curve: dict[float, dict[str, dict[str, Gain]]]) -> float:
    """The α whose headline steer has the largest min(lenient, strict) gain on dev; the smallest on a tie."""
    def worst(a: float) -> float:
        g = curve[a][f"steer-{HEADLINE}"]
        return min(g["tool_correctness"].gain_pp, g["name_correct"].gain_pp)

    return max(sorted(curve), key=lambda a: (worst(a), -a))


def delta_norm_ratio(delta: torch.Tensor, xa: torch.Tensor) -> float | None:
    """Mean ‖δ‖/‖x‖ over the prompts where the feature fired (None if it fired nowhere)."""
    on = delta.norm(dim=-1) > 0
    if not bool(on.any()):
        return None
    return float((delta[on].norm(dim=-1) / xa[on].norm(dim=-1)).mean())


def fired(view: iv.DictionaryView, xa: torch.Tensor, xb: torch.Tensor, feature: int) -> dict[str, float]:
    """Share of prompts where the feature is active after the sparsity rule, per encoding."""
    return {e: float((iv.encode(view, xa, xb if e == "joint" else None)[:, feature] > 0).float().mean()) for e in ENCODINGS}


def as_dict(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return as_dict(asdict(obj))
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj
