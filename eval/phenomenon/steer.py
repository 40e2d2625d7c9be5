"""One feature turns tool use on: a single A-exclusive feature turned up under the hedge protocol.

Two candidate features: the top tool-signed A-exclusive feature of the train-split ranking
(the paper's choice: tool prompts against ordinary ones, which favours template detectors),
and the live A-exclusive feature whose last-token value best separates the dev prompts A
calls on from those it does not (the alarm's choice). Two ways of turning one up, the
``amplify`` policy's two modes:

* ``scale`` (the paper's): δ = (α − 1)·f_i·d_i^A added to A's raw activation at the last
  prompt token, once, at prefill (:func:`guardrail.features.interventions.steer_scale_delta`).
  ``f_i`` comes from two encodings, shown side by side: the paper's joint encoding (A's and
  B's activations) and the single-model encoding a served A can compute alone (the headline,
  what the policy does in deployment). A feature that did not fire contributes nothing.
* ``additive``: g·‖x‖_typ·d_i/‖d_i‖ added at every token, prompt and output, whether or not
  the feature fired (the policy run by the guard, as a deployment would).

Controls, each at the headline's ‖δ‖ on every token it edits, so only the direction differs:

* a random direction (Gaussian, seeded; per prompt for ``scale``, for ``additive`` the
  feature's decoder row replaced in a copy of the artifact, so the same policy runs);
* a random live A-exclusive feature's decoder direction (fires on ≥ 1 % of train tool
  prompts, not among the top three tool features).

Beside them, at the same norm, the reference call direction
(:mod:`guardrail.eval.phenomenon.reference`): what the direction fit to the label does at
this site, where no dictionary is involved.

The feature, the mode and its strength are chosen on the dev split (the largest
min(lenient gain, strict gain); the gentler setting on a tie) and only then applied to the
test split.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from guardrail.eval.phenomenon.artifact import live_a_exclusive
from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.eval.phenomenon.outputs import OutputStore, scored
from guardrail.eval.suites import EvalItem
from guardrail.features import interventions as iv
from guardrail.paper import MODEL_A
from guardrail.policy import Policy
from guardrail.stats import mcnemar, paired_gain

ENCODINGS = ("single", "joint")
HEADLINE = "single"
REFERENCE = "call-direction"  # the reference condition: the dev-fit call direction at the headline's norm (not a control)
METRICS = {"tool_correctness": "lenient tool correctness", "name_correct": "strict tool-name accuracy",
           "format_accuracy": "format accuracy"}


@dataclass(frozen=True)
class Setting:
    """How far, and how, one feature is turned up: α of ``scale`` or g of ``additive``."""

    mode: Literal["scale", "additive"]
    strength: float

    @property
    def tag(self) -> str:
        """The setting in condition file names."""
        return f"{'a' if self.mode == 'scale' else 'g'}{self.strength:g}"

    @property
    def label(self) -> str:
        return f"scale α = {self.strength:g}" if self.mode == "scale" else f"additive g = {self.strength:g}"


def grid(alphas: Sequence[float], gains: Sequence[float]) -> list[Setting]:
    return [Setting("scale", a) for a in alphas] + [Setting("additive", g) for g in gains]


def additive_policy(name: str, feature: int, gain: float) -> Policy:
    """The ``amplify`` policy that adds feature ``feature``'s direction at every token."""
    return Policy.from_data({
        "name": name, "encoding": "single", "on_error": "fail-closed",
        "rules": [{"id": "amplify-tool-feature", "action": "amplify", "mode": "additive", "gain": float(gain),
                   "select": {"indices": [int(feature)]}, "positions": "all"}],
    }, source=f"phenomenon steer ({name})")


def random_direction_artifact(artifact: Path, feature: int, seed: int, out: Path) -> Path:
    """A copy of ``artifact`` whose feature ``feature`` writes a seeded Gaussian direction into A.

    The additive steer normalises the direction, so the same policy on this copy adds a
    random direction at exactly the steer's norm, on every token the steer edits.
    """
    from guardrail.dictionary import read_manifest

    raw = random_directions(1, read_manifest(artifact).d_model, seed)[0]
    return direction_artifact(artifact, feature, raw, f"a random decoder direction (seed {seed})", out)


def direction_artifact(artifact: Path, feature: int, raw: torch.Tensor, what: str, out: Path) -> Path:
    """A copy of ``artifact`` (with its ranking) whose feature ``feature`` decodes into A along ``raw``
    (a direction in A's raw residual space), made once in ``out``; ``what`` names it in the manifest."""
    from guardrail.dictionary import load_artifact, read_manifest, save_artifact
    from guardrail.dictionary.artifact import MANIFEST_FILE
    from guardrail.features.ranking import RANKING_FILE

    if (out / MANIFEST_FILE).exists():
        return out
    cc = load_artifact(artifact)
    with torch.no_grad():
        cc.W_dec[feature, MODEL_A] = raw / cc.act_std[MODEL_A]  # raw direction = W_dec·std
    m = read_manifest(artifact)
    save_artifact(cc, out, model_a=m.model_a, model_b=m.model_b, layer=m.layer, positions=m.positions,
                  source={"kind": "trained", "notes": [f"control: feature {feature} of {artifact} given {what}"]})
    (out / RANKING_FILE).write_text((artifact / RANKING_FILE).read_text())
    return out


def feature_delta(view: iv.DictionaryView, xa: torch.Tensor, xb: torch.Tensor, feature: int, setting: Setting,
                  encoding: str = HEADLINE) -> torch.Tensor:
    """δ at the last prompt token, ``[N, d]``: the scale steer's (zero where the feature did not
    fire), or the additive one's (the same on every token)."""
    idx = torch.tensor([feature])
    if setting.mode == "additive":
        return iv.steer_additive_delta(len(xa), idx, view.dirs_raw, setting.strength, view.typical_norm)
    f = iv.encode(view, xa, xb if encoding == "joint" else None)
    return iv.steer_scale_delta(f, idx, view.dirs_raw, setting.strength)


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
               seed: int, reference: torch.Tensor | None = None, encodings: Sequence[str] = ENCODINGS) -> dict[str, torch.Tensor]:
    """Last-token deltas ``[N, d]`` of the scale steer per encoding, and at the headline's norm those of
    the two controls and of the ``reference`` direction when given (``guardrail.eval.phenomenon.reference``)."""
    deltas = {f"steer-{e}": feature_delta(view, xa, xb, feature, Setting("scale", alpha), e) for e in encodings}
    head = deltas[f"steer-{HEADLINE}"]
    deltas["random-direction"] = norm_matched(head, random_directions(len(xa), xa.shape[1], seed))
    deltas["random-feature"] = norm_matched(head, view.dirs_raw[control])
    if reference is not None:
        deltas[REFERENCE] = norm_matched(head, reference)
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


def worst_gain(g: dict[str, Gain]) -> float:
    """The smaller of the lenient and strict gains: what the bars judge."""
    return min(g["tool_correctness"].gain_pp, g["name_correct"].gain_pp)


def choose(results: dict[tuple[int, Setting], dict[str, Gain]]) -> tuple[int, Setting]:
    """The (feature, setting) whose steer has the largest min(lenient, strict) gain on dev;
    on a tie the first scale setting (the paper's), then the gentlest."""
    order = sorted(results, key=lambda key: (key[1].mode != "scale", key[1].strength))
    return max(order, key=lambda key: (worst_gain(results[key]), -order.index(key)))


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
