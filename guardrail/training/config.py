"""Training-loop settings (the dictionary's own settings are in ``CrosscoderConfig``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainingConfig(BaseModel):
    """Adam with linear warmup and gradient clipping; defaults follow the paper (9k steps, batch 1024, 1e-4, clip 1.0)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=9000, gt=0)
    batch_size: int = Field(default=1024, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=1.0, description="max global grad norm; None = no clipping")
    seed: int = 0
    checkpoint_every: int = Field(default=500, ge=0, description="0 = no periodic checkpoints")
    keep_checkpoints: bool = Field(default=False, description="keep the checkpoint folder after a finished run")
    log_every: int = Field(default=50, gt=0)
    eval_fraction: float = Field(default=0.05, ge=0, lt=1, description="rows held out for the final metrics")
    eval_max_rows: int = Field(default=16384, gt=0)
    threads: int | None = Field(default=None, description="torch threads; None = leave as is")
    progress: bool = True
    max_norm_ratio: float | None = Field(default=None, gt=1, description="leave out rows above this × the median norm (attention sinks); None = keep all")

    def resume_key(self) -> dict:
        """Settings that must match for a checkpoint to be resumed (not steps or bookkeeping)."""
        return self.model_dump(include={"batch_size", "lr", "betas", "warmup_steps", "grad_clip", "seed", "eval_fraction", "eval_max_rows", "max_norm_ratio"})


def auto_steps(n_rows: int, batch_size: int, paper_steps: int = 9000, max_epochs: int = 120, min_steps: int = 500) -> int:
    """The paper's 9k steps, capped at ``max_epochs`` passes over the data (at least ``min_steps``).

    The paper's 9k x 1024 samples are ~115 passes over its 80k rows; on a small cache the same
    step count would be thousands of passes, which only memorises the data.
    """
    epochs_cap = -(-max_epochs * n_rows // batch_size)
    return max(min_steps, min(paper_steps, epochs_cap))
