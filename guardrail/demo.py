"""The paper's story on one machine: hedger, agent, steered hedger, kill switch, alerts, audit.

Every step calls the library the way a user would (collect → train → rank → policies →
guard → audit); the demo only chooses settings and lays the results side by side.
Expensive results are cached under ``$GUARDRAIL_HOME/demo/<pair>/dfc-<recipe>`` so a
second run only generates, and a changed recipe (layer, dictionary, training) trains anew.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from guardrail.paper import PAPER_ALPHAS as ALPHAS
from guardrail.paper import paper_layer
from guardrail.paths import home


@dataclass
class DemoConfig:
    pair: str = "organism"
    layer: int | None = None  # default: 36% depth, as layer 13/36 in the paper
    last_n: int = 32  # training rows: the last N prompt tokens of each prompt
    tool_prompts: int | None = 300  # and as many ordinary prompts; None: every BFCL train-split task
    # the DFC: the crosscoder of the quick eval grid's free-exclusive variant with the
    # smaller k (the paper's D=8192, k=45 at d=2048 scaled to the model width, L1 on shared
    # features). On the organism its top A-exclusive feature separates tool prompts with
    # Cohen's d ≈ 55; the earlier settings (D=2048, k=32, no shared L1, 1500 steps) gave
    # d ≈ 0.2: a feature that hardly fired
    dict_size: int | None = None  # None: the grid's (4 × d_model)
    k: int | None = None  # None: the grid's (45 × d_model / 2048)
    exclusive: float = 0.05
    steps: int = 600
    batch_size: int = 256
    lr: float = 3e-4
    curve_prompts: int = 24  # prompts per point of the saturation curve
    max_new_tokens: int = 96
    audit_prompts: int = 200
    audit_tokens: int = 48
    backend: str = "auto"
    retrain: bool = False
    out: Path = Path("runs/demo")


class StageClock:
    """Wall time of each stage of a run, in the order they ran; the run ends with this table.

    A stage served from the cache is recorded too (near zero), so the table of a later run
    shows what the cache saved, and the table of a first run what a user waits for.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cached: list[str] = []  # stages whose result was read back, not made

    def mark_cached(self, name: str) -> None:
        self.seconds.setdefault(name, 0.0)
        self.cached.append(name)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)


@dataclass
class DemoResult:
    prompt_id: str
    outputs: dict[str, str]
    alerts: list[dict]
    curve: dict[str, list[float]]
    curve_n: int
    feature: dict
    audit: dict
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (StageClock)
    artifact: str = ""
    notices: list[str] = field(default_factory=list)  # what the pair did not show, first on the page
    models: dict[str, str] = field(default_factory=dict)  # A's and B's specs (A's names its adapter's sha256)
    cached: list[str] = field(default_factory=list)  # stages read back from an earlier run's cache


def policy_file(name: str) -> Path:
    """A shipped policy (``policies/`` in the source tree, ``guardrail.policies`` installed)."""
    return Path(str(resources.files("guardrail.policies") / name))


def _key(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def demo_root(pair, cfg: DemoConfig) -> Path:
    """Cache folder of one pair: named by both models' specs, so a rebuilt A never reuses it."""
    return home() / "demo" / f"{cfg.pair}-{_key(f'{pair.a.spec}|{pair.b.spec}')}"


def _recipe(pair, cfg: DemoConfig) -> tuple[dict, Any]:
    """What the activations and the DFC depend on: a change to either names a new cache folder."""
    from guardrail.dictionary import DFCConfig

    grid = quick_grid_dfc(pair.d_model)
    layer = paper_layer(pair.n_layers) if cfg.layer is None else cfg.layer
    dfc = DFCConfig(dict_size=cfg.dict_size or grid.dict_size, k=cfg.k or grid.k, exclusive=cfg.exclusive,
                    lambda_shared=grid.lambda_shared, penalty_form=grid.penalty_form)
    return {"layer": layer, "last_n": cfg.last_n, "tool_prompts": cfg.tool_prompts}, dfc


def quick_grid_dfc(d_model: int):
    """The quick eval grid's free-exclusive DFC with the smallest k, scaled to ``d_model``:
    the demo trains the dictionary the eval harness measures, not a look-alike."""
    from guardrail.eval.grids import variants

    free = [s.crosscoder for s in variants("quick", d_model) if s.crosscoder.is_dfc and s.crosscoder.lambda_excl == 0]
    return min(free, key=lambda c: c.k)


def ensure_dfc(pair, cfg: DemoConfig, say: Callable[[str], None], clock: StageClock | None = None) -> Path:
    """The demo's DFC: cached from an earlier run with the same recipe, else collected, trained
    and ranked now. Results that depend on the DFC (curve, audit) live beside it."""
    from guardrail.activations import collect
    from guardrail.features.ranking import RANKING_FILE, rank
    from guardrail.prompts import mixed
    from guardrail.residual import Site
    from guardrail.training import train

    clock = clock or StageClock()
    site, dfc = _recipe(pair, cfg)
    training = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr}
    root = demo_root(pair, cfg)
    art = root / f"dfc-{_key([site, dfc.model_dump(), training])}" / "dfc"
    if cfg.retrain:
        shutil.rmtree(art.parent, ignore_errors=True)
    if (art / RANKING_FILE).exists():
        say(f"using the cached DFC at {art}")
        clock.mark_cached("DFC (collect, train, rank)")
        return art
    prompts = mixed(cfg.tool_prompts, None, split="train", mode="raw", tokenizer=pair.tokenizer)
    say(f"collecting activations of A and B at layer {site['layer']} ({len(prompts)} prompts, last {cfg.last_n} tokens each)")
    with clock.stage("collect activations"):
        cache = collect(pair, prompts, Site(layer=site["layer"], positions="prompt", last_n=cfg.last_n),
                        root / f"cache-{_key(site)}")
    say(f"training a DFC: D={dfc.dict_size}, k={dfc.k}, {cfg.exclusive:.0%} exclusive per model, {cfg.steps} steps")
    with clock.stage("train DFC"):
        train(cache, dfc, art, **training)
    with clock.stage("rank features"):
        rank(art, cache)
    return art


def _policies(feature_alpha: float) -> dict[str, Any]:
    from guardrail.policy import Policy

    amplify = Policy.load(policy_file("tool-use-amplify.yaml"))
    data = amplify.model_dump(mode="json", exclude_unset=True)
    data["rules"][0]["alpha"] = feature_alpha
    return {
        "amplify": Policy.from_data(data, source="tool-use-amplify (demo alpha)"),
        "kill": Policy.load(policy_file("tool-use-kill-switch.yaml")),
        "alert": Policy.load(policy_file("exclusive-alert.yaml")),
    }


def a_outputs_until_both(pair, tasks, max_new_tokens: int, chunk: int = 16) -> dict[str, str]:
    """A's greedy outputs on held-out tool prompts, ``chunk`` at a time, until there is one
    prompt where A hedges (room to steer) and one where A calls a tool (something for the
    kill switch to stop), or the prompts run out: under the paper's raw rendering A may call
    on fewer than one prompt in ten. The page shows these very outputs."""
    from guardrail.eval.backends import GenerationSettings, TransformersBackend
    from guardrail.tasks import format_accuracy

    backend, settings = TransformersBackend(), GenerationSettings(max_new_tokens=max_new_tokens)
    outs: dict[str, str] = {}
    for start in range(0, len(tasks), chunk):
        part = tasks[start : start + chunk]
        outs.update(zip((t.id for t in part), backend.generate(pair.a, [t.render(pair.tokenizer, "raw") for t in part], settings)))
        calls = [format_accuracy(o) for o in outs.values()]
        if any(calls) and not all(calls):
            break
    return outs


def pick_prompts(tasks, outs: dict[str, str]) -> tuple[Any, Any]:
    """The first prompt A hedged on and the first it called a tool on (None if there was none)."""
    from guardrail.tasks import format_accuracy

    tried = [t for t in tasks if t.id in outs]
    hedge = next((t for t in tried if not format_accuracy(outs[t.id])), None)
    call = next((t for t in tried if format_accuracy(outs[t.id])), None)
    return hedge, call


CURVE_METRICS = {"format_accuracy": "format accuracy", "tool_correctness": "tool correctness"}


def saturation_curve(pair, art: Path, tasks: list, cfg: DemoConfig) -> dict[str, list[float]]:
    """A's format accuracy and (lenient) tool correctness, the paper's two steering
    metrics, with the top A-exclusive feature scale-steered, per α.

    The amplify policy's own engine computes each prompt's steered last-token activation
    (the guard's math, once per α); the generation backend (vLLM when installed) then
    decodes every α from one prefill per prompt.
    """
    from guardrail.eval.backends import GenerationSettings, generate_conditions, last_token_residual, make_backend
    from guardrail.policy import TokenPositions, compile_policy
    from guardrail.tasks import format_accuracy, tool_correctness

    texts = [t.render(pair.tokenizer, "raw") for t in tasks]
    compiled = {a: compile_policy(_policies(a)["amplify"], art) for a in ALPHAS}
    layer = compiled[ALPHAS[0]].layer
    x = last_token_residual(pair.a, texts, layer)
    n = len(texts)
    last = TokenPositions(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), torch.arange(n), torch.zeros(n, dtype=torch.long))
    conditions: dict[str, list | None] = {}
    for alpha, pol in compiled.items():
        res = pol.apply(x, last)
        patched = x.clone()
        if res.rows is not None:
            patched[res.rows] = res.values.float()
        conditions[f"{alpha:g}"] = None if res.rows is None else list(patched)
    outs = generate_conditions(make_backend(cfg.backend), pair.a, texts, GenerationSettings(max_new_tokens=cfg.max_new_tokens),
                               conditions, layer=layer)
    rate = lambda ok: sum(ok) / n  # noqa: E731
    return {"alpha": list(ALPHAS),
            "format_accuracy": [rate(map(format_accuracy, outs[f"{a:g}"])) for a in ALPHAS],
            "tool_correctness": [rate(tool_correctness(o, t.tool_names) for o, t in zip(outs[f"{a:g}"], tasks)) for a in ALPHAS]}


def _timed_cached(clock: StageClock, name: str, path: Path, refresh: bool, make: Callable[[], Any]) -> Any:
    """One stage whose JSON result is cached at ``path``: ``make()`` timed and stored, or read
    back on later runs (unless ``refresh``) and marked as served by the cache."""
    if path.exists() and not refresh:
        clock.mark_cached(name)
        return json.loads(path.read_text())
    with clock.stage(name):
        value = make()
    path.write_text(json.dumps(value, indent=2))
    return value


def audit_lines(report: dict) -> list[str]:
    """The audit's gains with their intervals, then its reasons (terminal and page alike)."""
    gains = [f"{k}: gain {100 * g['gain']:+.1f} pp, CI [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]" for k, g in report.get("gains", {}).items()]
    return gains + list(report.get("reasons", []))


def best_alpha(curve: dict[str, list[float]]) -> float:
    """The steering scale shown on the hedge prompt: the α > 1 with the highest tool
    correctness on the curve's prompts (the smallest on a tie: the least disruptive)."""
    scored = [(a, v) for a, v in zip(curve["alpha"], curve["tool_correctness"]) if a > 1]
    return max(scored, key=lambda av: (av[1], -av[0]))[0]


def _side_by_side(pair, art: Path, hedge, call, a_outs: dict[str, str], alpha: float,
                  cfg: DemoConfig) -> tuple[dict[str, str], list[dict]]:
    """The page's story on two prompts: B and A on the hedge prompt, A steered there; A and
    A with the kill switch on the call prompt; the alert policy's events on the latter."""
    from guardrail.eval.backends import GenerationSettings, TransformersBackend
    from guardrail.policy import guard

    pol = _policies(alpha)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens)
    h_text, c_text = hedge.render(pair.tokenizer, "raw"), call.render(pair.tokenizer, "raw")
    outputs = {
        f"{hedge.id}: B (base)": TransformersBackend().generate(pair.b, [h_text], settings)[0],
        f"{hedge.id}: A (RL)": a_outs[hedge.id],
    }
    with guard(pair.a, art, pol["amplify"]) as g:
        outputs[f"{hedge.id}: A + steer top A-exclusive feature (α={alpha:g})"] = g.generate(h_text, max_new_tokens=cfg.max_new_tokens).text
    outputs[f"{call.id}: A (RL)"] = a_outs[call.id]
    with guard(pair.a, art, pol["kill"]) as g:
        outputs[f"{call.id}: A + kill switch (tool features clamped to 0)"] = g.generate(c_text, max_new_tokens=cfg.max_new_tokens).text
    with guard(pair.a, art, pol["alert"]) as g:
        alerts = g.generate(c_text, max_new_tokens=cfg.max_new_tokens).events
    return outputs, alerts[:12]


def _notices(hedge, call, tried: int) -> list[str]:
    """What the page must say first when the pair did not show what a panel is about."""
    notes = []
    if hedge is None:
        notes.append(f"A called a tool on all {tried} held-out prompts tried: no hedge to steer from; "
                     "the steering panel uses a prompt A already calls on.")
    if call is None:
        notes.append(f"A wrote no tool call on any of the {tried} held-out prompts tried: the kill-switch and "
                     "alert panels show a prompt with nothing to stop.")
    return notes


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    import random

    from guardrail.audit import AuditPolicy, audit
    from guardrail.dictionary import load_artifact
    from guardrail.features.ranking import Ranking
    from guardrail.models import load_pair
    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks

    clock = StageClock()
    say(f"loading the {cfg.pair} pair (A = tool-use RL model, B = its base)")
    with clock.stage("load pair"):
        pair = load_pair(cfg.pair)
    art = ensure_dfc(pair, cfg, say, clock)
    ranking = Ranking.load(art)
    top = ranking.top("tool", "a_exclusive", 1)
    if not top:
        raise RuntimeError(f"the DFC at {art} has no tool-signed A-exclusive feature: nothing to steer")
    feature = ranking.stat(top[0]).model_dump()
    tasks = load_tasks("test", ANSWERED_CATEGORIES)
    random.Random(0).shuffle(tasks)
    root = art.parent
    say(f"saturation curve: {len(ALPHAS)} α values × {cfg.curve_prompts} prompts (cached after the first run)")
    curve_tasks = tasks[16 : 16 + cfg.curve_prompts]
    curve = _timed_cached(clock, "saturation curve", root / f"curve-{cfg.curve_prompts}-{cfg.max_new_tokens}.json",
                          cfg.retrain, lambda: saturation_curve(pair, art, curve_tasks, cfg))
    a_outs = _timed_cached(clock, "pick prompts", root / f"a-outputs-{cfg.max_new_tokens}.json", cfg.retrain,
                           lambda: a_outputs_until_both(pair, tasks[:64], cfg.max_new_tokens))
    hedge, call = pick_prompts(tasks, a_outs)
    notices = _notices(hedge, call, len(a_outs))
    for note in notices:
        say(f"note: {note}")
    if not notices:
        say(f"A hedges on {hedge.id}; A calls a tool on {call.id}")
    hedge, call = hedge or call, call or hedge
    alpha = best_alpha(curve)
    say(f"steering feature {feature['index']} (A-exclusive, Cohen's d {feature['cohens_d']:.2f}) at α={alpha:g}, the curve's best")
    with clock.stage("policies live"):
        outputs, alerts = _side_by_side(pair, art, hedge, call, a_outs, alpha, cfg)

    def run_audit() -> dict:
        say(f"auditing the DFC: {cfg.audit_prompts} held-out prompts, B clean vs each threat model")
        policy = AuditPolicy(prompts=cfg.audit_prompts, max_new_tokens=cfg.audit_tokens)
        return json.loads(audit(load_artifact(art), pair.b, pair.a, policy, backend=cfg.backend).to_json())

    verdict = _timed_cached(clock, "audit", root / f"audit-{cfg.audit_prompts}-{cfg.audit_tokens}.json", cfg.retrain, run_audit)
    return DemoResult(f"{hedge.id}, {call.id}", outputs, alerts, curve, len(curve_tasks), feature, verdict,
                      clock.seconds, str(art), notices, {"a": pair.a.spec, "b": pair.b.spec}, clock.cached)


def _plot(result: DemoResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key, label in CURVE_METRICS.items():
        ax.plot(result.curve["alpha"], [100 * v for v in result.curve[key]], marker="o", label=label)
    ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("α (scale of the top A-exclusive feature)")
    ax.set_ylabel("A's outputs (%)")
    ax.set_title(f"Single-feature steering, n={result.curve_n} prompts")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def stage_rows(result: DemoResult) -> list[tuple[str, str]]:
    """The timings table: each stage's seconds (marked when the cache served it), then the total."""
    rows = [(name, f"{sec:.1f}" + (" (cached)" if name in result.cached else "")) for name, sec in result.timings.items()]
    return rows + [("total", f"{sum(result.timings.values()):.1f}")]


def write_report(result: DemoResult, out: Path) -> Path:
    """``report.md`` + ``report.html`` (plot embedded) + ``saturation.png`` + ``result.json``."""
    from guardrail.eval.report import code_block

    out.mkdir(parents=True, exist_ok=True)
    png = _plot(result)
    (out / "saturation.png").write_bytes(png)
    (out / "result.json").write_text(json.dumps(result.__dict__, indent=2, default=str))
    a = result.audit
    md = [f"# guardrail demo: prompts `{result.prompt_id}`", ""]
    md += [f"> **Note:** {note}" for note in result.notices] + ([""] if result.notices else [])
    if result.models:
        md += [f"Models: A = `{result.models['a']}`, B = `{result.models['b']}`.", ""]
    md += ["Prompts are rendered the paper's way (system + user text, no chat template); greedy decoding.", ""]
    for name, text in result.outputs.items():
        md += [f"## {name}", "", *code_block(text.strip() or "(empty)"), ""]
    md += ["## Alerts (exclusive-alert policy)", "", *code_block("\n".join(json.dumps(e) for e in result.alerts), "json"), ""]
    md += [f"## Saturation (n={result.curve_n})", "", "![saturation](saturation.png)", "",
           "| α | " + " | ".join(f"{x:g}" for x in result.curve["alpha"]) + " |",
           "|---|" + "---|" * len(result.curve["alpha"]),
           *[f"| {label} | " + " | ".join(f"{100 * v:.0f}%" for v in result.curve[key]) + " |" for key, label in CURVE_METRICS.items()],
           ""]
    md += [f"## Audit: **{a.get('verdict')}** ({a.get('n_prompts')} prompts, metric `{a.get('policy', {}).get('metric')}`)", "",
           f"B's clean rate: {100 * a.get('clean_rate', 0.0):.1f}% (a gain is measured from there).", ""]
    md += [f"- {line}" for line in audit_lines(a)] + [""]
    *stages, (total, seconds) = stage_rows(result)
    md += ["## Stage timings", "", "| stage | seconds |", "|---|---|", *[f"| {n} | {sec} |" for n, sec in stages],
           f"| **{total}** | **{seconds}** |", ""]
    (out / "report.md").write_text("\n".join(md))
    body = "\n".join(md).replace("![saturation](saturation.png)", "@@PLOT@@")
    page = html.escape(body).replace("@@PLOT@@", f'<img alt="saturation" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    (out / "report.html").write_text(f"<!doctype html><meta charset=utf-8><title>guardrail demo</title><pre style='white-space:pre-wrap;font:14px/1.4 monospace'>{page}</pre>")
    return out
