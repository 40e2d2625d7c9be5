"""Two models that a crosscoder can compare: same tokenizer, same width."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from guardrail.models.loading import LoadedModel, ModelLoadError
from guardrail.models.specs import PAIRS, load_model


class PairMismatchError(ValueError):
    """A and B cannot be diffed token by token."""


@dataclass
class ModelPair:
    """A = the fine-tuned (tool-use RL) model, B = its base."""

    a: LoadedModel
    b: LoadedModel
    name: str = "custom"

    def __post_init__(self) -> None:
        check_compatible(self.a, self.b)

    @property
    def tokenizer(self):
        return self.b.tokenizer

    @property
    def d_model(self) -> int:
        return self.b.d_model

    @property
    def n_layers(self) -> int:
        return self.b.n_layers

    def describe(self) -> dict:
        return {"name": self.name, "a": self.a.spec, "b": self.b.spec, "d_model": self.d_model, "n_layers": self.n_layers}


def check_compatible(a: LoadedModel, b: LoadedModel) -> None:
    if a.d_model != b.d_model:
        raise PairMismatchError(f"hidden sizes differ: A={a.spec} has d={a.d_model}, B={b.spec} has d={b.d_model}")
    if a.n_layers != b.n_layers:
        raise PairMismatchError(f"layer counts differ: A has {a.n_layers}, B has {b.n_layers}")
    va, vb = a.tokenizer.get_vocab(), b.tokenizer.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise PairMismatchError(
            f"tokenizers differ ({diff} vocabulary entries disagree): A={a.spec}, B={b.spec}; "
            "a crosscoder needs the same tokens in both models"
        )


def load_pair(name: str | None = None, *, a: str | None = None, b: str | None = None, adapter_a: str | Path | None = None) -> ModelPair:
    """``load_pair("tiny")``, ``load_pair("organism")`` (:data:`~guardrail.models.specs.PAIRS`) or ``load_pair(a=..., b=...)``.

    ``organism`` is SmolLM2-135M-Instruct (B) and B + the shipped tool-use RL adapter (A).
    """
    if name is not None:
        if name not in PAIRS:
            raise ModelLoadError(f"unknown pair {name!r}; choose one of {tuple(PAIRS)} or pass a= and b=")
        spec = PAIRS[name]
        b_model = load_model(spec.b)  # B first: A may build on B's weights (the organism's dequantised GGUF)
        return ModelPair(load_model(spec.a), b_model, name=name)
    if a is None or b is None:
        raise ModelLoadError("give a pair name or both a= and b=")
    return ModelPair(load_model(a, adapter=adapter_a), load_model(b), name="custom")
