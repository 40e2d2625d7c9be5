"""Configuration of a crosscoder dictionary (architecture, sparsity, partition, loss terms).

The same object travels with the artifact, so a loaded dictionary encodes exactly as it
was trained. Training-loop settings (steps, lr, ...) live in ``guardrail.training``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guardrail.dictionary.partition import Partition

Sparsity = Literal["topk", "batchtopk", "l1"]


class AuxKConfig(BaseModel):
    """AuxK revival (Gao et al. 2024): dead features learn to predict the residual error.

    With ``per_partition`` each partition's dead features predict the error of the model(s)
    that partition decodes to, so A-exclusive dead features are pulled towards what A's
    reconstruction misses. A feature counts as dead after ``dead_steps`` optimiser steps
    without firing.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k_aux: int | None = Field(default=None, description="dead features used per sample; None = d_model // 2")
    coef: float = Field(default=1 / 32, ge=0)
    dead_steps: int = Field(default=100, ge=1)
    per_partition: bool = True

    def resolved_k_aux(self, d_model: int) -> int:
        return self.k_aux if self.k_aux is not None else max(1, d_model // 2)


class CrosscoderConfig(BaseModel):
    """A two-model crosscoder; with a non-empty ``partition`` it is a DFC.

    Top-k rule: by default one top-k over the whole dictionary (the paper's). With
    ``k_exclusive`` set, each partition has its own top-k (``Crosscoder._topk_indices`` says
    why the slots are given explicitly), so the A-exclusive selection never depends on B
    and single-model encoding of A gives exact A-exclusive codes. The field has been in
    every manifest since the first format version; ``None`` there is the joint rule.
    """

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["crosscoder"] = "crosscoder"
    d_model: int | None = Field(default=None, description="per-model width; None = taken from the training data")
    dict_size: int = Field(gt=0)
    k: int | None = Field(default=32, description="active features per sample (topk) / on average (batchtopk)")
    sparsity: Sparsity = "topk"
    partition: Partition | None = None
    k_exclusive: int | None = Field(
        default=None,
        description=(
            "per-partition top-k: slots for each exclusive partition, k - 2*k_exclusive for the shared one, each its own top-k "
            "(single-model codes of A-exclusive features are then exact); None = one joint top-k, as in the paper"
        ),
    )
    lambda_shared: float = Field(default=0.0, ge=0, description="L1 coefficient on shared activations")
    lambda_excl: float = Field(default=0.0, ge=0, description="L1 coefficient on exclusive activations (0 = free)")
    penalty_form: Literal["partition", "paper"] = Field(
        default="partition",
        description=(
            "'partition': mean|f_exclusive| over the exclusive features; 'paper': the paper code's "
            "(mean|[f_A-excl, f_shared]| + mean|[f_B-excl, f_shared]|)/2"
        ),
    )
    l1_coef: float = Field(default=0.0, ge=0, description="sparsity='l1': coefficient of sum_i f_i (|d_i^A| + |d_i^B|)")
    batchtopk_momentum: float = Field(default=0.99, gt=0, lt=1, description="EMA of the BatchTopK inference threshold")
    exclusive_init_scale: float = Field(
        default=2**0.5,
        gt=0,
        description="encoder init scale of exclusive features; sqrt(2) matches the pre-activation spread of shared features, which read two models",
    )
    aux_k: AuxKConfig = Field(default_factory=AuxKConfig)

    @model_validator(mode="after")
    def _check(self) -> "CrosscoderConfig":
        if self.partition is not None and self.partition.dict_size != self.dict_size:
            raise ValueError(f"partition.dict_size {self.partition.dict_size} != dict_size {self.dict_size}")
        if self.sparsity in ("topk", "batchtopk"):
            if self.k is None or not 0 < self.k <= self.dict_size:
                raise ValueError(f"sparsity={self.sparsity} needs 0 < k <= dict_size, got k={self.k}")
        if self.k_exclusive is not None:
            if self.sparsity != "topk":
                raise ValueError("k_exclusive (per-partition top-k) needs sparsity='topk'")
            if self.partition is None or self.partition.is_standard:
                raise ValueError("k_exclusive needs a partition with exclusive features")
            p = self.partition
            if self.k_exclusive < 0 or 2 * self.k_exclusive > (self.k or 0):
                raise ValueError(f"k_exclusive={self.k_exclusive} must be in [0, k/2] (k={self.k})")
            if self.k_exclusive > min(p.n_a, p.n_b) or (self.k or 0) - 2 * self.k_exclusive > p.n_shared:
                raise ValueError(f"k_exclusive={self.k_exclusive} does not fit partition sizes {p.sizes()}")
        if self.d_model is not None and self.d_model <= 0:
            raise ValueError(f"d_model must be positive, got {self.d_model}")
        return self

    @property
    def is_dfc(self) -> bool:
        return self.partition is not None and not self.partition.is_standard

    @property
    def exclusive_codes_exact(self) -> bool:
        """Single-model encoding gives the exclusive features' codes exactly, not only their pre-activations.

        True when no feature's selection depends on another partition's pre-activations:
        per-partition top-k, BatchTopK at inference (a threshold per feature) and L1 (ReLU
        only). False under the paper's joint top-k, where the shared features a single
        model encodes without the other's half decide which exclusive features survive.
        """
        return self.sparsity != "topk" or self.k_exclusive is not None

    def resolved_partition(self) -> Partition:
        """The partition, or the all-shared one for a standard crosscoder."""
        return self.partition or Partition(dict_size=self.dict_size, n_a=0, n_b=0)

    def with_d_model(self, d_model: int) -> "CrosscoderConfig":
        if self.d_model is not None and self.d_model != d_model:
            raise ValueError(f"config d_model={self.d_model} but the data has d_model={d_model}")
        return self.model_copy(update={"d_model": d_model})


def DFCConfig(  # noqa: N802 - reads like a class at call sites, returns the one config type
    dict_size: int,
    k: int = 32,
    exclusive: float = 0.05,
    *,
    exclusive_b: float | None = None,
    lambda_shared: float = 0.0,
    lambda_excl: float = 0.0,
    **kwargs,
) -> CrosscoderConfig:
    """A DFC config: ``exclusive`` is the share of the dictionary exclusive to each model."""
    partition = Partition.from_fraction(dict_size, exclusive, exclusive_b)
    return CrosscoderConfig(
        dict_size=dict_size,
        k=k,
        partition=partition,
        lambda_shared=lambda_shared,
        lambda_excl=lambda_excl,
        **kwargs,
    )
