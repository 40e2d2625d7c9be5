"""Many dictionaries, one pass over the data: a sweep's runs share loading, normalisation and batches.

As in SAELens' multi-SAE runner, the activation stream is produced once and every
dictionary steps on it (a window of batches at a time: :func:`_one_pass` says why). Runs are grouped by what decides their stream (:func:`stream_key`:
batch size, seed, held-out split, outlier rule); within a group, batch ``s`` is gathered
once and each dictionary takes its own optimiser step on it through :meth:`Trainer.step`,
the step a single run takes. So each dictionary is the one it would be if trained alone:
the same initialisation (its own seeded generator), the same batches in the same order, its
own Adam and dead-feature state. Runs may differ in everything else, steps included (a
shorter run finishes, and is written, while the others go on).

Each dictionary checkpoints into its own folder, so an interrupted pass resumes every
unfinished dictionary from its last checkpoint (they need not have stopped at the same step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.training.config import TrainingConfig
from guardrail.training.data import BatchOrder, TrainingData, prepare_data, split_rows
from guardrail.training.distributed import Comm, setup
from guardrail.training.trainer import CHECKPOINT_DIR, StepCallback, Trainer, build_trainer, finish, gather_batch

STREAM_FIELDS = ("batch_size", "seed", "eval_fraction", "eval_max_rows", "max_norm_ratio")


@dataclass
class Job:
    """One dictionary of a pass: what to train, how, and where its checkpoints and artifact go."""

    name: str
    config: CrosscoderConfig
    training: TrainingConfig
    out: Path | None = None
    manifest_fields: dict[str, Any] = field(default_factory=dict)


Finished = Callable[[Job, Crosscoder], None]


def stream_key(tc: TrainingConfig) -> tuple:
    """The training settings that decide which rows a run sees at each step; equal keys, equal batches."""
    return tuple(getattr(tc, f) for f in STREAM_FIELDS)


def _groups(jobs: list[Job], per_pass: int | None) -> Iterator[list[int]]:
    """Indices of jobs sharing a stream, in first-seen order, at most ``per_pass`` at a time (each holds its Adam state)."""
    by_key: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        by_key.setdefault(stream_key(job.training), []).append(i)
    size = per_pass or len(jobs) or 1
    for members in by_key.values():
        for i in range(0, len(members), size):
            yield members[i : i + size]


@dataclass
class _Member:
    job: Job
    trainer: Trainer | None
    start: int

    @property
    def steps(self) -> int:
        return self.job.training.steps


def _start(job: Job, td: TrainingData, comm: Comm, resume: bool) -> _Member:
    trainer = build_trainer(td, job.config, job.training, comm=comm)
    ck = job.out / CHECKPOINT_DIR if job.out is not None else None
    start = trainer.resume(ck) if (ck is not None and resume) else 0
    return _Member(job, trainer, start)


def _close(m: _Member, done: list[Crosscoder | None], index: int, on_finished: Finished | None) -> None:
    cc = finish(m.trainer, m.job.out, m.job.manifest_fields)
    done[index] = cc
    m.trainer = None  # its optimiser state is no longer needed
    if on_finished is not None:
        on_finished(m.job, cc)


def window_steps(batch_size: int, row_width: int, budget_bytes: int = 1 << 28, most: int = 64) -> int:
    """Steps of gathered batches held at once: as many as fit ``budget_bytes`` of float32 rows, at most ``most``."""
    return max(1, min(most, budget_bytes // (4 * batch_size * row_width)))


def _step_through(m: _Member, batches: dict[int, torch.Tensor], steps: range, callback: StepCallback | None) -> None:
    ck = m.job.out / CHECKPOINT_DIR if m.job.out is not None else None
    for step in steps:
        res = m.trainer.step(step, batches[step])
        m.trainer.after_step(step + 1, res, ck, callback)


def _one_pass(td: TrainingData, jobs: list[Job], comm: Comm, resume: bool, progress: bool, on_finished: Finished | None,
              callback: StepCallback | None, window: int | None) -> list[Crosscoder]:
    """Batches are gathered once per window of steps; each dictionary then takes all of its steps in the window.

    Stepping one dictionary through the window before the next keeps its weights and Adam
    state in cache; interleaving every dictionary at every step evicted them (measured:
    one pass of six quick-grid dictionaries was twice as slow as one by one).
    """
    members = [_start(job, td, comm, resume) for job in jobs]
    done: list[Crosscoder | None] = [None] * len(members)
    tc = jobs[0].training
    train_rows, _ = split_rows(td.x.shape[0], tc.eval_fraction, tc.eval_max_rows, tc.seed)
    order = BatchOrder(train_rows, tc.batch_size, tc.seed)
    width = window or window_steps(tc.batch_size, td.x[0].numel())
    first, last = min(m.start for m in members), max(m.steps for m in members)
    for i, m in enumerate(members):
        if m.start >= m.steps:
            _close(m, done, i, on_finished)
    bar = tqdm(total=last, initial=first, disable=not progress or not comm.is_main, unit="step", dynamic_ncols=True, desc=f"{len(jobs)} dictionaries")
    try:
        for w0 in range(first, last, width):
            batches: dict[int, torch.Tensor] = {}
            for i, m in enumerate(members):
                if m.trainer is None:
                    continue
                steps = range(max(w0, m.start), min(w0 + width, m.steps))
                for step in steps:
                    if step not in batches:
                        batches[step] = gather_batch(td, order, comm, step)
                _step_through(m, batches, steps, callback)
                if steps and steps[-1] + 1 == m.steps:
                    _close(m, done, i, on_finished)
            bar.update(min(w0 + width, last) - w0)
    finally:
        bar.close()
    return [cc for cc in done if cc is not None]  # every member finished: in member order


def train_many(
    data: Any,
    jobs: list[Job],
    *,
    resume: bool = True,
    per_pass: int | None = None,
    progress: bool = True,
    on_finished: Finished | None = None,
    callback: StepCallback | None = None,
    window: int | None = None,
    distributed: bool | None = None,
) -> list[Crosscoder]:
    """Train every job in as few passes over ``data`` as their settings allow; returns the crosscoders in job order.

    ``per_pass`` caps how many dictionaries share one pass (each holds its weights and Adam
    state in memory). ``on_finished(job, cc)`` is called as each dictionary is written;
``callback(done, cc, res)`` after every dictionary's every step, as in ``train``.
``window`` is how many steps' batches are gathered at once (default :func:`window_steps`).
    Under a distributed launch every dictionary trains data-parallel over the ranks, as
    :func:`guardrail.training.train` does.
    """
    comm = setup(distributed)
    failed = True
    try:
        prepared: dict[float | None, TrainingData] = {}
        out: list[Crosscoder | None] = [None] * len(jobs)
        for group in _groups(jobs, per_pass):
            ratio = jobs[group[0]].training.max_norm_ratio
            if ratio not in prepared:
                prepared[ratio] = prepare_data(data, max_norm_ratio=ratio)
            trained = _one_pass(prepared[ratio], [jobs[i] for i in group], comm, resume, progress, on_finished, callback, window)
            for i, cc in zip(group, trained):
                out[i] = cc
        failed = False
        return [cc for cc in out if cc is not None]
    finally:
        comm.close(barrier=not failed)
