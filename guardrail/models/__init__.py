"""Loading models and model pairs; which specs exist is one table (:mod:`guardrail.models.specs`)."""

from guardrail.models.loading import LoadedModel, ModelLoadError
from guardrail.models.pair import ModelPair, PairMismatchError, load_pair
from guardrail.models.specs import NAMED_MODELS, PAIRS, ModelSpec, PairSpec, load_model, resolve

__all__ = [
    "NAMED_MODELS",
    "PAIRS",
    "LoadedModel",
    "ModelLoadError",
    "ModelPair",
    "ModelSpec",
    "PairMismatchError",
    "PairSpec",
    "load_model",
    "load_pair",
    "resolve",
]
