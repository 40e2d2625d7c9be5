"""Evaluate B, the warm start and A on the same held-out prompts and write the report."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from guardrail.fileio import sha256_file
from guardrail.organism.evaluate import EvalResult, evaluate, examples_markdown, score_outputs
from guardrail.tasks import ANSWERED_CATEGORIES, HeldOutSplit, load_tasks, split_hash
from guardrail.tasks.task import RenderMode, ToolTask, UserTurn

Log = Callable[[str], None]


def pick_tasks(n: int | None, n_irrelevance: int | None, split: str = "test", seed: int = 0) -> list[ToolTask]:
    """A deterministic, category-stratified sample of ``n`` answered + ``n_irrelevance``
    tasks (``None``: all of them, the whole split)."""
    answered = load_tasks(split, ANSWERED_CATEGORIES)  # type: ignore[arg-type]
    irrelevant = load_tasks(split, ["irrelevance"])  # type: ignore[arg-type]
    n = len(answered) if n is None else n
    n_irrelevance = len(irrelevant) if n_irrelevance is None else n_irrelevance
    rng = random.Random(seed)
    by_cat = _group_by_category(answered)
    for v in by_cat.values():
        rng.shuffle(v)
    picked: list[ToolTask] = []
    depth = 0
    while len(picked) < min(n, len(answered)):
        for cat in ANSWERED_CATEGORIES:
            if depth < len(by_cat.get(cat, [])) and len(picked) < n:
                picked.append(by_cat[cat][depth])
        depth += 1
    rng.shuffle(irrelevant)
    return picked + irrelevant[:n_irrelevance]


def _variants(adapter: str | Path | None, warmstart: str | Path | None,
              only: list[str] | None) -> list[tuple[str, str | Path | None]]:
    """(label, adapter) of each model to evaluate: B always, the warm start and A when given."""
    variants: list[tuple[str, str | Path | None]] = [("B", None)]
    if warmstart is not None:
        variants.append(("warm start", warmstart))
    if adapter is not None:
        variants.append(("A", adapter))
    if only is None:
        return variants
    unknown = set(only) - {label for label, _ in variants}
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {[label for label, _ in variants]}")
    return [v for v in variants if v[0] in only]


def evaluate_organism(
    adapter: str | Path | None,
    warmstart: str | Path | None,
    *,
    base: str = "smollm2",
    n: int | None = None,
    n_irrelevance: int | None = None,
    split: HeldOutSplit = "test",
    mode: RenderMode = "chat",
    turn: UserTurn | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    examples_out: str | Path | None = None,
    only: list[str] | None = None,
    cache_dir: str | Path | None = None,
    backend: str = "auto",
    log: Log = print,
) -> dict:
    """Metrics of B, warm start (if given) and A on the same held-out prompts, as one dict.

    ``split="dev"`` is for choosing between builds, so that the test split stays a
    measurement of the one that was chosen and not part of the choice.

    ``turn`` is the user turn of every prompt; by default the one A was trained on (read
    from its build manifest; the shipped A's when no adapter is given), so that A is
    measured where it was trained and B on exactly the same prompts.

    ``only`` restricts the models (labels "B", "warm start", "A"). With ``cache_dir``,
    each model's outputs are stored there and reused when the same prompts, rendering
    and token budget are asked for again (so B can be evaluated while A is still training).
    """
    if split not in get_args(HeldOutSplit):
        raise ValueError(f"evaluate on the held-out 'dev' or 'test' split, not {split!r} (A was trained on 'train')")
    from guardrail.organism.assets import trained_turn

    tasks = pick_tasks(n, n_irrelevance, split=split)
    turn = trained_turn(adapter) if turn is None else turn
    gen = dict(mode=mode, turn=turn, max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, backend=backend)
    results: list[EvalResult] = []
    for label, adp in _variants(adapter, warmstart, only):
        res = _evaluate_variant(label, adp, tasks, base=base, cache_dir=cache_dir, log=log, **gen)
        log(f"[eval] {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.metrics.items() if isinstance(v, float)))
        results.append(res)
    by = {r.model: r.metrics for r in results}
    report = {
        "split": split,
        "split_hash": split_hash(),
        "mode": mode,
        "user_turn": turn,
        "greedy": True,
        "max_new_tokens": max_new_tokens,
        "task_ids": [t.id for t in tasks],
        "metrics": by,
        "by_category": {r.model: by_category(tasks, r.outputs) for r in results},
        "outputs": {r.model: r.outputs for r in results},
    }
    if "warm start" in by and "A" in by and "format_accuracy" in by["warm start"]:
        report["format_gain_A_over_warmstart_pp"] = 100 * (by["A"]["format_accuracy"] - by["warm start"]["format_accuracy"])
    if examples_out is not None:
        Path(examples_out).parent.mkdir(parents=True, exist_ok=True)
        Path(examples_out).write_text(examples_markdown(tasks, results, n=3, mode=mode, turn=turn))
    return report


def _evaluate_variant(label: str, adp: str | Path | None, tasks: list[ToolTask], *, base: str, cache_dir: str | Path | None,
                      log: Log, mode: RenderMode, turn: UserTurn, max_new_tokens: int, batch_size: int, max_prompt_tokens: int | None,
                      backend: str) -> EvalResult:
    """One model's scored outputs: from the cache when the same model, prompts and budget were run before."""
    from guardrail.models import load_model

    key = {"model": label, "base": base, "adapter": _adapter_digest(adp), "mode": mode, "turn": turn,
           "max_new_tokens": max_new_tokens, "task_ids": [t.id for t in tasks], "backend": backend}
    cached = _cached(cache_dir, key)
    if cached is not None:
        log(f"[eval] {label}: reusing cached outputs")
        outputs = cached["outputs"]
        res = EvalResult(label, mode, score_outputs(tasks, [outputs[t.id] for t in tasks]), outputs)
        res.metrics["seconds"] = cached["seconds"]
        return res
    loaded = load_model(base, adapter=adp)
    if adp is not None:  # a merged model gets its own name (vLLM loads it from its own folder)
        loaded.spec = f"{base}+{label.replace(' ', '-')}@{key['adapter'][:12]}"
    t0 = time.time()
    res = evaluate(
        loaded, tasks, name=label, mode=mode, turn=turn, max_new_tokens=max_new_tokens,
        batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, backend=backend,
        progress=lambda d, tot, s: log(f"[eval] {label}: {d}/{tot} prompts ({s:.0f}s)"),
    )
    res.metrics["seconds"] = time.time() - t0
    _store(cache_dir, key, res)
    return res


def by_category(tasks: list[ToolTask], outputs: dict[str, str]) -> dict[str, dict[str, float]]:
    """``score_outputs`` per BFCL category: a headline mean hides that parallel tasks need
    several calls in one block while simple ones need one."""
    return {c: score_outputs(ts, [outputs[t.id] for t in ts]) for c, ts in _group_by_category(tasks).items()}


def _group_by_category(tasks: list[ToolTask]) -> dict[str, list[ToolTask]]:
    groups: dict[str, list[ToolTask]] = {}
    for t in tasks:
        groups.setdefault(t.category, []).append(t)
    return groups


def _adapter_digest(adapter: str | Path | None) -> str | None:
    if adapter is None:
        return None
    weights = Path(adapter) / "adapter_model.safetensors"
    return sha256_file(weights) if weights.exists() else str(adapter)


def _cache_file(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model'].replace(' ', '_')}-{digest}.json"


def _cached(cache_dir: str | Path | None, key: dict) -> dict | None:
    if cache_dir is None:
        return None
    path = _cache_file(cache_dir, key)
    return json.loads(path.read_text()) if path.exists() else None


def _store(cache_dir: str | Path | None, key: dict, res: EvalResult) -> None:
    if cache_dir is None:
        return
    path = _cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "outputs": res.outputs, "seconds": res.metrics["seconds"]}))


def summary_table(report: dict) -> str:
    """Markdown tables: the headline metrics per model, then strict name accuracy and call count per category."""
    keys = ["format_accuracy", "tool_correctness", "name_accuracy", "args_accuracy", "valid_json", "reward",
            "overall_score", "false_call_rate"]
    models = list(report["metrics"])
    lines = _table("metric", models, [(k, [report["metrics"][m].get(k) for m in models]) for k in keys])
    per_cat = report.get("by_category") or {}
    cats = [c for c in ANSWERED_CATEGORIES if all(c in per_cat.get(m, {}) for m in models)]
    if cats:
        for key in ("name_accuracy", "call_count_accuracy"):
            rows = [(f"{c} (n={per_cat[models[0]][c]['n']})", [per_cat[m][c].get(key) for m in models]) for c in cats]
            lines += ["", *_table(f"{key} by category", models, rows)]
    return "\n".join(lines)


def _table(head: str, models: list[str], rows: list[tuple[str, list]]) -> list[str]:
    lines = [f"| {head} | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + " |")
    return lines


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path
