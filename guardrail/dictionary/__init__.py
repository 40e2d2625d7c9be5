"""Crosscoder dictionaries: standard crosscoder and the Dedicated Feature Crosscoder (DFC).

``Crosscoder`` is the inference class; ``guardrail.training`` trains it. Artifacts are
safetensors + a verified JSON manifest (``save_artifact`` / ``load_artifact``).
"""

from guardrail.dictionary.artifact import (
    ArtifactError,
    ArtifactManifest,
    load_artifact,
    read_manifest,
    save_artifact,
)
from guardrail.dictionary.config import AuxKConfig, CrosscoderConfig, DFCConfig
from guardrail.dictionary.crosscoder import ARCHITECTURES, Crosscoder, register_architecture
from guardrail.dictionary.importers import import_dictionary_learning, import_paper_checkpoint
from guardrail.dictionary.partition import PARTITION_NAMES, Partition

__all__ = [
    "ARCHITECTURES",
    "ArtifactError",
    "ArtifactManifest",
    "AuxKConfig",
    "Crosscoder",
    "CrosscoderConfig",
    "DFCConfig",
    "PARTITION_NAMES",
    "Partition",
    "import_dictionary_learning",
    "import_paper_checkpoint",
    "load_artifact",
    "read_manifest",
    "register_architecture",
    "save_artifact",
]
