"""Loading models and model pairs."""

from guardrail.models.loading import LoadedModel, ModelLoadError, load_model
from guardrail.models.pair import ModelPair, PairMismatchError, load_pair

__all__ = ["LoadedModel", "ModelLoadError", "ModelPair", "PairMismatchError", "load_model", "load_pair"]
