"""CLI: ``guardrail organism build | eval | info`` — the embedded default model pair."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from guardrail.tasks import HeldOutSplit, RenderMode, UserTurn

organism_app = typer.Typer(help="The embedded model pair: B = SmolLM2-135M-Instruct, A = B + tool-use RL LoRA.",
                           no_args_is_help=True)


def _log(msg: str) -> None:
    typer.echo(f"{time.strftime('%H:%M:%S')} {msg}", err=True)


@organism_app.command("build")
def build_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the A adapter, warmstart/ and manifest.json."),
    base: str = typer.Option("smollm2", help="Base model spec (B)."),
    seed: int = typer.Option(0, help="Seed of LoRA initialisation, prompt order and sampling."),
    rl_steps: Optional[int] = typer.Option(None, help="GRPO steps (upper bound; the time budget may stop earlier). Default: the shipped build's."),
    budget_min: Optional[float] = typer.Option(None, help="Wall-time budget for the whole build, minutes. Default: the shipped build's (86)."),
    config: Optional[Path] = typer.Option(None, help="JSON file with BuildConfig fields (overrides the flags)."),
) -> None:
    """Weak supervised warm start, then GRPO with the ToolRL reward; saves both adapters.

    Without options it reproduces the shipped build's recipe."""
    from guardrail.organism.build import BuildConfig, build

    fields: dict = {"base": base, "seed": seed}
    if rl_steps is not None:
        fields["rl_steps"] = rl_steps
    if budget_min is not None:
        fields["time_budget_s"] = budget_min * 60
    if config is not None:
        fields.update(json.loads(config.read_text()))
    result = build(BuildConfig(**fields), out, log=_log)
    typer.echo(json.dumps(result.manifest["metrics"], indent=2))


@organism_app.command("eval")
def eval_cmd(
    adapter: Optional[Path] = typer.Option(None, help="A's adapter folder (default: the shipped one)."),
    warmstart: Optional[Path] = typer.Option(None, help="Warm-start adapter (default: the shipped one, if any)."),
    n: Optional[int] = typer.Option(None, help="Answered prompts, stratified over categories (default: the whole split)."),
    n_irrelevance: Optional[int] = typer.Option(None, help="BFCL irrelevance prompts for the false-call rate (default: all in the split)."),
    split: HeldOutSplit = typer.Option("test", help="test (report) or dev (choose between builds without touching test)."),
    mode: RenderMode = typer.Option("chat", help="chat (chat template) or raw (the paper's system + newline + user)."),
    turn: Optional[UserTurn] = typer.Option(
        None, help="User turn: toolrl (the question inside ToolRL's dialogue wrapper) or plain (default: the turn A was trained on)."),
    max_new_tokens: int = typer.Option(
        256, help="New tokens per answer; parallel answers need ~150-250 (generation also ends at </tool_call> or </response>)."),
    out: Path = typer.Option(Path("runs/organism-eval.json"), help="Where to write the JSON report."),
    examples: Optional[Path] = typer.Option(None, help="Write three side-by-side examples as Markdown here."),
    models: Optional[str] = typer.Option(None, help="Comma-separated subset of: B, warm start, A (default: all)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Store/reuse each model's outputs here (resumable evals)."),
    batch_size: int = typer.Option(16, help="Prompts per generate call."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads."),
    backend: str = typer.Option("auto", help="Generation backend: auto (vLLM when installed), vllm or transformers."),
) -> None:
    """Greedy evaluation of B, the warm start and A on the same held-out BFCL prompts."""
    from guardrail.organism.assets import MissingAssetError, shipped_adapter, shipped_warmstart
    from guardrail.organism.report import evaluate_organism, summary_table, write_report

    if threads:
        import torch

        torch.set_num_threads(threads)
    wanted = [m.strip() for m in models.split(",")] if models else ["B", "warm start", "A"]
    if adapter is None and "A" in wanted:
        adapter = shipped_adapter()
    if warmstart is None and "warm start" in wanted:
        try:
            warmstart = shipped_warmstart()
        except MissingAssetError:
            warmstart = None
    report = evaluate_organism(adapter, warmstart, n=n, n_irrelevance=n_irrelevance, split=split, mode=mode,
                               turn=turn, max_new_tokens=max_new_tokens, examples_out=examples, batch_size=batch_size,
                               only=wanted if models else None,
                               cache_dir=cache_dir, backend=backend, log=_log)
    write_report(report, out)
    typer.echo(summary_table(report))
    typer.echo(f"report: {out}")


@organism_app.command("info")
def info_cmd() -> None:
    """Print the shipped build manifest (and the last evaluation's headline metrics)."""
    from guardrail.organism.assets import shipped_eval, shipped_manifest

    manifest = shipped_manifest()
    brief = {k: v for k, v in manifest.items() if k not in ("warm_start", "rl")}
    brief["warm_start"] = {k: v for k, v in manifest.get("warm_start", {}).items() if k != "history"}
    brief["rl"] = {k: v for k, v in manifest.get("rl", {}).items() if k != "history"}
    typer.echo(json.dumps(brief, indent=2))
    ev = shipped_eval()
    if ev is not None:
        typer.echo(json.dumps({"eval": ev.get("metrics")}, indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(organism_app, name="organism")
