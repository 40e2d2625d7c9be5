"""Training crosscoders and DFCs: trainer, metrics, checkpoints, sweeps, one-pass and multi-rank runs."""

from guardrail.training.checkpoint import CheckpointError
from guardrail.training.config import TrainingConfig, auto_steps
from guardrail.training.metrics import evaluate
from guardrail.training.multi import Job, train_many
from guardrail.training.sweep import Grid, SweepError, expand_grid, load_grid, run_sweep
from guardrail.training.trainer import Trainer, build_trainer, train

__all__ = [
    "CheckpointError",
    "Grid",
    "Job",
    "SweepError",
    "Trainer",
    "TrainingConfig",
    "auto_steps",
    "build_trainer",
    "evaluate",
    "expand_grid",
    "load_grid",
    "run_sweep",
    "train",
    "train_many",
]
