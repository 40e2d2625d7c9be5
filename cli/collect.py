"""CLI: ``guardrail collect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from guardrail.cli.common import AdapterAOpt, ModelAOpt, ModelBOpt, PairOpt, load_pair_from
from guardrail.paper import paper_layer


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
    prompts_set: str = typer.Option(
        "mixed", "--prompts",
        help="mixed: tool + ordinary prompts (training, ranking); template-negatives: BFCL irrelevance + ordinary prompts "
             "under a tool list, no tool prompt (for guardrail rank --negatives-cache; --tool is not used)."),
    irrelevance: int = typer.Option(0, help="With --prompts template-negatives: irrelevance prompts (0 = the whole train split)."),
    max_length: int = typer.Option(1024, help="Prompt tokens kept (from the end: the last prompt token survives)."),
    batch_size: int = typer.Option(8, help="Prompts per forward pass (transformers; vLLM batches a whole shard itself)."),
    seed: int = typer.Option(0, help="Seed for prompt sampling."),
    engine: str = typer.Option("transformers", help="transformers (the reference) | vllm (needs vllm installed; a cache is resumed by the engine that began it)."),
    tensor_parallel_size: int = typer.Option(1, help="With --engine vllm: GPUs per engine (tensor parallel)."),
    data_parallel_size: int = typer.Option(1, help="With --engine vllm: passed to vllm.LLM as is (vLLM 0.32 refuses > 1 in one process)."),
) -> None:
    """Run A and B over tool and ordinary prompts (or template-matched negatives); store paired residual activations."""
    from guardrail.activations import collect, site_reader
    from guardrail.prompts import mixed, template_matched
    from guardrail.residual import Site

    if prompts_set not in ("mixed", "template-negatives"):
        raise typer.BadParameter(f"--prompts must be mixed or template-negatives, not {prompts_set!r}")
    if engine not in ("transformers", "vllm"):
        raise typer.BadParameter(f"--engine must be transformers or vllm, not {engine!r}")
    parallel = {k: v for k, v in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)) if v != 1}
    if parallel and engine != "vllm":
        raise typer.BadParameter("--tensor-parallel-size and --data-parallel-size need --engine vllm")

    p = load_pair_from(pair, model_a, model_b, adapter_a)
    site = Site(layer=paper_layer(p.n_layers) if layer is None else layer, positions=positions, last_n=last_n or None)
    if prompts_set == "mixed":
        prompts = mixed(tool or None, plain, split="train", mode=mode, tokenizer=p.tokenizer, seed=seed)
    else:
        prompts = template_matched(irrelevance or None, plain, split="train", mode=mode, tokenizer=p.tokenizer, seed=seed)
    cache = collect(p, prompts, site, out, batch_size=batch_size, max_length=max_length, engine=site_reader(engine, batch_size, **parallel))
    m = cache.manifest
    typer.echo(f"collected {m.n_rows} rows from {m.n_prompts} prompts ({m.n_tool_prompts} tool) at layer {m.layer} on {m.engine} into {out}")


def register(app: typer.Typer) -> None:
    app.command("collect")(collect_cmd)
