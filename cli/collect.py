"""CLI: ``guardrail collect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from guardrail.cli.common import AdapterAOpt, ModelAOpt, ModelBOpt, PairOpt, load_pair_from


def collect_cmd(
    out: Path = typer.Option(..., "--out", help="Cache folder (resumed if it holds a partial run of the same collection)."),
    pair: Optional[str] = PairOpt,
    model_a: Optional[str] = ModelAOpt,
    model_b: Optional[str] = ModelBOpt,
    adapter_a: Optional[str] = AdapterAOpt,
    layer: Optional[int] = typer.Option(None, help="Decoder layer whose output is read (default: 36% depth, as layer 13/36 in the paper)."),
    positions: str = typer.Option("prompt", help="last_prompt | prompt | all"),
    last_n: Optional[int] = typer.Option(32, help="With --positions prompt: keep the last N prompt tokens (0 = all)."),
    tool: int = typer.Option(64, help="Tool prompts from the BFCL train split (0 = the whole split)."),
    plain: Optional[int] = typer.Option(None, help="Ordinary prompts (default: as many as tool prompts)."),
    mode: str = typer.Option("raw", help="Prompt rendering: raw (the paper's: no chat template) or chat."),
    batch_size: int = typer.Option(8, help="Prompts per forward pass."),
    seed: int = typer.Option(0, help="Seed for prompt sampling."),
) -> None:
    """Run A and B over tool and ordinary prompts; store paired residual activations."""
    from guardrail.activations import collect
    from guardrail.prompts import mixed
    from guardrail.residual import Site

    p = load_pair_from(pair, model_a, model_b, adapter_a)
    site = Site(layer=default_layer(p.n_layers) if layer is None else layer, positions=positions, last_n=last_n or None)
    prompts = mixed(tool or None, plain, split="train", mode=mode, tokenizer=p.tokenizer, seed=seed)
    cache = collect(p, prompts, site, out, batch_size=batch_size)
    m = cache.manifest
    typer.echo(f"collected {m.n_rows} rows from {m.n_prompts} prompts ({m.n_tool_prompts} tool) at layer {m.layer} into {out}")


def default_layer(n_layers: int) -> int:
    return min(n_layers - 1, round(13 / 36 * n_layers))


def register(app: typer.Typer) -> None:
    app.command("collect")(collect_cmd)
