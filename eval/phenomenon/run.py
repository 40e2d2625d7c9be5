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

from guardrail.eval.backends import GenerationSettings, last_token_residual, make_backend
from guardrail.eval.phenomenon import alert, kill, steer
from guardrail.eval.phenomenon.errors import NotMeasurable
from guardrail.eval.phenomenon.artifact import DictionaryRecipe, PhenomenonArtifact, ensure_artifact, live_a_exclusive, recipe_root
from guardrail.eval.phenomenon.outputs import OutputStore, scored
from guardrail.eval.scoring import aggregate
from guardrail.eval.phenomenon.protocols import HEDGE, Protocol, deployment
from guardrail.eval.suites import EvalItem
from guardrail.stats import wilson

STOP = ("</tool_call>",)  # every metric reads the first call block; decoding past it changes no score


@dataclass
class PhenomenonConfig:
    pair: str = "organism"
    recipe: DictionaryRecipe = field(default_factory=DictionaryRecipe)
    deployment_turn: str | None = None  # None: the turn A was trained on (organism), else "plain"
    backend: str = "auto"
    max_new_tokens: int = 200  # the paper's
    alphas: tuple[float, ...] = (6.0, 16.0, 32.0, 64.0)  # the paper's α > 1
    test_prompts: int | None = 150  # a seeded sample of the test split's answered tasks (None: all 298); n ≥ 100 for the bars
    dev_prompts: int | None = None  # dev tasks choosing α and the alarm (None: all 102)
    irrelevance_prompts: int | None = None  # BFCL irrelevance test tasks (None: all 74)
    ordinary_prompts: int = 200  # ordinary test prompts for the alarm's false-positive rate
    dev_controls: bool = True  # the controls at every α of the dev curve too (the plot), not only at the chosen α on test
    seed: int = 0


def adapter_sha256(pair: Any) -> str | None:
    """sha256 of A's adapter weights when A is the shipped organism, else None."""
    if "+organism-rl@" not in str(pair.a.spec):
        return None
    from guardrail.fileio import sha256_file
    from guardrail.models.packaged import shipped_adapter

    return sha256_file(shipped_adapter() / "adapter_model.safetensors")


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


def measure_hedge(ctx: Context, hedge_test: list[EvalItem], deploy_test: list[EvalItem]) -> dict[str, Any]:
    rows = clean_rows(ctx, "test-hedge-clean", hedge_test)
    hedge, chat = aggregate(rows), aggregate(clean_rows(ctx, "test-deployment-clean", deploy_test))
    n, k = len(rows), sum(r["format_accuracy"] for r in rows)
    return {"n": n, "format_rate_clean": k / max(n, 1), "format_rate_ci": list(wilson(k, n, 1.959964)),
            "tool_correctness_clean": hedge.get("tool_correctness", 0.0), "strict_name_clean": hedge.get("name_correct", 0.0),
            "chat_n": chat["n"], "chat_format_rate": chat.get("format_accuracy", 0.0), "chat_strict_name_accuracy": chat.get("name_correct", 0.0),
            "chat_tool_correctness": chat.get("tool_correctness", 0.0)}


def steer_dev_curve(ctx: Context, items: list[EvalItem], feature: int, control: int) -> dict[float, dict[str, dict[str, steer.Gain]]]:
    xa, xb = ctx.residuals.get("dev-hedge-A", ctx.pair.a, items), ctx.residuals.get("dev-hedge-B", ctx.pair.b, items)
    curve = {}
    for alpha in ctx.cfg.alphas:
        deltas = steer.conditions(ctx.view, xa, xb, feature, control, alpha, ctx.cfg.seed, encodings=(steer.HEADLINE,))
        if not ctx.cfg.dev_controls:
            deltas = {f"steer-{steer.HEADLINE}": deltas[f"steer-{steer.HEADLINE}"]}
        rows = steer.generate_deltas(ctx.store, items, xa, deltas, "dev-hedge-clean", f"dev-hedge-f{feature}-c{control}-a{alpha:g}-s{ctx.cfg.seed}-")
        curve[alpha] = {name: steer.gains(rows["clean"], r) for name, r in rows.items() if name != "clean"}
    return curve


def steer_test(ctx: Context, items: list[EvalItem], feature: int, control: int, alpha: float) -> dict[str, Any]:
    xa, xb = ctx.residuals.get("test-hedge-A", ctx.pair.a, items), ctx.residuals.get("test-hedge-B", ctx.pair.b, items)
    deltas = steer.conditions(ctx.view, xa, xb, feature, control, alpha, ctx.cfg.seed)
    rows = steer.generate_deltas(ctx.store, items, xa, deltas, "test-hedge-clean", f"test-hedge-f{feature}-c{control}-a{alpha:g}-s{ctx.cfg.seed}-")
    gains = {name: steer.gains(rows["clean"], r) for name, r in rows.items() if name != "clean"}
    head = gains[f"steer-{steer.HEADLINE}"]
    examples = [{"id": c["id"], "clean": c["output"], "steered": s["output"]}
                for c, s in zip(rows["clean"], rows[f"steer-{steer.HEADLINE}"]) if not c["tool_correctness"] and s["tool_correctness"]][:3]
    return {
        "n": len(items), "alpha": alpha, "feature": feature, "control_feature": control, "encoding": steer.HEADLINE,
        "tool_correctness_gain_pp": head["tool_correctness"].gain_pp, "tool_correctness_ci_pp": list(head["tool_correctness"].ci_pp),
        "strict_name_gain_pp": head["name_correct"].gain_pp, "strict_name_ci_pp": list(head["name_correct"].ci_pp),
        "control_random_direction_gain_pp": gains["random-direction"]["tool_correctness"].gain_pp,
        "control_random_direction_strict_gain_pp": gains["random-direction"]["name_correct"].gain_pp,
        "control_random_feature_gain_pp": gains["random-feature"]["tool_correctness"].gain_pp,
        "control_random_feature_strict_gain_pp": gains["random-feature"]["name_correct"].gain_pp,
        "delta_norm_ratio": steer.delta_norm_ratio(deltas[f"steer-{steer.HEADLINE}"], xa),
        "delta_norm_ratio_joint": steer.delta_norm_ratio(deltas["steer-joint"], xa),
        "fired": steer.fired(ctx.view, xa, xb, feature),
        "conditions": steer.as_dict(gains),
        "examples": examples,
    }


def kill_switch(ctx: Context, items: list[EvalItem], backend: Any) -> kill.KillResult:
    from guardrail.eval.backends import generate_under_policies

    ranking = ctx.art.ranking("deployment")
    top = ranking.top("tool", "a_exclusive", kill.KILL_TOP)
    if not top:
        raise NotMeasurable("the deployment ranking has no tool-signed A-exclusive feature to clamp")
    clean = clean_rows(ctx, "test-deployment-clean", items)
    if not any(r["tool_call"] for r in clean):
        raise NotMeasurable(f"A calls a tool on none of the {len(items)} test prompts under the deployment protocol: nothing to switch off")
    control = kill.random_live_features(ranking, len(top), ctx.cfg.seed)
    names = {f"test-deployment-clamp-{'-'.join(map(str, top))}": top, f"test-deployment-clamp-{'-'.join(map(str, control))}": control}
    outs = {}
    for name, feats in names.items():
        outs[name] = ctx.store.guarded(name, items, lambda texts, feats=feats: generate_under_policies(
            backend, ctx.pair.a, texts, ctx.store.settings, ctx.art.path, {"kill": kill.clamp_policy("kill", feats)})["kill"])
    clamped, rand = (scored(items, o, n) for n, o in outs.items())
    return kill.KillResult.of(clean, clamped, rand, top, control)


def alarm(ctx: Context, hedge_dev: list[EvalItem], hedge_test: list[EvalItem], irrelevance: list[EvalItem]) -> alert.AlertResult:
    ranking = ctx.art.ranking("hedge")
    calls = lambda name, items, key="format_accuracy": torch.tensor([r[key] for r in clean_rows(ctx, name, items)], dtype=torch.bool)  # noqa: E731
    dev_calls, test_calls = calls("dev-hedge-clean", hedge_dev), calls("test-hedge-clean", hedge_test)
    irr_calls = calls("test-deployment-irrelevance-clean", irrelevance, "tool_call")
    ordinary = ordinary_items(ctx.cfg.ordinary_prompts, ctx.cfg.seed)
    f = {name: alert.scores(ctx.view, ctx.residuals.get(name, ctx.pair.a, items))
         for name, items in (("dev-hedge-A", hedge_dev), ("test-hedge-A", hedge_test), ("test-ordinary-A", ordinary),
                             ("test-deployment-irrelevance-A", irrelevance))}
    choice = alert.choose(f["dev-hedge-A"], dev_calls, live_a_exclusive(ranking))
    return alert.AlertResult.of(choice, f["test-hedge-A"], test_calls, f["test-ordinary-A"],
                                f["test-deployment-irrelevance-A"], irr_calls, [i.id for i in hedge_test])


def protocols_of(pair: Any, cfg: PhenomenonConfig) -> tuple[Protocol, Protocol]:
    """The hedge protocol and the deployment one (the turn A was trained on, for the organism)."""
    from guardrail.organism.assets import trained_turn

    turn = cfg.deployment_turn or (trained_turn() if adapter_sha256(pair) else "plain")
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


def steer_section(ctx: Context, ranking: Any, hedge_dev: list[EvalItem], hedge_test: list[EvalItem]) -> dict[str, Any]:
    top = ranking.top("tool", "a_exclusive", 1)
    if not top:
        raise NotMeasurable(f"the DFC at {ctx.art.path} has no tool-signed A-exclusive feature: nothing to steer")
    feature, control = top[0], steer.control_feature(ranking, ctx.cfg.seed)
    ctx.say(f"  feature {feature} (control: feature {control}); α from {len(hedge_dev)} dev prompts")
    curve = steer_dev_curve(ctx, hedge_dev, feature, control)
    alpha = steer.choose_alpha(curve)
    ctx.say(f"  α = {alpha:g} on dev; the test split at that α")
    return {**steer_test(ctx, hedge_test, feature, control, alpha), "dev_curve": {f"{a:g}": steer.as_dict(c) for a, c in curve.items()}}


def run_phenomenon(cfg: PhenomenonConfig, say: Callable[[str], None] = print, pair: Any = None) -> dict[str, Any]:
    """Every measurement of the page (``report.write_report`` draws it); ``pair`` overrides ``cfg.pair``."""
    from guardrail.dictionary import load_artifact
    from guardrail.features.interventions import dictionary_view
    from guardrail.models import load_pair
    pair = pair if pair is not None else load_pair(cfg.pair)
    sha = adapter_sha256(pair)
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
    deploy_test = tool_items("test", protocols[1], pair.tokenizer, limit=cfg.test_prompts, seed=cfg.seed)
    irrelevance = tool_items("test", protocols[1], pair.tokenizer, ("irrelevance",), limit=cfg.irrelevance_prompts, seed=cfg.seed)

    say(f"hedge protocol: A on {len(hedge_test)} test prompts; deployment protocol: the same tasks through the chat template")
    hedge = measure_hedge(ctx, hedge_test, deploy_test)
    ranking = art.ranking("hedge")
    say("steer: the top A-exclusive feature, α chosen on the dev split, reported on the test split")
    steered = measured(say, lambda: steer_section(ctx, ranking, hedge_dev, hedge_test))
    say("kill switch: clamping the top A-exclusive tool features under the deployment protocol")
    killed = measured(say, lambda: asdict(kill_switch(ctx, deploy_test, backend)))
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
