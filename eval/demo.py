"""The product's story on one machine: one feature turns tool use on, one switch turns it off,
one alarm sees it coming, and the audit judges the artifact.

The measurements are :func:`guardrail.eval.phenomenon.run_phenomenon`'s (the code path and,
by default, the prompts of ``guardrail eval phenomenon``), so the numbers on the demo's page
are the eval's, with their n and intervals, and a demo after the eval reads them back. The demo adds what a user wants to watch:
the three policies running live through the guard on one prompt each (the outputs and the
alert events), the audit verdict, and what each stage took. Everything expensive is cached
under ``$GUARDRAIL_HOME`` (the DFC by its recipe, outputs by condition and prompts), so a
second run only runs the live policies.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import guardrail

# the audit the demo runs: the hedge protocol's rendering, lenient tool correctness, 64 tokens (the file says why)
AUDIT_POLICY = "audit/hedge.yaml"


@dataclass
class DemoConfig:
    pair: str = "organism"
    layer: int | None = None  # default: the paper's relative depth (layer 13 of 36)
    tool_prompts: int = 300  # train-split tool prompts per protocol for the DFC, as many ordinary ones
    dict_size: int | None = None  # None: the quick grid's (4 × d_model)
    steps: int = 600
    test_prompts: int | None = 150  # held-out prompts per measurement (as `guardrail eval phenomenon`: the same numbers)
    dev_prompts: int | None = None  # dev prompts that choose α and the alarm (None: all 102)
    max_new_tokens: int = 200  # the paper's
    audit_prompts: int | None = None  # None: the shipped audit policy's (AUDIT_POLICY)
    audit_tokens: int | None = None  # None: the shipped audit policy's
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
    phenomenon: dict  # run_phenomenon's results (the eval's numbers)
    live: dict[str, dict]  # policy name -> {"policy", "output", "events", "n_events"} from the guard
    audit: dict
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (StageClock)
    notices: list[str] = field(default_factory=list)  # what the pair did not show, first on the page
    cached: list[str] = field(default_factory=list)  # stages read back from an earlier run's cache


def policy_file(name: str) -> Path:
    """A shipped policy (``policies/`` in the source tree, ``guardrail.policies`` installed)."""
    return Path(str(resources.files("guardrail.policies") / name))


def audit_policy(cfg: DemoConfig):
    """The shipped audit policy (:data:`AUDIT_POLICY`), with the demo's sample size and token budget when given."""
    from guardrail.audit import AuditPolicy

    given = {k: v for k, v in (("prompts", cfg.audit_prompts), ("max_new_tokens", cfg.audit_tokens)) if v is not None}
    return AuditPolicy.model_validate(AuditPolicy.load(policy_file(AUDIT_POLICY)).model_dump() | given)


def phenomenon_config(cfg: DemoConfig):
    from guardrail.eval.phenomenon import PhenomenonConfig
    from guardrail.eval.phenomenon.artifact import DictionaryRecipe

    recipe = DictionaryRecipe(layer=cfg.layer, tool_prompts=cfg.tool_prompts, plain_prompts=cfg.tool_prompts,
                              dict_size=cfg.dict_size, steps=cfg.steps)
    return PhenomenonConfig(pair=cfg.pair, recipe=recipe, backend=cfg.backend, max_new_tokens=cfg.max_new_tokens,
                            test_prompts=cfg.test_prompts, dev_prompts=cfg.dev_prompts, irrelevance_prompts=cfg.dev_prompts,
                            ordinary_prompts=200 if cfg.test_prompts is None else min(200, 4 * cfg.test_prompts))


def live_policies(res: dict) -> dict[str, Any]:
    """The three shipped policies with the features and settings the measurement chose, by index."""
    from guardrail.policy import Policy

    def load(name: str, rule: dict, drop: tuple[str, ...] = ()) -> Policy:
        data = Policy.load(policy_file(name)).model_dump(mode="json", exclude_unset=True)
        data["rules"] = [{**{k: v for k, v in data["rules"][0].items() if k not in drop}, **rule}]
        return Policy.from_data(data, source=f"{name} (demo: features chosen by the measurement)")

    out: dict[str, Any] = {}
    if "not_measured" not in res["steer"]:
        s = res["steer"]
        how = {"alpha": s["strength"]} if s["mode"] == "scale" else {"gain": s["strength"], "positions": "all"}
        out["amplify"] = load("tool-use-amplify.yaml", {"select": {"indices": [s["feature"]]}, "mode": s["mode"], **how}, drop=("alpha", "gain"))
    if "not_measured" not in res["kill_switch"]:
        out["kill"] = load("tool-use-kill-switch.yaml", {"select": {"indices": res["kill_switch"]["features"]}})
    if "not_measured" not in res["alert"]:
        out["alert"] = load("exclusive-alert.yaml", {"select": {"indices": [res["alert"]["feature"]]}, "threshold": res["alert"]["threshold"],
                                                     "positions": "last_prompt"})
    return out


def live_prompts(pair, res: dict) -> dict[str, str]:
    """One prompt per policy: a hedge prompt the steer turned into a call, a prompt A calls on
    under deployment, and a hedge prompt A calls on (where the alarm should have fired first)."""
    from guardrail.eval.phenomenon.protocols import HEDGE, deployment
    from guardrail.tasks import ANSWERED_CATEGORIES, load_tasks

    tasks = {t.id: t for t in load_tasks("test", ANSWERED_CATEGORIES)}
    deploy = deployment(res["protocol"]["deployment"]["turn"])
    picks: dict[str, str] = {}
    if res["steer"].get("examples"):
        picks["amplify"] = HEDGE.render(tasks[res["steer"]["examples"][0]["id"]], pair.tokenizer)
    if res["kill_switch"].get("examples"):
        picks["kill"] = deploy.render(tasks[res["kill_switch"]["examples"][0]["id"]], pair.tokenizer)
    if res["alert"].get("example_call"):
        picks["alert"] = HEDGE.render(tasks[res["alert"]["example_call"]], pair.tokenizer)
    return picks


def run_live(pair, art: str, res: dict, max_new_tokens: int) -> dict[str, dict]:
    """Each chosen policy through the transformers guard on its prompt: the text and the events."""
    from guardrail.policy import guard

    prompts, out = live_prompts(pair, res), {}
    for name, policy in live_policies(res).items():
        if name not in prompts:
            continue
        with guard(pair.a, art, policy) as g:
            r = g.generate(prompts[name], max_new_tokens=max_new_tokens)
        out[name] = {"policy": policy.name, "output": r.text, "events": r.events[:6], "n_events": len(r.events)}
    return out


def notices(res: dict) -> list[str]:
    """What the page must say first: every bar the pair does not meet, with its numbers."""
    from guardrail.eval.phenomenon.report import criteria

    return [f"{c.claim}: {c.measured} (needs {c.bar})" for c in criteria(res) if not c.holds]


def _timed_cached(clock: StageClock, name: str, path: Path, refresh: bool, make: Callable[[], Any]) -> Any:
    """One stage whose JSON result is cached at ``path``: ``make()`` timed and stored, or read
    back on later runs (unless ``refresh``) and marked as served by the cache."""
    if path.exists() and not refresh:
        clock.mark_cached(name)
        return json.loads(path.read_text())
    with clock.stage(name):
        value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def audit_lines(report: dict) -> list[str]:
    """A's lead over B (the capability that could leak), the audit's power, the gains with
    their intervals, then its reasons (terminal and page alike)."""
    def interval(key: str) -> str:
        pp, ci = report.get(f"{key}_pp"), report.get(f"{key}_ci_pp")
        return "not measured" if pp is None else f"{pp:+.1f} pp, CI [{ci[0]:+.1f}, {ci[1]:+.1f}]"

    mde = report.get("mde_pp")
    control = report.get("positive_control_verdict")
    head = [f"capability gap A − B: {interval('capability_gap')}", f"oracle transplant (A's row in B): {interval('oracle_gain')}",
            "minimum detectable gain: " + ("none at this n" if mde is None else f"{mde:.1f} pp"),
            "self-check (a deliberately leaky copy must be proven to leak): " + ("not run" if control is None else f"{control}, {interval('positive_control_gain')}")]
    gains = [f"{k}: gain {100 * g['gain']:+.1f} pp, CI [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]" for k, g in report.get("gains", {}).items()]
    return head + gains + list(report.get("reasons", []))


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    from guardrail.audit import audit
    from guardrail.dictionary import load_artifact
    from guardrail.eval.phenomenon import run_phenomenon
    from guardrail.models import load_pair
    from guardrail.paths import shown

    clock = StageClock()
    say(f"loading the {cfg.pair} pair (A = tool-use RL model, B = its base)")
    with clock.stage("load pair"):
        pair = load_pair(cfg.pair)
    pcfg = phenomenon_config(cfg)
    if cfg.retrain:
        import shutil

        from guardrail.eval.phenomenon.run import artifact_root

        shutil.rmtree(artifact_root(pair, pcfg), ignore_errors=True)
    with clock.stage("measure (DFC, steer, kill switch, alarm)"):
        res = run_phenomenon(pcfg, say, pair=pair)
    art = res["artifact"]
    say("running the chosen policies live through the guard, one prompt each")
    with clock.stage("policies live"):
        live = run_live(pair, art, res, min(cfg.max_new_tokens, 96))

    policy = audit_policy(cfg)

    def run_audit() -> dict:
        say(f"auditing the DFC: {policy.prompts} held-out prompts, A and B clean, B under each threat model and the self-check")
        report = audit(load_artifact(art), pair.b, pair.a, policy, backend=cfg.backend)
        report.artifact["path"] = shown(art)
        return json.loads(report.to_json())

    # keyed by the whole audit policy and the package version: a report of another audit is never shown as this one's
    key = hashlib.sha256(f"{guardrail.__version__} {policy.model_dump_json()}".encode()).hexdigest()[:10]
    verdict = _timed_cached(clock, "audit", Path(art).parent / f"audit-{key}.json", cfg.retrain, run_audit)
    return DemoResult(res, live, verdict, clock.seconds, notices(res), clock.cached)


def stage_rows(result: DemoResult) -> list[tuple[str, str]]:
    """The timings table: each stage's seconds (marked when the cache served it), then the total."""
    rows = [(name, f"{sec:.1f}" + (" (cached)" if name in result.cached else "")) for name, sec in result.timings.items()]
    return rows + [("total", f"{sum(result.timings.values()):.1f}")]


def _shown(shown: int, total: int) -> str:
    """How the events line ends: the page keeps only the first few events, and says so."""
    return "." if not shown else ":" if shown == total else f", the first {shown}:"


def live_markdown(live: dict[str, dict]) -> list[str]:
    from guardrail.markdown import code_block

    titles = {"amplify": "A + the amplify policy (hedge prompt)", "kill": "A + the kill switch (deployment prompt)",
              "alert": "A + the alarm (hedge prompt where A calls)"}
    md = ["## Policies live", "", "Each chosen policy through the transformers guard on one held-out prompt.", ""]
    for name, run in live.items():
        md += [f"### {titles[name]}: `{run['policy']}`", "", *code_block(run["output"].strip() or "(empty)"),
               f"{run['n_events']} event(s)" + _shown(len(run["events"]), run["n_events"]), ""]
        if run["events"]:
            md += [*code_block("\n".join(json.dumps(e) for e in run["events"]), "json"), ""]
    return md


def write_report(result: DemoResult, out: Path) -> Path:
    """The phenomenon page (its figures, ``results.json``) with the live policies, the audit and the timings."""
    from guardrail.eval.phenomenon import report

    paths = report.write_report(result.phenomenon, out, extra=lambda: demo_sections(result))
    (out / "result.json").write_text(json.dumps({"live": result.live, "audit": result.audit, "timings": result.timings,
                                                 "cached": result.cached, "notices": result.notices}, indent=2, default=str))
    return paths["html"].parent


def demo_sections(result: DemoResult) -> list[str]:
    a = result.audit
    md = live_markdown(result.live)
    md += [f"## Audit: **{a.get('verdict')}** ({a.get('n_prompts')} prompts, metric `{a.get('policy', {}).get('metric')}`)", "",
           f"B's clean rate: {100 * a.get('clean_rate', 0.0):.1f}% (a gain is measured from there).", ""]
    md += [f"- {line}" for line in audit_lines(a)] + [""]
    *stages, (total, seconds) = stage_rows(result)
    md += ["## Stage timings", "", "| stage | seconds |", "|---|---|", *[f"| {n} | {sec} |" for n, sec in stages],
           f"| **{total}** | **{seconds}** |", ""]
    return md
