"""CLI: ``guardrail eval …`` (the paper's measurements) and ``guardrail rank``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from guardrail.cli.common import AdapterAOpt, ModelAOpt, ModelBOpt, PairOpt, load_pair_from
from guardrail.paper import PAPER_ALPHAS

eval_app = typer.Typer(help="Re-run the paper's measurements on a model pair and say which findings reproduce.", no_args_is_help=True)

OutOpt = typer.Option(None, "--out", help="Run folder (default: runs/eval-<command>-<time>).")
BackendOpt = typer.Option("auto", "--backend", help="auto (vLLM when installed) | vllm | transformers")
SeedOpt = typer.Option(0, "--seed", help="Seed for prompt sampling and bootstrap.")
NToolOpt = typer.Option(40, "--n-tool", help="Tool prompts from the BFCL test split.")
TokensOpt = typer.Option(200, "--max-new-tokens", help="Greedy decoding length (the paper: 200).")
LayerOpt = typer.Option(None, "--layer", help="Layer to patch (default: the artifact's).")


def _out(out: Optional[Path], name: str) -> Path:
    import time

    return out or Path("runs") / f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ctx(pair, artifact, out, backend, seed, max_new_tokens, layer, batch=8, max_prompt_tokens=None):
    from guardrail.generation import GenerationSettings, make_backend
    from guardrail.eval.experiments import RunContext

    lay = layer if layer is not None else getattr(getattr(artifact, "manifest", None), "layer", None)
    if lay is None:
        raise typer.BadParameter("the artifact records no layer: pass --layer")
    return RunContext(pair, make_backend(backend), GenerationSettings(max_new_tokens, batch, max_prompt_tokens), lay, out, seed=seed)


def _finish(res: dict, key: str, out: Path, meta: dict) -> None:
    from guardrail.eval.report import write_report

    paths = write_report({"meta": meta, key: res}, out)
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")


def _meta(pair, ctx, name: str) -> dict:
    return {"profile": name, "pair": pair.name, "model_a": pair.a.spec, "model_b": pair.b.spec, "layer": ctx.layer, "backend": ctx.backend.name,
            "seed": ctx.seed, "max_new_tokens": ctx.settings.max_new_tokens, "notes": []}


@eval_app.command("reproduce")
def reproduce_cmd(
    profile: str = typer.Option("quick", "--profile", help="quick (CPU, embedded pair, ≤45 min) | paper (full protocol, GPU)."),
    pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
    out: Optional[Path] = OutOpt, backend: str = BackendOpt, seed: int = SeedOpt,
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer (default: the paper's relative depth 13/36)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Reuse an activation cache instead of collecting."),
    n_tool: Optional[int] = typer.Option(None, "--n-tool", help="Override the profile's tool prompt count."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Override the profile's decoding length."),
    train_prompts: Optional[int] = typer.Option(None, "--train-prompts", help="Override the tool (and as many ordinary) prompts collected for training."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the training steps of every dictionary."),
    experiments: Optional[str] = typer.Option(None, "--experiments", help="Comma-separated subset: splice,steering,ablation,sweep,geometry,explain."),
) -> None:
    """Collect, train, rank and run every experiment; write results.json, report.md, report.html."""
    from guardrail.eval.profiles import get_profile
    from guardrail.eval.reproduce import reproduce

    if pair is None and not (model_a and model_b):
        pair = "organism"
    p = load_pair_from(pair, model_a, model_b, adapter_a)
    prof = get_profile(profile, pair, n_tool=n_tool, max_new_tokens=max_new_tokens, train_tool=train_prompts, train_plain=train_prompts, steps=steps,
                       experiments=[e.strip() for e in experiments.split(",")] if experiments else None)
    reproduce(prof, p, _out(out, f"reproduce-{profile}"), backend=backend, seed=seed, layer=layer, cache_dir=cache, pair_name=pair)


@eval_app.command("splice")
def splice_cmd(artifact: Path = typer.Argument(..., help="Crosscoder artifact folder."), pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt,
               model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt, n_tool: int = NToolOpt, out: Optional[Path] = OutOpt,
               backend: str = BackendOpt, seed: int = SeedOpt, max_new_tokens: int = TokensOpt, layer: Optional[int] = LayerOpt) -> None:
    """A and B, clean vs reconstructed, in joint (paper) and single-model encoding."""
    from guardrail.dictionary import load_artifact
    from guardrail.eval.experiments import run_splice
    from guardrail.eval.suites import tool_suite

    p, cc = load_pair_from(pair, model_a, model_b, adapter_a), load_artifact(artifact)
    ctx = _ctx(p, cc, _out(out, "splice"), backend, seed, max_new_tokens, layer)
    _finish(run_splice(ctx, cc, tool_suite(n_tool, seed)), "splice", ctx.out_dir, _meta(p, ctx, "splice"))


@eval_app.command("steer")
def steer_cmd(artifact: Path = typer.Argument(..., help="DFC artifact folder (with ranking.json)."),
              standard: Optional[Path] = typer.Option(None, "--standard", help="Standard crosscoder artifact (with ranking.json)."),
              pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
              n_tool: int = NToolOpt, out: Optional[Path] = OutOpt, backend: str = BackendOpt, seed: int = SeedOpt, max_new_tokens: int = TokensOpt,
              layer: Optional[int] = LayerOpt,
              sizes: str = typer.Option("1,2,3,5,8,13,21,33,all", "--sizes", help="|S| values (comma-separated; 'all')."),
              alphas: str = typer.Option(",".join(f"{a:g}" for a in PAPER_ALPHAS), "--alphas", help="α values (comma-separated).")) -> None:
    """Steering saturation curves: A-exclusive, B-exclusive (control), shared, union, standard crosscoder."""
    from guardrail.dictionary import load_artifact
    from guardrail.eval.experiments import run_steering
    from guardrail.eval.suites import tool_suite
    from guardrail.features.ranking import Ranking

    p, cc = load_pair_from(pair, model_a, model_b, adapter_a), load_artifact(artifact)
    std = load_artifact(standard) if standard else None
    ctx = _ctx(p, cc, _out(out, "steer"), backend, seed, max_new_tokens, layer)
    size_list = [s if s == "all" else int(s) for s in (x.strip() for x in sizes.split(","))]
    res = run_steering(ctx, cc, Ranking.load(artifact), tool_suite(n_tool, seed), standard=std, standard_ranking=Ranking.load(standard) if standard else None,
                       sizes=size_list, alphas=[float(a) for a in alphas.split(",")])
    _finish(res, "steering", ctx.out_dir, _meta(p, ctx, "steer"))


@eval_app.command("phenomenon")
def phenomenon_cmd(pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
                   out: Path = typer.Option(Path("runs/phenomenon"), "--out", help="Report folder (results.json, report.md, report.html)."),
                   backend: str = BackendOpt, seed: int = SeedOpt, max_new_tokens: int = TokensOpt,
                   layer: Optional[int] = typer.Option(None, "--layer", help="Layer of the DFC (default: the paper's relative depth)."),
                   turn: Optional[str] = typer.Option(None, "--deployment-turn", help="User turn of the deployment protocol (default: the one A was trained on)."),
                   test_prompts: int = typer.Option(150, "--test-prompts", help="Seeded sample of the test split's answered tasks (0: all 298)."),
                   verbose: bool = typer.Option(False, "--verbose", "-v", help="Show vLLM's and transformers' own logs.")) -> None:
    """Steer on, clamp off, alarm ahead: the product's three claims on one pair, each with its control (docs/phenomenon.md)."""
    from guardrail.terminal import quiet

    quiet(verbose)  # before torch or vLLM is imported
    from guardrail.eval.phenomenon import PhenomenonConfig, run_phenomenon
    from guardrail.eval.phenomenon.artifact import DictionaryRecipe
    from guardrail.eval.phenomenon.report import write_report

    p = load_pair_from(pair or ("organism" if not (model_a or model_b) else None), model_a, model_b, adapter_a)
    cfg = PhenomenonConfig(pair=p.name or "pair", recipe=DictionaryRecipe(layer=layer), deployment_turn=turn, backend=backend,
                           max_new_tokens=max_new_tokens, test_prompts=test_prompts or None, seed=seed)
    paths = write_report(run_phenomenon(cfg, typer.echo, pair=p), out)
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")


@eval_app.command("ablation")
def ablation_cmd(free: Path = typer.Argument(..., help="DFC artifact with λ_excl = 0."), penalised: Path = typer.Argument(..., help="DFC artifact with λ_excl > 0, otherwise equal."),
                 pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
                 n_tool: int = NToolOpt, out: Optional[Path] = OutOpt, backend: str = BackendOpt, seed: int = SeedOpt, max_new_tokens: int = TokensOpt,
                 layer: Optional[int] = LayerOpt) -> None:
    """Exclusive-penalty ablation: A's splice gain with λ_excl = 0 vs > 0."""
    from guardrail.dictionary import load_artifact
    from guardrail.eval.experiments import run_ablation
    from guardrail.eval.suites import tool_suite

    p, a, b = load_pair_from(pair, model_a, model_b, adapter_a), load_artifact(free), load_artifact(penalised)
    ctx = _ctx(p, a, _out(out, "ablation"), backend, seed, max_new_tokens, layer)
    _finish(run_ablation(ctx, a, b, tool_suite(n_tool, seed)), "ablation", ctx.out_dir, _meta(p, ctx, "ablation"))


@eval_app.command("sweep")
def sweep_cmd(cache: Path = typer.Option(..., "--cache", help="Activation cache to train the variants on."),
              grid: str = typer.Option("quick", "--grid", help="paper | quick (scaled to the model width) | a YAML grid file."),
              pair: Optional[str] = PairOpt, model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
              n_tool: int = NToolOpt, out: Optional[Path] = OutOpt, backend: str = BackendOpt, seed: int = SeedOpt, max_new_tokens: int = TokensOpt,
              steps: Optional[int] = typer.Option(None, "--steps", help="Override the grid's training steps.")) -> None:
    """Train a grid of variants (resumable), splice each into A and B, test the sweep-level claims."""
    from guardrail.activations import ActivationCache
    from guardrail.eval.experiments import run_sweep, train_variants
    from guardrail.eval.grids import grid_for
    from guardrail.eval.suites import tool_suite

    p = load_pair_from(pair, model_a, model_b, adapter_a)
    ac = ActivationCache.open(cache)
    run = _out(out, "sweep")
    trained = train_variants(grid_for(grid, p.d_model), ac, run / "dictionaries", overrides={"steps": steps} if steps else None, progress=True)
    ctx = _ctx(p, trained[0][1], run, backend, seed, max_new_tokens, ac.manifest.layer)
    _finish(run_sweep(ctx, trained, tool_suite(n_tool, seed)), "sweep", run, _meta(p, ctx, "sweep"))


@eval_app.command("geometry")
def geometry_cmd(artifact: Path = typer.Argument(..., help="DFC artifact folder."),
                 standard: Optional[Path] = typer.Option(None, "--standard", help="Standard crosscoder artifact (the control)."),
                 out: Optional[Path] = OutOpt, seed: int = SeedOpt) -> None:
    """UMAP of decoder directions by partition; cluster recovery vs a random matched partition of the standard CC."""
    from guardrail.dictionary import load_artifact
    from guardrail.eval.experiments import run_geometry

    res = run_geometry(load_artifact(artifact), load_artifact(standard) if standard else None, seed=seed)
    _finish(res, "geometry", _out(out, "geometry"), {"profile": "geometry", "notes": []})


@eval_app.command("explain")
def explain_cmd(artifact: Path = typer.Argument(..., help="Crosscoder artifact folder (with ranking.json)."), pair: Optional[str] = PairOpt,
                model_a: Optional[str] = ModelAOpt, model_b: Optional[str] = ModelBOpt, adapter_a: Optional[str] = AdapterAOpt,
                n_prompts: int = typer.Option(40, "--n-prompts", help="Prompts (half tool, half ordinary) to scan."),
                per_partition: int = typer.Option(3, "--per-partition", help="Top tool-signed features explained per partition."),
                out: Optional[Path] = OutOpt, seed: int = SeedOpt, layer: Optional[int] = LayerOpt) -> None:
    """Top-activating contexts and template-token share of the top tool-signed features (no LLM judge)."""
    from guardrail.dictionary import load_artifact
    from guardrail.eval.experiments import run_explain
    from guardrail.eval.suites import mixed_suite
    from guardrail.features.ranking import Ranking

    p, cc = load_pair_from(pair, model_a, model_b, adapter_a), load_artifact(artifact)
    lay = layer if layer is not None else cc.manifest.layer
    res = run_explain(p, cc, Ranking.load(artifact), mixed_suite(n_prompts // 2, n_prompts - n_prompts // 2, seed), lay, per_partition=per_partition)
    _finish(res, "explain", _out(out, "explain"), {"profile": "explain", "pair": p.name, "layer": lay, "notes": []})


def rank_cmd(artifact: Path = typer.Argument(..., help="Crosscoder artifact folder; ranking.json is written beside it."),
             cache: Path = typer.Option(..., "--cache", help="Activation cache with tool and ordinary prompts."),
             negatives_cache: Optional[Path] = typer.Option(
                 None, "--negatives-cache",
                 help="Cache of template-matched negatives (guardrail collect --prompts template-negatives): also rank tool prompts against them."),
             encoding: str = typer.Option("joint", "--encoding", help="joint | a_only | b_only"),
             top: int = typer.Option(5, "--top", help="Features shown per partition.")) -> None:
    """Rank features by Cohen's d / AUROC between tool prompts and negatives; save the ranking.json sidecar."""
    from guardrail.activations import ActivationCache
    from guardrail.features.ranking import rank, summary

    neg = ActivationCache.open(negatives_cache) if negatives_cache is not None else None
    rs = rank(artifact, ActivationCache.open(cache), encoding, negatives_cache=neg)  # type: ignore[arg-type]
    for r in (rs.plain, rs.template):
        if r is None:
            continue
        typer.echo(f"{r.negatives} negatives: ranked on {r.n_tool} tool / {r.n_plain} negative prompts")
        for row in summary(r, top):
            typer.echo(f"  {row['partition']:<12} #{row['index']:<6} d={row['cohens_d']:+.2f} auroc={row['auroc']:.3f} fire(tool)={row['fire_rate_tool']:.2f}")
    typer.echo(f"wrote {artifact / 'ranking.json'}")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
    app.command("rank")(rank_cmd)
