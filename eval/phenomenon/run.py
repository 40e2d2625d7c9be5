"""``guardrail eval phenomenon``: the hedge, the steer, the kill switch and the alarm on one pair.

The order is the data's: train-split activations → DFC and rankings (``artifact``); dev
split → α and the alarm's feature and threshold; test split → every reported number.
Outputs and residuals are cached beside the artifact, so a re-run only computes what is
missing, and every result names the artifact and the adapter it was made with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from guardrail.generation import GenerationSettings, generate_under_policies, make_backend
from guardrail.residual.last_token import last_token_residual
from guardrail.eval.phenomenon import alert, kill, reference, steer
from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.eval.phenomenon.artifact import DictionaryRecipe, PhenomenonArtifact, ensure_artifact, live_a_exclusive, recipe_root
from guardrail.eval.phenomenon.outputs import OutputStore, scored
from guardrail.eval.scoring import aggregate
from guardrail.eval.phenomenon.protocols import HEDGE, Protocol, deployment
from guardrail.eval.suites import EvalItem
from guardrail.paper import PAPER_ALPHAS
from guardrail.stats import wilson

STOP = ("</tool_call>",)  # every metric reads the first call block; decoding past it changes no score


@dataclass
class PhenomenonConfig:
    pair: str = "organism"
    recipe: DictionaryRecipe = field(default_factory=DictionaryRecipe)
    deployment_turn: str | None = None  # None: the turn A was trained on (organism), else "plain"
    backend: str = "auto"
    max_new_tokens: int = 200  # the paper's
    alphas: tuple[float, ...] = tuple(a for a in PAPER_ALPHAS if a > 1)  # the paper's α > 1 (scale steer, last prompt token)
    # additive steer at every token, in units of the site's typical norm (138 on SmolLM2's layer 11, about a last
    # prompt token's ‖x‖); docs/phenomenon.md says how far a push at every token goes before A's output breaks
    gains: tuple[float, ...] = (0.05, 0.1, 0.15)
    test_prompts: int | None = 150  # a seeded sample of the test split's answered tasks (None: all 298); n ≥ 100 for the bars
    dev_prompts: int | None = None  # dev tasks choosing α and the alarm (None: all 102)
    irrelevance_prompts: int | None = None  # BFCL irrelevance test tasks (None: all 74)
    ordinary_prompts: int = 200  # ordinary test prompts for the alarm's false-positive rate
    seed: int = 0


def tool_items(split: str, protocol: Protocol, tokenizer: Any, categories: tuple[str, ...] | None = None,
               limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """The tasks of ``split`` under ``protocol``: all, or a seeded sample of ``limit`` kept in BFCL's order."""
    import random

    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks

    tasks = load_tasks(split, categories or ANSWERED_CATEGORIES)
    if limit is not None and limit < len(tasks):
        keep = set(random.Random(seed).sample(range(len(tasks)), limit))
        tasks = [t for i, t in enumerate(tasks) if i in keep]
    return [EvalItem(t.id, "tool" if t.expects_call else t.category, protocol.render(t, tokenizer), t.tool_names, t.possible_answer,
                     t.category, t.user) for t in tasks]


def ordinary_items(n: int, seed: int) -> list[EvalItem]:
    from guardrail.tasks import plain_prompts

    return [EvalItem(p.id, "general", p.text, category=p.source) for p in plain_prompts(n, "test", seed)]


class Residuals:
    """Last-prompt-token residuals of A or B per named prompt set, kept as safetensors."""

    def __init__(self, folder: Path, layer: int) -> None:
        self.folder, self.layer = Path(folder), layer
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, loaded: Any, items: list[EvalItem]) -> torch.Tensor:
        """``[N, d]`` rows of ``items``, read back when stored for the same prompts, else computed and stored."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        path, ids = self.folder / f"{name}.safetensors", json.dumps([i.id for i in items])
        if path.exists():
            with safe_open(str(path), "pt") as fh:
                if (fh.metadata() or {}).get("ids") == ids:
                    return fh.get_tensor("x")
        x = last_token_residual(loaded, [i.text for i in items], self.layer)
        save_file({"x": x.contiguous()}, str(path), metadata={"ids": ids})
        return x


@dataclass
class Context:
    pair: Any
    art: PhenomenonArtifact
    view: Any
    store: OutputStore
    residuals: Residuals
    cfg: PhenomenonConfig
    say: Callable[[str], None]


def clean_rows(ctx: Context, name: str, items: list[EvalItem]) -> list[dict[str, Any]]:
    """Scored unpatched outputs of ``items`` (condition ``name``), generated once."""
    return scored(items, ctx.store.patched(items, {name: None})[name], "clean")


def calls_of(ctx: Context, name: str, items: list[EvalItem], key: str = "format_accuracy") -> torch.Tensor:
    """Which of ``items`` clean A answers with a call (``[N]`` bool): the alarm's label."""
    return torch.tensor([r[key] for r in clean_rows(ctx, name, items)], dtype=torch.bool)


def measure_hedge(ctx: Context, hedge_test: list[EvalItem], deploy_test: list[EvalItem]) -> dict[str, Any]:
    rows = clean_rows(ctx, "test-hedge-clean", hedge_test)
    hedge, chat = aggregate(rows), aggregate(clean_rows(ctx, "test-deployment-clean", deploy_test))
    n, k = len(rows), sum(r["format_accuracy"] for r in rows)
    return {"n": n, "format_rate_clean": k / max(n, 1), "format_rate_ci": list(wilson(k, n, 1.959964)),
            "tool_correctness_clean": hedge.get("tool_correctness", 0.0), "strict_name_clean": hedge.get("name_correct", 0.0),
            "chat_n": chat["n"], "chat_format_rate": chat.get("format_accuracy", 0.0), "chat_strict_name_accuracy": chat.get("name_correct", 0.0),
            "chat_tool_correctness": chat.get("tool_correctness", 0.0)}


def condition_prefix(split: str, feature: int, control: int, setting: steer.Setting, seed: int) -> str:
    """What a steer condition's name starts with: everything its outputs depend on besides the artifact."""
    return f"{split}-hedge-f{feature}-c{control}-{setting.tag}-s{seed}-"


def steered_rows(ctx: Context, split: str, items: list[EvalItem], feature: int, control: int, setting: steer.Setting,
                 direction: torch.Tensor | None) -> dict[str, list[dict]]:
    """Scored clean outputs of ``split``'s hedge prompts, the steer's (``steer-single``; also
    ``steer-joint`` for scale), the two same-norm controls' and the reference call ``direction``'s (when given)."""
    clean, seed = f"{split}-hedge-clean", ctx.cfg.seed
    prefix = condition_prefix(split, feature, control, setting, seed)
    if setting.mode == "scale":
        xa, xb = ctx.residuals.get(f"{split}-hedge-A", ctx.pair.a, items), ctx.residuals.get(f"{split}-hedge-B", ctx.pair.b, items)
        return steer.generate_deltas(ctx.store, items, xa, steer.conditions(ctx.view, xa, xb, feature, control, setting.strength, seed, direction),
                                     clean, prefix)
    parent = ctx.art.path.parent
    runs = {f"steer-{steer.HEADLINE}": (ctx.art.path, feature),
            "random-direction": (steer.random_direction_artifact(ctx.art.path, feature, seed, parent / f"control-random-direction-f{feature}-s{seed}"), feature),
            "random-feature": (ctx.art.path, control)}
    if direction is not None:
        runs[steer.REFERENCE] = (steer.direction_artifact(ctx.art.path, feature, direction, "the dev-fit call direction",
                                                          parent / f"reference-{steer.REFERENCE}-f{feature}-s{seed}"), feature)
    return {"clean": clean_rows(ctx, clean, items),
            **{name: policy_rows(ctx, prefix + name, items, steer.additive_policy("steer", feat, setting.strength), artifact)
               for name, (artifact, feat) in runs.items()}}


def dev_grid(ctx: Context, items: list[EvalItem], feature: int, control: int,
             settings: list[steer.Setting]) -> dict[steer.Setting, dict[str, steer.Gain]]:
    """The headline steer's gains at every setting on dev, without controls. The scale settings
    decode in one call, so each prompt is prefilled once for all α (only the patched last
    token is recomputed); each additive one is a guard run of its own."""
    seed, head = ctx.cfg.seed, f"steer-{steer.HEADLINE}"
    names = {st: condition_prefix("dev", feature, control, st, seed) + head for st in settings}
    scale = [st for st in settings if st.mode == "scale"]
    clean = clean_rows(ctx, "dev-hedge-clean", items)
    rows: dict[steer.Setting, list[dict]] = {}
    if scale:
        xa, xb = ctx.residuals.get("dev-hedge-A", ctx.pair.a, items), ctx.residuals.get("dev-hedge-B", ctx.pair.b, items)
        made = steer.generate_deltas(ctx.store, items, xa, {names[st]: steer.feature_delta(ctx.view, xa, xb, feature, st) for st in scale},
                                     "dev-hedge-clean", "")
        rows |= {st: made[names[st]] for st in scale}
    for st in settings:
        if st.mode != "scale":
            rows[st] = policy_rows(ctx, names[st], items, steer.additive_policy("steer", feature, st.strength))
    return {st: steer.gains(clean, rows[st]) for st in settings}


def gains_of(rows: dict[str, list[dict]]) -> dict[str, steer.Gain]:
    return {name: steer.gains(rows["clean"], r) for name, r in rows.items() if name != "clean"}


def steer_candidates(ctx: Context, ranking: Any, hedge_dev: list[EvalItem]) -> dict[str, int]:
    """``ranked``: the ranking's top tool-signed A-exclusive feature; ``predictive``: the live
    A-exclusive feature whose dev value best predicts A's call (when it is higher on calls)."""
    out = {"ranked": f for f in ranking.top("tool", "a_exclusive", 1)}
    try:
        choice = alert.choose(alert.scores(ctx.view, ctx.residuals.get("dev-hedge-A", ctx.pair.a, hedge_dev)),
                              calls_of(ctx, "dev-hedge-clean", hedge_dev), live_a_exclusive(ranking))
    except NotMeasurable:
        return out
    if choice.dev_auroc > 0.5 and choice.feature not in out.values():
        out["predictive"] = choice.feature
    return out


def steer_test(ctx: Context, items: list[EvalItem], feature: int, control: int, setting: steer.Setting,
               direction: torch.Tensor | None) -> dict[str, Any]:
    rows = steered_rows(ctx, "test", items, feature, control, setting, direction)
    gains = gains_of(rows)
    head = gains[f"steer-{steer.HEADLINE}"]
    xa, xb = ctx.residuals.get("test-hedge-A", ctx.pair.a, items), ctx.residuals.get("test-hedge-B", ctx.pair.b, items)
    examples = [{"id": c["id"], "clean": c["output"], "steered": s["output"]}
                for c, s in zip(rows["clean"], rows[f"steer-{steer.HEADLINE}"]) if not c["tool_correctness"] and s["tool_correctness"]][:3]
    return {
        "n": len(items), "mode": setting.mode, "strength": setting.strength, "feature": feature, "control_feature": control,
        "encoding": steer.HEADLINE,
        "tool_correctness_gain_pp": head["tool_correctness"].gain_pp, "tool_correctness_ci_pp": list(head["tool_correctness"].ci_pp),
        "strict_name_gain_pp": head["name_correct"].gain_pp, "strict_name_ci_pp": list(head["name_correct"].ci_pp),
        "control_random_direction_gain_pp": gains["random-direction"]["tool_correctness"].gain_pp,
        "control_random_direction_strict_gain_pp": gains["random-direction"]["name_correct"].gain_pp,
        "control_random_feature_gain_pp": gains["random-feature"]["tool_correctness"].gain_pp,
        "control_random_feature_strict_gain_pp": gains["random-feature"]["name_correct"].gain_pp,
        "reference_call_direction_gain_pp": gains[steer.REFERENCE]["tool_correctness"].gain_pp if steer.REFERENCE in gains else None,
        "reference_call_direction_strict_gain_pp": gains[steer.REFERENCE]["name_correct"].gain_pp if steer.REFERENCE in gains else None,
        "delta_norm_ratio": steer.delta_norm_ratio(steer.feature_delta(ctx.view, xa, xb, feature, setting), xa),
        "fired": steer.fired(ctx.view, xa, xb, feature),
        "conditions": steer.as_dict(gains),
        "examples": examples,
    }


def policy_rows(ctx: Context, name: str, items: list[EvalItem], policy: Any, artifact: Path | None = None) -> list[dict[str, Any]]:
    """Scored outputs of A under ``policy`` (the guard, at every token its rules say), generated once."""
    art = artifact or ctx.art.path
    outs = ctx.store.guarded(name, items, lambda texts: generate_under_policies(
        ctx.store.backend, ctx.pair.a, texts, ctx.store.settings, art, {policy.name: policy})[policy.name])
    return scored(items, outs, name)


def clamped_rows(ctx: Context, split: str, items: list[EvalItem], features: list[int]) -> list[dict[str, Any]]:
    return policy_rows(ctx, f"{split}-deployment-clamp-{'-'.join(map(str, features))}", items, kill.clamp_policy("kill", features))


def kill_switch(ctx: Context, dev_items: list[EvalItem], items: list[EvalItem]) -> kill.KillResult:
    ranking = ctx.art.ranking("deployment")
    sets = kill.candidates(ranking)
    if not sets:
        raise NotMeasurable("the deployment ranking has no tool-signed A-exclusive feature to clamp")
    clean = clean_rows(ctx, "test-deployment-clean", items)
    if not any(r["tool_call"] for r in clean):
        raise NotMeasurable(f"A calls a tool on none of the {len(items)} test prompts under the deployment protocol: nothing to switch off")
    dev_clean = clean_rows(ctx, "dev-deployment-clean", dev_items)
    dev = {name: kill.DevKill.of(dev_clean, clamped_rows(ctx, "dev", dev_items, feats), feats) for name, feats in sets.items()}
    chosen = kill.choose(dev)
    ctx.say(f"  candidate sets {sets}; dev chose {chosen}: the test split with a random clamp")
    control = kill.random_live_features(ranking, len(sets[chosen]), ctx.cfg.seed)
    return kill.KillResult.of(clean, clamped_rows(ctx, "test", items, sets[chosen]), clamped_rows(ctx, "test", items, control),
                              sets[chosen], control, chosen=chosen, dev=dev)


def alarm(ctx: Context, hedge_dev: list[EvalItem], hedge_test: list[EvalItem], irrelevance: list[EvalItem]) -> alert.AlertResult:
    ranking = ctx.art.ranking("hedge")
    dev_calls, test_calls = calls_of(ctx, "dev-hedge-clean", hedge_dev), calls_of(ctx, "test-hedge-clean", hedge_test)
    irr_calls = calls_of(ctx, "test-deployment-irrelevance-clean", irrelevance, "tool_call")
    ordinary = ordinary_items(ctx.cfg.ordinary_prompts, ctx.cfg.seed)
    f = {name: alert.scores(ctx.view, ctx.residuals.get(name, ctx.pair.a, items))
         for name, items in (("dev-hedge-A", hedge_dev), ("test-hedge-A", hedge_test), ("test-ordinary-A", ordinary),
                             ("test-deployment-irrelevance-A", irrelevance))}
    choice = alert.choose(f["dev-hedge-A"], dev_calls, live_a_exclusive(ranking))
    probe = optional(ctx.say, lambda: reference.probe_ceiling(ctx.residuals.get("dev-hedge-A", ctx.pair.a, hedge_dev), dev_calls,
                                                              ctx.residuals.get("test-hedge-A", ctx.pair.a, hedge_test), test_calls, ctx.cfg.seed))
    return alert.AlertResult.of(choice, f["test-hedge-A"], test_calls, f["test-ordinary-A"],
                                f["test-deployment-irrelevance-A"], irr_calls, [i.id for i in hedge_test], probe)


def protocols_of(pair: Any, cfg: PhenomenonConfig) -> tuple[Protocol, Protocol]:
    """The hedge protocol and the deployment one (the turn A was trained on, for the organism)."""
    from guardrail.models.packaged import is_shipped_organism
    from guardrail.organism.assets import trained_turn

    turn = cfg.deployment_turn or (trained_turn() if is_shipped_organism(pair.a.spec) else "plain")
    return HEDGE, deployment(turn)  # type: ignore[arg-type]


def artifact_root(pair: Any, cfg: PhenomenonConfig) -> Path:
    """The folder of this pair's DFC for ``cfg``'s recipe, with its activations, outputs and residuals."""
    return recipe_root(pair, protocols_of(pair, cfg), cfg.recipe)


def measured(say: Callable[[str], None], section: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A section's results, or ``{"not_measured": reason}`` when the pair gives it nothing to measure."""
    try:
        return section()
    except NotMeasurable as exc:
        say(f"  not measured: {exc}")
        return {"not_measured": str(exc)}


def optional(say: Callable[[str], None], make: Callable[[], Any]) -> Any:
    """A reference's value, or None (said) when the pair gives it nothing to fit."""
    try:
        return make()
    except NotMeasurable as exc:
        say(f"  reference not measured: {exc}")
        return None


def steer_section(ctx: Context, ranking: Any, hedge_dev: list[EvalItem], hedge_test: list[EvalItem]) -> dict[str, Any]:
    candidates = steer_candidates(ctx, ranking, hedge_dev)
    if not candidates:
        raise NotMeasurable(f"the DFC at {ctx.art.path} has no tool-signed or call-predicting A-exclusive feature: nothing to steer")
    control = steer.control_feature(ranking, ctx.cfg.seed)
    settings = steer.grid(ctx.cfg.alphas, ctx.cfg.gains)
    ctx.say(f"  features {candidates} (control: feature {control}) × {len(settings)} settings on {len(hedge_dev)} dev prompts")
    dev = {(f, st): g for f in candidates.values() for st, g in dev_grid(ctx, hedge_dev, f, control, settings).items()}
    feature, setting = steer.choose(dev)
    ctx.say(f"  feature {feature}, {setting.label} on dev; the test split with its controls")
    curve = [{"feature": f, "mode": st.mode, "strength": st.strength, "gains": steer.as_dict(g)} for (f, st), g in dev.items()]
    direction = optional(ctx.say, lambda: reference.call_direction(ctx.residuals.get("dev-hedge-A", ctx.pair.a, hedge_dev),
                                                                      calls_of(ctx, "dev-hedge-clean", hedge_dev)))
    return {**steer_test(ctx, hedge_test, feature, control, setting, direction), "candidates": candidates, "dev_curve": curve}


def run_phenomenon(cfg: PhenomenonConfig, say: Callable[[str], None] = print, pair: Any = None) -> dict[str, Any]:
    """Every measurement of the page (``report.write_report`` draws it); ``pair`` overrides ``cfg.pair``."""
    from guardrail.dictionary import load_artifact
    from guardrail.features.interventions import dictionary_view
    from guardrail.models import load_pair
    pair = pair if pair is not None else load_pair(cfg.pair)
    sha = pair.a.adapter_sha256
    protocols = protocols_of(pair, cfg)
    art = ensure_artifact(pair, protocols, cfg.recipe, say, root=artifact_root(pair, cfg))
    backend = make_backend(cfg.backend)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, stop=STOP)
    root, outputs = art.path.parent.parent, f"outputs-{cfg.max_new_tokens}"  # the activations' folder, and the DFC's beside them
    store = OutputStore(art.path.parent / outputs, backend, pair.a, settings, art.layer, say, clean_folder=root / outputs)
    residuals = Residuals(root / "residuals", art.layer)  # depend on the models and the layer only
    cc = load_artifact(art.path)
    ctx = Context(pair, art, dictionary_view(cc), store, residuals, cfg, say)
    hedge_dev = tool_items("dev", HEDGE, pair.tokenizer, limit=cfg.dev_prompts, seed=cfg.seed)
    hedge_test = tool_items("test", HEDGE, pair.tokenizer, limit=cfg.test_prompts, seed=cfg.seed)
    deploy_dev = tool_items("dev", protocols[1], pair.tokenizer, limit=cfg.dev_prompts, seed=cfg.seed)
    deploy_test = tool_items("test", protocols[1], pair.tokenizer, limit=cfg.test_prompts, seed=cfg.seed)
    irrelevance = tool_items("test", protocols[1], pair.tokenizer, ("irrelevance",), limit=cfg.irrelevance_prompts, seed=cfg.seed)

    say(f"hedge protocol: A on {len(hedge_test)} test prompts; deployment protocol: the same tasks through the chat template")
    hedge = measure_hedge(ctx, hedge_test, deploy_test)
    ranking = art.ranking("hedge")
    say("steer: two A-exclusive features × the settings of both modes on the dev split; the chosen one on the test split")
    steered = measured(say, lambda: steer_section(ctx, ranking, hedge_dev, hedge_test))
    say("kill switch: two sets of A-exclusive tool features clamped on the dev split; the chosen one on the test split")
    killed = measured(say, lambda: asdict(kill_switch(ctx, deploy_dev, deploy_test)))
    say("alarm: feature and threshold from dev, AUROC on test")
    alarmed = measured(say, lambda: asdict(alarm(ctx, hedge_dev, hedge_test, irrelevance)))
    return {
        "adapter_sha256": sha, "model_a": pair.a.spec, "model_b": pair.b.spec, "artifact": str(art.path), "layer": art.layer,
        "recipe": asdict(cfg.recipe), "dfc": cc.config.model_dump(mode="json"),
        "protocol": {"hedge": HEDGE.as_dict(), "deployment": protocols[1].as_dict(),
                     "decoding": f"greedy, at most {cfg.max_new_tokens} new tokens, stopped after the first </tool_call>"},
        "hedge": hedge,
        "steer": steered,
        "steer_dev_n": len(hedge_dev),
        "kill_switch": killed,
        "alert": alarmed,
        "seed": cfg.seed,
    }
