"""Sweep grids (YAML): the paper's 48-variant grid and a quick CPU grid, scaled to the model width."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from guardrail.dictionary import CrosscoderConfig, DFCConfig
from guardrail.training import TrainingConfig

GRID_DIR = Path(__file__).resolve().parent
BUILTIN = ("paper", "quick")


class GridSpec(BaseModel):
    """Axes of a sweep. Every DFC cell is D × k × exclusive × λ_excl; standard crosscoders are D × k × λ_sh."""

    model_config = ConfigDict(extra="forbid")

    name: str
    reference_d_model: int = Field(2048, gt=0)
    scale_with_width: bool = True
    dict_size: list[int]
    k: list[int]
    exclusive: list[float] = []
    lambda_excl: list[float] = [0.0]
    lambda_shared: float = 0.0
    standard_lambda_shared: list[float] = []
    training: dict[str, Any] = {}


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    kind: str  # "dfc" | "standard"
    config: CrosscoderConfig
    training: TrainingConfig
    axes: dict[str, Any]


def load_grid(name_or_path: str | Path) -> GridSpec:
    """A built-in grid by name (``paper``, ``quick``) or a YAML file."""
    path = GRID_DIR / f"{name_or_path}.yaml" if str(name_or_path) in BUILTIN else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no sweep grid {name_or_path!r}: give one of {BUILTIN} or a YAML file")
    try:
        return GridSpec.model_validate(yaml.safe_load(path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{path}: invalid sweep grid: {exc}") from exc


def _scaled(spec: GridSpec, d_model: int, d: int, k: int) -> tuple[int, int]:
    if not spec.scale_with_width:
        return d, k
    f = d_model / spec.reference_d_model
    size = max(8, int(round(d * f / 8)) * 8)
    return size, max(1, min(size, int(round(k * f))))


def expand(spec: GridSpec, d_model: int, **training_overrides: Any) -> list[Variant]:
    """Every variant of the grid at width ``d_model`` (training settings overridable)."""
    tc = TrainingConfig(**{**spec.training, **{k: v for k, v in training_overrides.items() if v is not None}})
    out: list[Variant] = []
    for d, k in itertools.product(spec.dict_size, spec.k):
        size, kk = _scaled(spec, d_model, d, k)
        for p, lam in itertools.product(spec.exclusive, spec.lambda_excl):
            cfg = DFCConfig(size, kk, p, lambda_shared=spec.lambda_shared, lambda_excl=lam)
            axes = {"dict_size": size, "k": kk, "exclusive": p, "lambda_excl": lam, "lambda_shared": spec.lambda_shared, "paper_D": d, "paper_k": k}
            out.append(Variant(name=f"dfc-D{size}-k{kk}-excl{int(round(p * 100))}-{'free' if lam == 0 else 'pen'}", kind="dfc", config=cfg, training=tc, axes=axes))
        for lsh in spec.standard_lambda_shared:
            cfg = CrosscoderConfig(dict_size=size, k=kk, lambda_shared=lsh)
            axes = {"dict_size": size, "k": kk, "lambda_shared": lsh, "paper_D": d, "paper_k": k}
            out.append(Variant(name=f"cc-D{size}-k{kk}{'' if lsh else '-nol1'}", kind="standard", config=cfg, training=tc, axes=axes))
    return out
