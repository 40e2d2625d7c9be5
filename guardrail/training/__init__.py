"""Training crosscoders and DFCs: trainer, metrics, checkpoints, sweeps."""

from guardrail.training.checkpoint import CheckpointError
from guardrail.training.config import TrainingConfig
from guardrail.training.metrics import evaluate
from guardrail.training.trainer import train

__all__ = ["CheckpointError", "TrainingConfig", "evaluate", "train"]
