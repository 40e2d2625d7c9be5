"""Options shared by several commands (model pair selection)."""

from __future__ import annotations

from typing import Optional

import typer

PairOpt = typer.Option(None, "--pair", help="Named pair: 'tiny' (random test pair) or 'organism' (embedded SmolLM2 pair).")
ModelAOpt = typer.Option(None, "--model-a", help="Model A (fine-tuned): local HF folder or hub id in the local cache.")
ModelBOpt = typer.Option(None, "--model-b", help="Model B (base): local HF folder or hub id in the local cache.")
AdapterAOpt = typer.Option(None, "--adapter-a", help="PEFT adapter folder merged into model A.")


def load_pair_from(pair: Optional[str], model_a: Optional[str], model_b: Optional[str], adapter_a: Optional[str] = None):
    """Resolve the pair options; ``--pair`` and ``--model-a/--model-b`` are exclusive."""
    from guardrail.models import load_pair

    if pair and (model_a or model_b):
        raise typer.BadParameter("give either --pair or --model-a/--model-b, not both")
    if pair:
        return load_pair(pair)
    if not (model_a and model_b):
        raise typer.BadParameter("give --pair NAME, or both --model-a and --model-b")
    return load_pair(a=model_a, b=model_b, adapter_a=adapter_a)
