"""Sweep grids for the eval harness, scaled to the width of the model being evaluated.

The grids are the training layer's format (:mod:`guardrail.training.sweep`) plus one fact
that format does not carry: the width they were written for. A file here is either

    reference_d_model: 2048
    base_grid: paper            # a built-in grid of guardrail.training

or ``reference_d_model`` plus an inline ``grid:``. :func:`scaled_grid` multiplies every
``dict_size`` and ``k`` by ``d_model / reference_d_model`` (sizes rounded to a multiple of 8),
so the paper's expansion factors and active fraction carry over to a smaller model.
Training goes through the training layer's sweep runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from guardrail.training.sweep import Grid, RunSpec, expand_grid
from guardrail.training.sweep import load_grid as load_training_grid

GRID_DIR = Path(__file__).resolve().parent
BUILTIN = ("paper", "quick")


def load_eval_grid(name_or_path: str | Path) -> tuple[Grid, int | None]:
    """(grid, reference width) from a built-in eval grid name, an eval grid file, or a training grid."""
    path = GRID_DIR / f"{name_or_path}.yaml" if str(name_or_path) in BUILTIN else Path(name_or_path)
    if not path.exists():
        return load_training_grid(name_or_path), None  # a training-layer grid name: used unscaled
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep grid must be a mapping")
    if "groups" in raw:  # a plain training-layer grid file
        return load_training_grid(path), None
    ref = raw.get("reference_d_model")
    if "base_grid" in raw:
        grid = load_training_grid(raw["base_grid"])
    elif "grid" in raw:
        grid = Grid.model_validate(raw["grid"])
    else:
        raise ValueError(f"{path}: needs `base_grid: <name>` or an inline `grid:`")
    unknown = set(raw) - {"reference_d_model", "base_grid", "grid"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return grid, ref


def _scale_values(values: list[Any], f: float, key: str) -> list[Any]:
    if key == "dict_size":
        return [max(8, int(round(v * f / 8)) * 8) for v in values]
    return [max(1, int(round(v * f))) for v in values]


def scaled_grid(grid: Grid, d_model: int, reference_d_model: int | None) -> Grid:
    """The grid with ``dict_size`` and ``k`` scaled from ``reference_d_model`` to ``d_model``."""
    if not reference_d_model or reference_d_model == d_model:
        return grid
    f = d_model / reference_d_model
    data = grid.model_dump()
    data["name"] = f"{grid.name}@d{d_model}"
    for scope in [data["base"]] + [g["fixed"] for g in data["groups"]]:
        for key in ("dict_size", "k"):
            if key in scope:
                scope[key] = _scale_values([scope[key]], f, key)[0]
    for g in data["groups"]:
        for key in ("dict_size", "k"):
            if key in g["grid"]:
                g["grid"][key] = _scale_values(g["grid"][key], f, key)
    return Grid.model_validate(data)


def grid_for(name_or_path: str | Path, d_model: int) -> Grid:
    grid, ref = load_eval_grid(name_or_path)
    return scaled_grid(grid, d_model, ref)


def variants(name_or_path: str | Path, d_model: int, **training_overrides: Any) -> list[RunSpec]:
    """Every run of the (scaled) grid, training settings overridable (e.g. ``steps``)."""
    upd = {k: v for k, v in training_overrides.items() if v is not None}
    specs = expand_grid(grid_for(name_or_path, d_model))
    return [s.model_copy(update={"training": s.training.model_copy(update=upd)}) if upd else s for s in specs]


def kind(spec: RunSpec) -> str:
    return "dfc" if spec.crosscoder.is_dfc else "standard"


def main_trio(specs: list[RunSpec], exclusive: float = 0.05) -> dict[str, RunSpec]:
    """The experiments' main dictionaries, picked from the grid at its smallest (D, k):
    the free DFC (λ_excl = 0) at ``exclusive``, its penalised twin and the standard crosscoder
    (λ_sh > 0 preferred)."""
    def part(s: RunSpec) -> float:
        p = s.crosscoder.partition
        return p.n_a / p.dict_size if p is not None else 0.0

    dfcs = [s for s in specs if kind(s) == "dfc"]
    if not dfcs:
        raise ValueError("the grid has no DFC variant")
    dk = min((s.crosscoder.dict_size, s.crosscoder.k) for s in dfcs)
    at = [s for s in dfcs if (s.crosscoder.dict_size, s.crosscoder.k) == dk]
    share = min({round(part(s), 3) for s in at}, key=lambda p: abs(p - exclusive))
    at = [s for s in at if round(part(s), 3) == share]
    free = [s for s in at if s.crosscoder.lambda_excl == 0]
    pen = [s for s in at if s.crosscoder.lambda_excl > 0]
    std = sorted((s for s in specs if kind(s) == "standard" and (s.crosscoder.dict_size, s.crosscoder.k) == dk),
                 key=lambda s: s.crosscoder.lambda_shared == 0)
    if not free or not pen or not std:
        raise ValueError(f"the grid lacks a free DFC, a penalised DFC or a standard crosscoder at (D, k) = {dk}")
    return {"dfc": free[0], "dfc_penalised": pen[0], "standard": std[0]}
