"""Sweep: N dictionaries from a grid, each spliced into A and B, and the paper's statistics.

Per variant: Δ_A and Δ_B (joint-encoding splice vs clean) of tool correctness, format
accuracy and overall score on the same prompts, plus the reconstruction MSE from training
(held-out rows, normalised space, as the paper's "train MSE").

The paper tests across variants as if they were independent samples (sign test 45/47,
one-sample t of Δ_B, Welch t standard vs DFC, Pearson r of MSE vs Δ_A with a Fisher
interval). Here every variant is scored on the *same* prompts, so variants are not
independent: a prompt that one splice fixes tends to be fixed by all. Across variants this
module therefore reports

* the sign counts of Δ_A, without a p (the sign test's p assumes independence);
* a clean-label permutation test over prompts of the mean Δ_A and Δ_B;
* the standard-minus-DFC difference of mean Δ_B and Pearson r of MSE vs Δ_A, each with a
  prompt bootstrap interval (every variant re-scored on the same resampled prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from guardrail.eval.experiments.common import RunContext
from guardrail.eval.experiments.splice import run_splice
from guardrail.eval.scoring import read_jsonl
from guardrail.eval.stats import clean_label_permutation, pearson, prompt_bootstrap, sign_test
from guardrail.eval.suites import Suite

INDEPENDENCE_NOTE = ("variants are scored on the same prompts, so they are not independent samples: tests across them "
                     "permute or resample prompts, and the sign test gives counts without a p")


def train_variants(grid: Any, data: Any, out_dir: str | Path, *, names: Sequence[str] | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = False) -> list[tuple[Any, Any]]:
    """Train a grid's runs into ``out_dir/<run name>`` (finished artifacts are reused); returns (spec, dictionary).

    The whole grid goes through the training layer's sweep runner; a subset (``names``)
    is trained run by run with the same trainer and settings.
    """
    from guardrail.dictionary import load_artifact
    from guardrail.training import train
    from guardrail.training.sweep import expand_grid, run_sweep as train_sweep

    out = Path(out_dir)
    specs = expand_grid(grid)
    if names is None:
        train_sweep(grid, data, out, overrides=overrides, progress=progress)
    else:
        missing = set(names) - {s.name for s in specs}
        if missing:
            raise ValueError(f"grid {grid.name} has no runs named {sorted(missing)}")
        specs = [s for s in specs if s.name in set(names)]
        for spec in specs:
            folder = out / spec.name
            if (folder / "manifest.json").exists():
                continue
            tc = spec.training.model_copy(update={**(overrides or {}), "progress": progress})
            train(data, spec.crosscoder, folder, training=tc, manifest_fields={"source": {"kind": "trained", "notes": [f"eval grid {grid.name}, run {spec.name}"]}})
    return [(spec, load_artifact(out / spec.name)) for spec in specs]


def _mse(cc: Any) -> float | None:
    metrics = getattr(cc, "metrics", None) or getattr(getattr(cc, "manifest", None), "metrics", None) or {}
    return metrics.get("mse")


@dataclass(frozen=True)
class SweepOutcomes:
    """Per-prompt tool correctness (0/1) on the prompts every variant shares.

    ``clean_*`` is ``[P]`` (the clean model does not depend on the variant), ``recon_*`` is
    ``[V, P]`` in the order of the sweep's variants.
    """

    clean_a: list[float]
    clean_b: list[float]
    recon_a: list[list[float]]
    recon_b: list[list[float]]


def _outcomes(ctx: RunContext, results: Sequence[dict[str, Any]], ids: Sequence[str], metric: str = "tool_correctness") -> SweepOutcomes:
    """Read each variant's per-prompt records back from its JSONL, aligned to ``ids``."""
    clean: dict[str, list[float]] = {}
    recon: dict[str, list[list[float]]] = {"A": [], "B": []}
    for res in results:
        rows = read_jsonl(ctx.out_dir / res["outputs"])
        for m in ("A", "B"):
            by = {(r["condition"], r["id"]): float(r[metric]) for r in rows if r["model"] == m}
            clean.setdefault(m, [by[("clean", i)] for i in ids])
            recon[m].append([by[("recon_joint", i)] for i in ids])
    return SweepOutcomes(clean.get("A", []), clean.get("B", []), recon["A"], recon["B"])


def run_sweep(ctx: RunContext, trained: Sequence[tuple[Any, Any]], suite: Suite, *, name: str = "sweep") -> dict[str, Any]:
    """Splice every trained variant into A and B (joint encoding) and test the sweep-level claims."""
    rows, results = [], []
    for variant, cc in trained:
        res = run_splice(ctx, cc, suite, name=f"{name}_{variant.name}", encodings=("joint",))
        results.append(res)
        row = {"name": variant.name, "kind": "dfc" if cc.is_dfc else "standard", "axes": variant.point, "mse": _mse(cc), "n_prompts": len(suite),
               "dictionary": res["dictionary"], "outputs": res["outputs"]}
        for m in ("A", "B"):
            d = res[f"{m}_recon_joint_delta"]
            for metric in ("tool_correctness", "format_accuracy", "overall_score"):
                row[f"d{m}_{metric}"] = d[metric]["delta"]
            row[f"{m}_clean_tool_correctness"] = d["tool_correctness"]["pre"]
            row[f"{m}_recon_tool_correctness"] = d["tool_correctness"]["post"]
        rows.append(row)
    outcomes = _outcomes(ctx, results, [i.id for i in suite.items]) if results else None
    stats = sweep_statistics(rows, outcomes, seed=ctx.seed, n_boot=ctx.n_boot)
    return {"n_variants": len(rows), "n_prompts": len(suite), "variants": rows, "statistics": stats}


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _group_difference(outcomes: SweepOutcomes, kinds: Sequence[str]) -> Any:
    """Statistic for the prompt bootstrap: mean Δ_B of standard variants minus that of DFC variants."""
    clean, recon = np.asarray(outcomes.clean_b), np.asarray(outcomes.recon_b)
    std, dfc = [i for i, k in enumerate(kinds) if k == "standard"], [i for i, k in enumerate(kinds) if k == "dfc"]

    def stat(idx: np.ndarray) -> float | None:
        if not std or not dfc:
            return None
        d = recon[:, idx].mean(axis=1) - clean[idx].mean()
        return float(d[std].mean() - d[dfc].mean())

    return stat


def _mse_correlation(outcomes: SweepOutcomes, mse: Sequence[float | None]) -> Any:
    """Statistic for the prompt bootstrap: Pearson r of MSE vs Δ_A over the variants with an MSE."""
    keep = [i for i, m in enumerate(mse) if m is not None]
    clean, recon, x = np.asarray(outcomes.clean_a), np.asarray(outcomes.recon_a)[keep], np.asarray([mse[i] for i in keep])

    def stat(idx: np.ndarray) -> float | None:
        d = recon[:, idx].mean(axis=1) - clean[idx].mean()
        return pearson(x, d)["r"] if len(keep) >= 3 else None

    return stat


def sweep_statistics(rows: Sequence[dict[str, Any]], outcomes: SweepOutcomes | None = None, *, seed: int = 0,
                     n_perm: int = 10000, n_boot: int = 1000) -> dict[str, Any]:
    """The sweep-level claims from per-variant rows and, when given, per-prompt outcomes (see the module docstring).

    Without per-prompt outcomes only descriptive numbers are given: a test across variants
    needs the prompts they share.
    """
    dA = [r["dA_tool_correctness"] for r in rows]
    dB = [r["dB_tool_correctness"] for r in rows]
    sign = {**sign_test(dA), "p": None, "note": "counts only: " + INDEPENDENCE_NOTE}
    std = [r["dB_tool_correctness"] for r in rows if r["kind"] == "standard"]
    dfc = [r["dB_tool_correctness"] for r in rows if r["kind"] == "dfc"]
    mse = [r.get("mse") for r in rows]
    descr = pearson([m for m in mse if m is not None], [d for d, m in zip(dA, mse) if m is not None])
    out: dict[str, Any] = {
        "n_variants": len(rows), "independence": INDEPENDENCE_NOTE,
        "dA_tool_sign_test": sign,
        "dA_tool_mean": _mean(dA), "dB_tool_mean": _mean(dB), "dB_format_mean": _mean([r["dB_format_accuracy"] for r in rows]),
        "dB_standard_vs_dfc": {"n": [len(std), len(dfc)], "mean_standard": _mean(std), "mean_dfc": _mean(dfc), "bootstrap": None},
        "pearson_mse_vs_dA": {"n": descr["n"], "r": descr["r"], "undefined": descr["undefined"], "bootstrap": None},
        "dA_tool_permutation": None, "dB_tool_permutation": None,
    }
    if outcomes is None or not rows:
        return out
    n_p = len(outcomes.clean_a)
    out["dA_tool_permutation"] = clean_label_permutation(outcomes.clean_a, outcomes.recon_a, alternative="greater", n_perm=n_perm, seed=seed)
    out["dB_tool_permutation"] = clean_label_permutation(outcomes.clean_b, outcomes.recon_b, alternative="greater", n_perm=n_perm, seed=seed)
    kinds = [r["kind"] for r in rows]
    out["dB_standard_vs_dfc"]["bootstrap"] = prompt_bootstrap(_group_difference(outcomes, kinds), n_p, n_boot=n_boot, seed=seed)
    out["pearson_mse_vs_dA"]["bootstrap"] = prompt_bootstrap(_mse_correlation(outcomes, mse), n_p, n_boot=n_boot, seed=seed)
    return out
