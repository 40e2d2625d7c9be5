"""The DFC partition: which dictionary indices each model may encode and decode.

Layout (as in the paper's ``dfc.py``)::

    [0, n_a)            A-exclusive: only model A encodes and decodes them
    [n_a, n_a + n_b)    B-exclusive: only model B
    [n_a + n_b, D)      shared: both models

A standard crosscoder is the partition with ``n_a = n_b = 0``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from guardrail.paper import MODEL_A, MODEL_B

PartitionName = Literal["a_exclusive", "b_exclusive", "shared"]
PARTITION_NAMES: tuple[PartitionName, ...] = ("a_exclusive", "b_exclusive", "shared")
# Which models may use each partition.
PARTITION_MODELS: dict[str, tuple[int, ...]] = {"a_exclusive": (MODEL_A,), "b_exclusive": (MODEL_B,), "shared": (MODEL_A, MODEL_B)}


class Partition(BaseModel):
    """Index ranges of the A-exclusive, B-exclusive and shared features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dict_size: int
    n_a: int
    n_b: int

    @model_validator(mode="after")
    def _check(self) -> "Partition":
        if self.dict_size <= 0:
            raise ValueError(f"dict_size must be positive, got {self.dict_size}")
        if self.n_a < 0 or self.n_b < 0:
            raise ValueError(f"exclusive counts must be >= 0, got n_a={self.n_a}, n_b={self.n_b}")
        if self.n_a + self.n_b > self.dict_size:
            raise ValueError(f"n_a + n_b = {self.n_a + self.n_b} exceeds dict_size {self.dict_size}")
        return self

    @classmethod
    def from_fraction(cls, dict_size: int, exclusive: float, exclusive_b: float | None = None) -> "Partition":
        """Exclusive shares per model, truncated like the paper (``int(D * p)``)."""
        p_b = exclusive if exclusive_b is None else exclusive_b
        for name, p in (("exclusive", exclusive), ("exclusive_b", p_b)):
            if not 0.0 <= p < 0.5:
                raise ValueError(f"{name} share must be in [0, 0.5), got {p}")
        return cls(dict_size=dict_size, n_a=int(dict_size * exclusive), n_b=int(dict_size * p_b))

    @property
    def n_shared(self) -> int:
        return self.dict_size - self.n_a - self.n_b

    @property
    def a_exclusive(self) -> range:
        return range(0, self.n_a)

    @property
    def b_exclusive(self) -> range:
        return range(self.n_a, self.n_a + self.n_b)

    @property
    def shared(self) -> range:
        return range(self.n_a + self.n_b, self.dict_size)

    def range(self, name: str) -> range:
        if name not in PARTITION_NAMES:
            raise ValueError(f"unknown partition {name!r}; expected one of {PARTITION_NAMES}")
        return getattr(self, name)

    def indices(self, name: str) -> torch.Tensor:
        r = self.range(name)
        return torch.arange(r.start, r.stop, dtype=torch.long)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.range(name)) for name in PARTITION_NAMES}

    def labels(self) -> torch.Tensor:
        """Partition id per feature (0 = A-exclusive, 1 = B-exclusive, 2 = shared)."""
        out = torch.full((self.dict_size,), 2, dtype=torch.long)
        out[: self.n_a] = 0
        out[self.n_a : self.n_a + self.n_b] = 1
        return out

    def encoder_mask(self) -> torch.Tensor:
        """Bool [2, D]: True where model m's encoder may feed feature i."""
        mask = torch.ones(2, self.dict_size, dtype=torch.bool)
        mask[1, : self.n_a] = False
        mask[0, self.n_a : self.n_a + self.n_b] = False
        return mask

    def decoder_mask(self) -> torch.Tensor:
        """Bool [D, 2]: True where feature i may write to model m."""
        return self.encoder_mask().T.contiguous()

    @property
    def is_standard(self) -> bool:
        return self.n_a == 0 and self.n_b == 0
