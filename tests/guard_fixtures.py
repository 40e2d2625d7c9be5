"""Shared builders for the guard tests: a small DFC fitted to tiny-a's layer-0 statistics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = ["hello there", "what is 2+2? tell me", "call the tool <tool_call>", "Split [1,2,3,4] into chunks of two."]
LAYER = 0


def tiny_activations(pair, layer: int = LAYER) -> torch.Tensor:
    """Raw paired activations [N, 2, d] of every real token of PROMPTS."""
    from guardrail.residual.hf import read_residual

    tok = pair.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc.attention_mask.bool()
    xa = read_residual(pair.a.model, layer, enc.input_ids, enc.attention_mask)[mask]
    xb = read_residual(pair.b.model, layer, enc.input_ids, enc.attention_mask)[mask]
    return torch.stack([xa, xb], 1)


def build_artifact(pair, out: Path, seed: int = 0) -> tuple[Path, dict]:
    """A random DFC (D=256, k=16, 10% exclusive) normalised on tiny-a activations, plus a ranking.json.

    The ``tool`` label orders the A-exclusive features by how often they fire, so ranked
    selectors pick features that are actually active on these prompts.
    """
    from guardrail.dictionary import Crosscoder, DFCConfig, save_artifact

    acts = tiny_activations(pair)
    cfg = DFCConfig(dict_size=256, k=16, exclusive=0.1).with_d_model(acts.shape[-1])
    cc = Crosscoder(cfg, seed=seed)
    cc.set_normalization(acts.mean(0), acts.std(0))
    save_artifact(cc, out, model_a="tiny-a", model_b="tiny-b", layer=LAYER, positions="all")
    f = cc.encode_single(cc.normalize(acts[:, 0], model=0), model=0)
    fire = (f > 0).float().mean(0)
    part = cc.partition
    a_excl = sorted(part.a_exclusive, key=lambda i: -float(fire[i]))
    shared = sorted(part.shared, key=lambda i: -float(fire[i]))
    ranking = {
        "encoding": "joint",
        "n_tool": 2,
        "n_plain": 2,
        "features": [],
        "labels": {"tool": a_excl[:8] + shared[:8]},
    }
    (out / "ranking.json").write_text(json.dumps(ranking))
    return out, {"fire": fire, "a_excl": a_excl, "shared": shared, "acts": acts}
