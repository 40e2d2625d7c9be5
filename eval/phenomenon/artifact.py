"""The dictionary the phenomenon is measured with: collected, trained and ranked on the train split.

Activations are collected under both protocols (tool prompts rendered each way, ordinary
prompts raw and through the chat template), because the steer and the alarm act on hedge
prompts and the kill switch on deployment prompts: a dictionary that never saw one of the
two distributions would be judged on data it was not fitted to. One DFC is trained on the
union; features are ranked per protocol (tool vs ordinary prompts, last prompt token), the
hedge ranking in the artifact's ``ranking.json`` (what ``ranked:`` policies read) and the
deployment ranking beside it. Everything here uses the train split only: the dev split
chooses α and the alarm, the test split reports.

The DFC gives each exclusive partition its own top-k slots (``k_exclusive = 3`` of k = 13 at
SmolLM2's width): with the paper's joint top-k, only 3 of the 115 A-exclusive features ever
fired at a hedge prompt's last token (the best on 8 % of tool prompts, Cohen's d 0.24), so
there was nothing to steer or to alarm on. Per-partition top-k also makes the single-model
encoding of the exclusive features exact, which is what a served A computes.

Cached under ``$GUARDRAIL_HOME/phenomenon/<pair>-<collection key>/`` (the activations, keyed
by the models, protocols, layer and prompts; an interrupted collection resumes) and its
``dfc-<training key>/`` (the dictionary and everything measured with it): another
dictionary on the same activations collects nothing again, and a rebuilt A starts anew.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from guardrail.eval.phenomenon.protocols import Protocol
from guardrail.paths import home

DEPLOYMENT_RANKING = "ranking-deployment.json"
LIVE_FIRE = 0.01  # a feature is live when it fires on at least this share of the ranking's tool prompts


def live_a_exclusive(ranking: Any, avoid: int = 0, min_fire: float = LIVE_FIRE) -> list[int]:
    """Live A-exclusive features by index, without the top ``avoid`` tool features: the pool every
    control and the alarm draw from."""
    top = set(ranking.top("tool", "a_exclusive", avoid)) if avoid else set()
    return sorted(s.index for s in ranking.features if s.partition == "a_exclusive" and s.fire_rate_tool >= min_fire and s.index not in top)


@dataclass(frozen=True)
class DictionaryRecipe:
    """What the artifact depends on; ``None`` fields take the quick grid's value for the model width."""

    layer: int | None = None  # None: the paper's relative depth (layer 13 of 36)
    tool_prompts: int = 300  # train-split tool tasks, rendered under each protocol
    plain_prompts: int = 300  # ordinary prompts, rendered raw and through the chat template
    last_n: int = 32  # training rows per prompt: its last N tokens
    dict_size: int | None = None
    k: int | None = None
    exclusive: float = 0.05
    steps: int = 600
    batch_size: int = 256
    lr: float = 3e-4
    k_exclusive: int | None = 3  # per-partition top-k: exclusive slots per sample (exact single-model codes); None: the paper's joint top-k
    max_norm_ratio: float | None = 10.0  # training rows above this × the median norm (attention sinks) are left out; None: keep all
    seed: int = 0

    COLLECTION = ("layer", "tool_prompts", "plain_prompts", "last_n", "seed")

    def collection_key(self, pair: Any, protocols: tuple[Protocol, ...]) -> str:
        """What the activations depend on: the models, the protocols, the site and the prompts."""
        fields = {k: v for k, v in asdict(self).items() if k in self.COLLECTION}
        return _digest([fields, [p.as_dict() for p in protocols], pair.a.spec, pair.b.spec])

    def training_key(self) -> str:
        """What the dictionary depends on beyond its activations."""
        return _digest({k: v for k, v in asdict(self).items() if k not in self.COLLECTION or k == "seed"})


def sinks_note(max_norm_ratio: float | None) -> str:
    """How the recipe's training rows leave attention sinks out, as a clause ('' when they are kept)."""
    return "" if max_norm_ratio is None else f", rows above {max_norm_ratio:g}× the median norm (attention sinks) left out"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def dfc_config(pair: Any, recipe: DictionaryRecipe):
    """The quick eval grid's free-exclusive DFC with the smallest k, scaled to the model width."""
    from guardrail.dictionary import DFCConfig
    from guardrail.eval.grids import variants

    free = [s.crosscoder for s in variants("quick", pair.d_model) if s.crosscoder.is_dfc and s.crosscoder.lambda_excl == 0]
    grid = min(free, key=lambda c: c.k)
    k = recipe.k or grid.k
    k_excl = None if recipe.k_exclusive is None else min(recipe.k_exclusive, k // 4)  # the shared features keep half the slots
    return DFCConfig(dict_size=recipe.dict_size or grid.dict_size, k=k, exclusive=recipe.exclusive, k_exclusive=k_excl,
                     lambda_shared=grid.lambda_shared, penalty_form=grid.penalty_form)


def layer_of(pair: Any, recipe: DictionaryRecipe) -> int:
    from guardrail.paper import paper_layer

    return paper_layer(pair.n_layers) if recipe.layer is None else recipe.layer


def protocol_prompts(pair: Any, protocol: Protocol, recipe: DictionaryRecipe) -> list:
    """Train-split tool prompts under ``protocol`` and ordinary prompts rendered the same way (raw or chat)."""
    import random

    from guardrail.prompts import PromptItem
    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks, plain_prompts

    tasks = random.Random(recipe.seed).sample(load_tasks("train", ANSWERED_CATEGORIES), recipe.tool_prompts)
    items = [PromptItem(t.id, protocol.render(t, pair.tokenizer), True) for t in tasks]
    items += [PromptItem(p.id, p.render(pair.tokenizer, protocol.mode), False)
              for p in plain_prompts(recipe.plain_prompts, "train", recipe.seed)]
    random.Random(recipe.seed + 1).shuffle(items)
    return items


@dataclass
class PhenomenonArtifact:
    """The trained DFC's folder and its last-token rows per protocol (for ranking and choosing features)."""

    path: Path
    layer: int
    caches: dict[str, Any]  # protocol name -> ActivationCache

    def ranking(self, protocol: str):
        from guardrail.features.ranking import Rankings

        if protocol == "hedge":
            return Rankings.load(self.path).get("plain")
        return Rankings.parse((self.path / DEPLOYMENT_RANKING).read_text()).get("plain")


def recipe_root(pair: Any, protocols: tuple[Protocol, ...], recipe: DictionaryRecipe) -> Path:
    """``$GUARDRAIL_HOME/phenomenon/<pair>-<collection key>``: the activations of one pair, protocols and prompts."""
    return home() / "phenomenon" / f"{pair.name or 'pair'}-{recipe.collection_key(pair, protocols)}"


def ensure_artifact(pair: Any, protocols: tuple[Protocol, ...], recipe: DictionaryRecipe,
                    say: Callable[[str], None] = print, root: Path | None = None) -> PhenomenonArtifact:
    """Collect (resumable), train and rank once per recipe under ``root`` (default :func:`recipe_root`);
    later calls read the cache."""
    from guardrail.activations import collect
    from guardrail.features.ranking import RANKING_FILE, Rankings, rank_features
    from guardrail.residual import Site
    from guardrail.training import TrainingConfig, train

    layer = layer_of(pair, recipe)
    root = root or recipe_root(pair, protocols, recipe)
    site = Site(layer=layer, positions="prompt", last_n=recipe.last_n)
    caches = {}
    for p in protocols:
        prompts = protocol_prompts(pair, p, recipe)
        say(f"collecting A and B at layer {layer} under the {p.name} protocol ({len(prompts)} prompts, last {recipe.last_n} tokens)")
        caches[p.name] = collect(pair, prompts, site, root / f"cache-{p.name}")
    art = root / f"dfc-{recipe.training_key()}" / "dfc"
    if not (art / RANKING_FILE).exists():
        cfg = dfc_config(pair, recipe)
        rows = torch.cat([c.load().acts for c in caches.values()])
        sinks = sinks_note(recipe.max_norm_ratio)
        say(f"training a DFC on {len(rows)} rows: D={cfg.dict_size}, k={cfg.k}, {recipe.exclusive:.0%} exclusive per model, {recipe.steps} steps{sinks}")
        described = {"model_a": pair.a.spec, "model_b": pair.b.spec, "layer": layer, "positions": f"last {recipe.last_n} prompt tokens{sinks}",
                     "source": f"guardrail eval phenomenon: {', '.join(p.name for p in protocols)} protocols, train split"}
        training = TrainingConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed,
                                  max_norm_ratio=recipe.max_norm_ratio)
        cc = train(rows, cfg, art, training=training, manifest_fields=described)
        for p in protocols:
            last = caches[p.name].load().last_token()
            ranked = Rankings(plain=rank_features(cc, last.acts, last.is_tool))
            target = art / (RANKING_FILE if p.name == "hedge" else DEPLOYMENT_RANKING)
            target.write_text(ranked.model_dump_json(indent=1, exclude_none=True))
    else:
        say(f"using the cached DFC at {art}")
    return PhenomenonArtifact(art, layer, caches)
