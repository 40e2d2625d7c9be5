"""What every experiment shares: the pair, the backend, cached activations and outputs.

A :class:`RunContext` caches per suite the last-prompt-token activations of A and B and
per (model, prompt, patch) the generated text, so an intervention that leaves a row's
activation exactly unchanged (α = 1, a feature that did not fire, a B-exclusive feature on
A's decoder) reuses the clean output instead of decoding again — identical by
construction, since greedy decoding of the same activations gives the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from guardrail.generation import Backend, GenerationSettings
from guardrail.residual.last_token import last_token_activations
from guardrail.eval.scoring import aggregate, metric_vector, score_all, write_jsonl
from guardrail.eval.stats import delta_summary
from guardrail.eval.suites import Suite

MODEL_NAMES = ("A", "B")
HEADLINE_METRICS = ("tool_correctness", "format_accuracy", "overall_score", "name_correct", "args_correct")


def _patch_key(vec: torch.Tensor | None) -> str:
    if vec is None:
        return "clean"
    return hashlib.sha1(vec.detach().float().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class RunContext:
    """Everything an experiment needs to generate, score and save."""

    pair: Any
    backend: Backend
    settings: GenerationSettings
    layer: int
    out_dir: Path
    seed: int = 0
    n_boot: int = 1000
    progress: bool = True
    _acts: dict[str, torch.Tensor] = field(default_factory=dict)
    _texts: dict[tuple[int, str, str], str] = field(default_factory=dict)
    n_generated: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def model(self, m: int) -> Any:
        return self.pair.a if m == 0 else self.pair.b

    def acts(self, suite: Suite) -> torch.Tensor:
        """Raw ``[N, 2, d]`` last-prompt-token activations of the suite (cached)."""
        key = suite.digest()
        if key not in self._acts:
            self._acts[key] = last_token_activations(self.pair, suite.texts, self.layer, batch_size=self.settings.batch_size,
                                                     max_prompt_tokens=self.settings.max_prompt_tokens)
        return self._acts[key]

    def generate(self, m: int, suite: Suite, patches: Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """Outputs of model ``m`` on the suite, each prompt optionally patched (cached by patch value).

        A patch equal to the row's own activation is the identity and maps to the clean output.
        """
        items = suite.items
        if patches is None:
            patches = [None] * len(items)
        acts = self.acts(suite)[:, m] if any(p is not None for p in patches) else None
        keys = []
        for i, p in enumerate(patches):
            if p is not None and acts is not None and torch.equal(p.float(), acts[i]):
                p = None
            keys.append((m, items[i].id, _patch_key(p)))
        todo = [i for i, k in enumerate(keys) if k not in self._texts]
        if todo:
            sub = [items[i].text for i in todo]
            sub_patches = [patches[i] if keys[i][2] != "clean" else None for i in todo]
            texts = self.backend.generate(self.model(m), sub, self.settings, layer=self.layer,
                                          patches=sub_patches if any(p is not None for p in sub_patches) else None)
            self.n_generated += len(todo)
            for i, t in zip(todo, texts):
                self._texts[keys[i]] = t
        return [self._texts[k] for k in keys]

    def clean_records(self, m: int, suite: Suite, experiment: str) -> list[dict[str, Any]]:
        return score_all(suite.items, self.generate(m, suite), experiment=experiment, model=MODEL_NAMES[m], condition="clean")

    def save(self, name: str, records: list[dict[str, Any]]) -> Path:
        return write_jsonl(self.out_dir / "outputs" / f"{name}.jsonl", records)


def compare(post: list[dict[str, Any]], pre: list[dict[str, Any]], seed: int = 0, n_boot: int = 1000,
            metrics: Sequence[str] = HEADLINE_METRICS) -> dict[str, Any]:
    """Paired deltas (post − pre) of every headline metric, with t and bootstrap intervals and n."""
    if [r["id"] for r in post] != [r["id"] for r in pre]:
        raise ValueError("compare() needs records of the same prompts in the same order")
    return {k: delta_summary(metric_vector(post, k), metric_vector(pre, k), seed=seed, n_boot=n_boot) for k in metrics}


def condition_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    return aggregate(records)


@torch.no_grad()
def dictionary_health(cc: Any, acts: torch.Tensor | None = None, is_tool: torch.Tensor | None = None) -> dict[str, Any]:
    """Per-partition dead fraction and fire rates of a dictionary (shown beside every figure).

    From the artifact's training metrics when present (held-out rows of the training data)
    and, given ``acts`` (raw ``[N, 2, d]`` last-token rows), on the evaluation prompts too,
    split into tool and ordinary prompts.
    """
    from guardrail.features.ranking import encode_rows

    out: dict[str, Any] = {"kind": "dfc" if cc.is_dfc else "standard", "dict_size": int(cc.dict_size),
                           "k": cc.config.k, "partition": cc.partition.sizes()}
    manifest = getattr(cc, "manifest", None)
    metrics = getattr(cc, "metrics", None) or (getattr(manifest, "metrics", None) if manifest is not None else None)
    if metrics:
        out["training"] = {
            "mse": metrics.get("mse"), "fvu_A": metrics.get("fvu_A"), "fvu_B": metrics.get("fvu_B"), "l0": metrics.get("l0"),
            "partitions": metrics.get("partitions"), "train_dead_fraction": metrics.get("train_dead_fraction"),
        }
    if acts is not None and len(acts):
        f = encode_rows(cc, acts)
        groups = {"all": torch.ones(len(acts), dtype=torch.bool)}
        if is_tool is not None:
            groups.update(tool=is_tool.bool(), plain=~is_tool.bool())
        per: dict[str, Any] = {}
        for name in ("a_exclusive", "b_exclusive", "shared"):
            r = cc.partition.range(name)
            if len(r) == 0:
                continue
            cols = f[:, r.start : r.stop] > 0
            entry: dict[str, Any] = {"size": len(r)}
            for g, mask in groups.items():
                if mask.any():
                    c = cols[mask]
                    entry[f"fire_rate_{g}"] = float(c.float().mean())
                    entry[f"dead_fraction_{g}"] = float((~c.any(0)).float().mean())
            per[name] = entry
        out["eval"] = {"n_prompts": int(len(acts)), "partitions": per}
    return out
