"""``guardrail eval reproduce``: every measurement of the paper on one model pair, one report.

Pipeline: collect paired activations (BFCL train split + ordinary prompts, the paper's raw
rendering) → train the sweep grid (its 5%-exclusive free/penalised DFCs and the standard
crosscoder at the profile's k are the main dictionaries) → rank features (sidecar
``ranking.json`` in each artifact) → splice, steering, ablation, sweep, geometry,
explanations on the BFCL *test* split → results.json, report.md, report.html.

An experiment that fails is recorded as an error in the results and the run goes on, so
one broken stage never loses the others' numbers.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from guardrail.generation import GenerationSettings, make_backend
from guardrail.eval.experiments import (
    RunContext, dictionary_health, run_ablation, run_explain, run_geometry, run_splice, run_steering, run_sweep, train_variants,
)
from guardrail.eval.grids import grid_for, main_trio
from guardrail.eval.profiles import Profile
from guardrail.eval.report import write_report
from guardrail.eval.suites import mixed_suite, plain_suite, tool_suite
from guardrail.paper import paper_layer


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def collect_training_cache(pair: Any, profile: Profile, layer: int, out: Path, seed: int, progress: bool):
    from guardrail.activations import collect
    from guardrail.prompts import mixed
    from guardrail.residual import Site

    site = Site(layer=layer, positions="prompt", last_n=profile.train_last_n)
    prompts = mixed(profile.train_tool, profile.train_plain, split="train", mode="raw", seed=seed, turn=profile.turn)
    return collect(pair, prompts, site, out, batch_size=profile.collect_batch, max_length=profile.max_prompt_tokens or 2048, progress=progress)


def _rank(cc_dir: Path, cache: Any) -> dict[str, Any]:
    from guardrail.features.ranking import rank

    r = rank(cc_dir, cache, save=True).plain
    signed = {p: len(r.top("tool", p)) for p in ("a_exclusive", "b_exclusive", "shared")}
    return {"ranking": r, "summary": {"n_tool": r.n_tool, "n_plain": r.n_plain, "tool_signed": signed, "sidecar": str(cc_dir / "ranking.json")}}


def _checkpoint(res: dict[str, Any], out: Path | None) -> None:
    """Write what is measured so far (results.partial.json): a long run shows progress and loses nothing."""
    if out is None:
        return
    from guardrail.eval.report import _slim, strict_json

    (out / "results.partial.json").write_text(strict_json(_slim(res)))


def _stage(res: dict[str, Any], key: str, fn: Callable[[], Any], progress: bool, out: Path | None = None) -> Any:
    t = time.time()
    _log(f"{key} ...", progress)
    try:
        out_val = fn()
        res[key] = out_val
        _log(f"{key} done in {time.time() - t:.0f} s", progress)
        _checkpoint(res, out)
        return out_val
    except Exception as exc:  # noqa: BLE001 - keep the other stages' numbers
        res[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        res.setdefault("meta", {}).setdefault("notes", []).append(f"{key} failed: {type(exc).__name__}: {exc}")
        _log(f"{key} FAILED: {type(exc).__name__}: {exc}", progress)
        _checkpoint(res, out)
        if os.environ.get("GUARDRAIL_DEBUG"):
            raise
        return None


def _meta(profile: Profile, pair: Any, pair_name: str | None, layer: int, backend: str, seed: int) -> dict[str, Any]:
    """What a reader needs to know to trust or rerun the numbers: models, site, budget, settings."""
    meta = {
        "profile": profile.name, "pair": pair_name or getattr(pair, "name", "custom"), "model_a": pair.a.spec, "model_b": pair.b.spec,
        "layer": layer, "n_layers": pair.n_layers, "d_model": pair.d_model, "backend": backend, "seed": seed,
        "max_new_tokens": profile.max_new_tokens, "render_mode": "raw", "turn": profile.turn, "settings": profile.model_dump(), "notes": [],
        "adapter_sha256": pair.a.adapter_sha256,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads(),
    }
    if profile.max_new_tokens != 200:
        meta["notes"].append(f"greedy decoding stops at {profile.max_new_tokens} new tokens (the paper: 200); a tool call written later is missed")
    return meta


def reproduce(profile: Profile, pair: Any, out: str | Path, *, backend: str = "auto", seed: int = 0, layer: int | None = None,
              cache_dir: str | Path | None = None, progress: bool = True, pair_name: str | None = None) -> dict[str, Any]:
    """Run the profile on ``pair`` into ``out``; returns the results dict (also written to disk)."""
    from guardrail.activations import ActivationCache

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layer = paper_layer(pair.n_layers) if layer is None else layer
    be = make_backend(backend)
    res: dict[str, Any] = {"meta": _meta(profile, pair, pair_name, layer, be.name, seed)}
    _log(f"collecting training activations at layer {layer}", progress)
    cache = ActivationCache.open(cache_dir) if cache_dir else collect_training_cache(pair, profile, layer, out / "cache", seed, progress)
    dicts = _train_dictionaries(profile, pair, cache, out, progress)
    res["ranking"] = {k: v["summary"] for k, v in dicts.ranks.items()}
    res["dictionaries_trained"] = {k: dicts.main[k].name for k in dicts.main}

    settings = GenerationSettings(max_new_tokens=profile.max_new_tokens, batch_size=profile.gen_batch, max_prompt_tokens=profile.max_prompt_tokens)
    ctx = RunContext(pair, be, settings, layer, out, seed=seed, n_boot=profile.n_boot, progress=progress)
    tools = tool_suite(profile.n_tool, seed, turn=profile.turn)
    mixed = mixed_suite(profile.n_tool, profile.n_plain, seed, turn=profile.turn) if profile.n_plain else tools
    eval_acts = ctx.acts(mixed)
    is_tool = torch.tensor([i.is_tool for i in mixed.items])
    res["dictionaries"] = {k: dictionary_health(dicts.of(k), eval_acts, is_tool) for k in ("dfc", "dfc_penalised", "standard")}
    res["suites"] = {"tool": tools.recipe, "mixed": mixed.recipe}
    _run_experiments(res, ctx, profile, dicts, tools)
    res["meta"]["duration_s"] = time.time() - t0
    res["meta"]["n_generated"] = ctx.n_generated
    paths = write_report(res, out)
    (out / "results.partial.json").unlink(missing_ok=True)
    _log(f"report: {paths['markdown']} ({res['meta']['duration_s']:.0f} s, {ctx.n_generated} generations)", progress)
    return res


@dataclass
class _Dictionaries:
    """What training gave the experiments: every trained variant, the main trio and their rankings."""

    trained: dict[str, Any]
    main: dict[str, Any]
    sweep: list[Any]
    ranks: dict[str, dict[str, Any]]

    def of(self, role: str) -> Any:
        return self.trained[self.main[role].name]


def _train_dictionaries(profile: Profile, pair: Any, cache: Any, out: Path, progress: bool) -> _Dictionaries:
    """The whole grid when the sweep is asked for, else only the main trio; the trio gets ranked."""
    from guardrail.training.sweep import expand_grid

    grid = grid_for(profile.grid, pair.d_model)
    overrides = {k: v for k, v in {"steps": profile.steps, "batch_size": profile.batch_size}.items() if v is not None}
    main = main_trio(expand_grid(grid), profile.exclusive)
    whole = "sweep" in profile.experiments
    _log(f"training {'the ' + grid.name + ' grid' if whole else 'the main dictionaries'} ({overrides or 'grid settings'})", progress)
    trained_list = train_variants(grid, cache, out / "dictionaries", names=None if whole else [v.name for v in main.values()],
                                  overrides=overrides, progress=False)
    ranks = {k: _rank(out / "dictionaries" / main[k].name, cache) for k in ("dfc", "standard")}
    return _Dictionaries(trained={spec.name: cc for spec, cc in trained_list}, main=main,
                         sweep=[spec for spec, _ in trained_list] if whole else [], ranks=ranks)


def _run_experiments(res: dict[str, Any], ctx: RunContext, profile: Profile, dicts: _Dictionaries, tools: Any) -> None:
    """Each asked-for experiment as a stage: a failure is recorded and the next one runs."""
    seed, out, progress, exps = ctx.seed, ctx.out_dir, ctx.progress, profile.experiments
    dfc, pen, std = dicts.of("dfc"), dicts.of("dfc_penalised"), dicts.of("standard")
    ranking = dicts.ranks["dfc"]["ranking"]
    if profile.n_plain:
        _stage(res, "plain_false_calls", lambda: _plain_false_calls(ctx, plain_suite(profile.n_plain, seed)), progress, out)
    if "splice" in exps:
        _stage(res, "splice", lambda: run_splice(ctx, dfc, tools), progress, out)
    if "steering" in exps:
        _stage(res, "steering", lambda: run_steering(ctx, dfc, ranking, tools, standard=std, standard_ranking=dicts.ranks["standard"]["ranking"],
                                                     sizes=profile.sizes, alphas=profile.alphas), progress, out)
    if "ablation" in exps:
        _stage(res, "ablation", lambda: run_ablation(ctx, dfc, pen, tools), progress, out)
    if "sweep" in exps and dicts.sweep:
        sweep_suite = tool_suite(profile.sweep_prompts or profile.n_tool, seed, turn=profile.turn)
        _stage(res, "sweep", lambda: run_sweep(ctx, [(v, dicts.trained[v.name]) for v in dicts.sweep], sweep_suite), progress, out)
    if "geometry" in exps:
        _stage(res, "geometry", lambda: run_geometry(dfc, std, seed=seed), progress, out)
    if "explain" in exps:
        ex_suite = mixed_suite(max(1, profile.explain_prompts // 2), profile.explain_prompts // 2, seed, turn=profile.turn)
        _stage(res, "explain", lambda: run_explain(ctx.pair, dfc, ranking, ex_suite, ctx.layer, per_partition=profile.explain_per_partition,
                                                   max_prompt_tokens=profile.max_prompt_tokens), progress, out)


def _plain_false_calls(ctx: RunContext, suite) -> dict[str, Any]:
    """How often A and B call a tool on ordinary prompts (the right answer is never)."""
    from guardrail.eval.scoring import aggregate

    out: dict[str, Any] = {"n_prompts": len(suite)}
    records = []
    for m, name in ((0, "A"), (1, "B")):
        recs = ctx.clean_records(m, suite, "plain")
        records += recs
        out[name] = {kind: aggregate([r for r in recs if r["kind"] == kind])["tool_call"] if any(r["kind"] == kind for r in recs) else None
                     for kind in ("general", "chatable", "irrelevance")}
    out["outputs"] = str(ctx.save("plain", records).relative_to(ctx.out_dir))
    return out
