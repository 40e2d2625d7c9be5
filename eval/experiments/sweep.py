"""Sweep: N dictionaries from a grid, each spliced into A and B, and the paper's statistics.

Per variant: Δ_A and Δ_B (joint-encoding splice vs clean) of tool correctness, format
accuracy and overall score on the same prompts, plus the reconstruction MSE from training
(held-out rows, normalised space, as the paper's "train MSE"). Across variants:

* sign test on Δ_A tool correctness (paper: 45/47 positive);
* one-sample t of Δ_B tool correctness against 0 (paper: t = 9.6);
* Welch t of Δ_B (and Δ_A) between standard crosscoders and DFCs (paper: t = 1.63, p = 0.12);
* Pearson r of reconstruction MSE vs Δ_A with a Fisher-z interval (paper: r = +0.08 [−0.21, 0.36]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from guardrail.eval.experiments.common import RunContext
from guardrail.eval.experiments.splice import run_splice
from guardrail.eval.stats import one_sample_t, pearson, sign_test, welch_t
from guardrail.eval.suites import Suite


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


def run_sweep(ctx: RunContext, trained: Sequence[tuple[Any, Any]], suite: Suite, *, name: str = "sweep") -> dict[str, Any]:
    """Splice every trained variant into A and B (joint encoding) and test the sweep-level claims."""
    rows = []
    for variant, cc in trained:
        res = run_splice(ctx, cc, suite, name=f"{name}_{variant.name}", encodings=("joint",))
        row = {"name": variant.name, "kind": "dfc" if cc.is_dfc else "standard", "axes": variant.point, "mse": _mse(cc), "n_prompts": len(suite),
               "dictionary": res["dictionary"], "outputs": res["outputs"]}
        for m in ("A", "B"):
            d = res[f"{m}_recon_joint_delta"]
            for metric in ("tool_correctness", "format_accuracy", "overall_score"):
                row[f"d{m}_{metric}"] = d[metric]["delta"]
            row[f"{m}_clean_tool_correctness"] = d["tool_correctness"]["pre"]
            row[f"{m}_recon_tool_correctness"] = d["tool_correctness"]["post"]
        rows.append(row)
    return {"n_variants": len(rows), "n_prompts": len(suite), "variants": rows, "statistics": sweep_statistics(rows)}


def sweep_statistics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paper's sweep-level tests from per-variant rows (see the module docstring)."""
    dA = [r["dA_tool_correctness"] for r in rows]
    dB = [r["dB_tool_correctness"] for r in rows]
    out: dict[str, Any] = {
        "n_variants": len(rows),
        "dA_tool_sign_test": sign_test(dA),
        "dA_tool_mean": one_sample_t(dA),
        "dB_tool_one_sample_t": one_sample_t(dB),
        "dB_format_one_sample_t": one_sample_t([r["dB_format_accuracy"] for r in rows]),
    }
    std = [r for r in rows if r["kind"] == "standard"]
    dfc = [r for r in rows if r["kind"] == "dfc"]
    out["welch_dB_standard_vs_dfc"] = welch_t([r["dB_tool_correctness"] for r in std], [r["dB_tool_correctness"] for r in dfc])
    out["welch_dA_standard_vs_dfc"] = welch_t([r["dA_tool_correctness"] for r in std], [r["dA_tool_correctness"] for r in dfc])
    with_mse = [r for r in rows if r.get("mse") is not None]
    out["pearson_mse_vs_dA"] = pearson([r["mse"] for r in with_mse], [r["dA_tool_correctness"] for r in with_mse])
    return out
