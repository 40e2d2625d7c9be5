"""Many dictionaries, one pass over the data: a sweep's runs share loading, normalisation, batches and work.

As in SAELens' multi-SAE runner, the activation stream is produced once and every
dictionary steps on it (a window of batches at a time: :func:`_one_pass` says why). Runs are
grouped by what decides their stream (:func:`stream_key`: batch size, seed, held-out split,
outlier rule); within a group, batch ``s`` is gathered once. Runs of one shape that also
share their number of steps and the step they resume at step as one stack
(:mod:`guardrail.training.stacked`: one encoder product, one backward, gradients kept in
place); a BatchTopK or L1 run, or any run on several ranks, takes its own optimiser step
through :meth:`Trainer.step`, the step a single run takes. Either way each
dictionary is the one it would be if trained alone: the same initialisation (its own
seeded generator), the same batches in the same order, its own Adam, clipping and
dead-feature state (bit for bit on one thread, stacked or not).
Runs may differ in everything else, steps included (a shorter run finishes, and is
written, while the others go on).

Each dictionary checkpoints into its own folder, in the format of a run trained alone, so
an interrupted pass resumes every unfinished dictionary from its last checkpoint (they need
not have stopped at the same step: runs resuming at different steps form different stacks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.training.checkpoint import CheckpointError, latest_step
from guardrail.training.config import TrainingConfig
from guardrail.training.data import BatchOrder, TrainingData, prepare_data, split_rows
from guardrail.training.distributed import Comm, setup
from guardrail.training.objective import StepResult
from guardrail.training.stacked import StackedTrainer, stackable
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
    trainer: Trainer

    @property
    def checkpoints(self) -> Path | None:
        return self.job.out / CHECKPOINT_DIR if self.job.out is not None else None


@dataclass
class _Unit:
    """Runs that take every step together: a stack (:mod:`guardrail.training.stacked`) or one run on its own trainer."""

    index: list[int]  # the members' places in the pass
    members: list[_Member]
    stack: StackedTrainer | None
    start: int
    steps: int
    open: bool = True

    def step(self, step: int, x: torch.Tensor) -> list[StepResult]:
        if self.stack is not None:
            return self.stack.step(step, x)
        return [self.members[0].trainer.step(step, x)]


def _stack_key(job: Job, start: int, comm: Comm, stack: bool) -> tuple | None:
    """Runs with equal keys step as one stack; None: the run steps on its own trainer."""
    if not stack or comm.distributed or not stackable(job.config):
        return None
    return (job.config.dict_size, job.training.steps, start)


def _resume_step(job: Job, resume: bool) -> int:
    return latest_step(job.out / CHECKPOINT_DIR) if (resume and job.out is not None) else 0


@dataclass
class _Planned:
    """Jobs (their places in the pass) that will form one unit, and whether it is a stack."""

    index: list[int]
    stacked: bool


def _plan(jobs: list[Job], comm: Comm, resume: bool, stack: bool) -> list[_Planned]:
    """The jobs grouped into units, in first-seen order; a job that does not stack is a unit alone."""
    units: list[_Planned] = []
    by_key: dict[tuple, _Planned] = {}
    for i, job in enumerate(jobs):
        key = _stack_key(job, _resume_step(job, resume), comm, stack)
        if key is None:
            units.append(_Planned([i], stacked=False))
        elif key in by_key:
            by_key[key].index.append(i)
        else:
            by_key[key] = _Planned([i], stacked=True)
            units.append(by_key[key])
    return units


def _build(td: TrainingData, jobs: list[Job], plan: _Planned, comm: Comm, resume: bool) -> _Unit:
    """The planned unit, every run resumed from its checkpoint; a stack's runs must resume at the same step."""
    picked = [jobs[i] for i in plan.index]
    stacked = None
    if plan.stacked:
        stacked = StackedTrainer(td, [j.config for j in picked], [j.training for j in picked])
        trainers = stacked.trainers
    else:
        trainers = [build_trainer(td, picked[0].config, picked[0].training, comm=comm)]
    members = [_Member(job, t) for job, t in zip(picked, trainers)]
    starts = {m.trainer.resume(m.checkpoints) if (resume and m.checkpoints is not None) else 0 for m in members}
    if len(starts) != 1:
        raise CheckpointError(f"the checkpoints of {', '.join(j.name for j in picked)} changed while they were loaded; start the pass again")
    return _Unit(plan.index, members, stacked, starts.pop(), picked[0].training.steps)


def _close(unit: _Unit, done: list[Crosscoder | None], on_finished: Finished | None) -> None:
    if unit.stack is not None:
        unit.stack.release()
    for i, m in zip(unit.index, unit.members):
        cc = finish(m.trainer, m.job.out, m.job.manifest_fields)
        done[i] = cc
        if on_finished is not None:
            on_finished(m.job, cc)
    unit.members, unit.stack, unit.open = [], None, False  # their optimiser state is no longer needed


def window_steps(batch_size: int, row_width: int, budget_bytes: int = 1 << 28, most: int = 64) -> int:
    """Steps of gathered batches held at once: as many as fit ``budget_bytes`` of float32 rows, at most ``most``."""
    return max(1, min(most, budget_bytes // (4 * batch_size * row_width)))


def _step_through(unit: _Unit, batches: dict[int, torch.Tensor], steps: range, callback: StepCallback | None) -> None:
    for step in steps:
        results = unit.step(step, batches[step])
        for m, res in zip(unit.members, results):
            m.trainer.after_step(step + 1, res, m.checkpoints, callback)


def _one_pass(td: TrainingData, jobs: list[Job], comm: Comm, resume: bool, progress: bool, on_finished: Finished | None,
              callback: StepCallback | None, window: int | None, stack: bool) -> list[Crosscoder]:
    """Batches are gathered once per window of steps; each unit (a stack, or one run) then takes all of its steps in the window.

    Stepping one unit through the window before the next keeps its weights and Adam
    state in cache as far as they fit; interleaving every dictionary at every step evicted
    them (measured, before stacks: one pass of six quick-grid dictionaries was twice as
    slow as one by one).
    """
    units = [_build(td, jobs, plan, comm, resume) for plan in _plan(jobs, comm, resume, stack)]
    done: list[Crosscoder | None] = [None] * len(jobs)
    tc = jobs[0].training
    train_rows, _ = split_rows(td.x.shape[0], tc.eval_fraction, tc.eval_max_rows, tc.seed)
    order = BatchOrder(train_rows, tc.batch_size, tc.seed)
    width = window or window_steps(tc.batch_size, td.x[0].numel())
    first, last = min(u.start for u in units), max(u.steps for u in units)
    for unit in units:
        if unit.start >= unit.steps:
            _close(unit, done, on_finished)
    bar = tqdm(total=last, initial=first, disable=not progress or not comm.is_main, unit="step", dynamic_ncols=True, desc=f"{len(jobs)} dictionaries")
    try:
        for w0 in range(first, last, width):
            batches: dict[int, torch.Tensor] = {}
            for unit in units:
                if not unit.open:
                    continue
                steps = range(max(w0, unit.start), min(w0 + width, unit.steps))
                for step in steps:
                    if step not in batches:
                        batches[step] = gather_batch(td, order, comm, step)
                _step_through(unit, batches, steps, callback)
                if steps and steps[-1] + 1 == unit.steps:
                    _close(unit, done, on_finished)
            bar.update(min(w0 + width, last) - w0)
    finally:
        bar.close()
    return [cc for cc in done if cc is not None]  # every run finished: in job order


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
    stack: bool = True,
) -> list[Crosscoder]:
    """Train every job in as few passes over ``data`` as their settings allow; returns the crosscoders in job order.

    ``per_pass`` caps how many dictionaries share one pass (each holds its weights and Adam
    state in memory). ``on_finished(job, cc)`` is called as each dictionary is written;
    ``callback(done, cc, res)`` after every dictionary's every step, as in ``train``.
    ``window`` is how many steps' batches are gathered at once (default :func:`window_steps`).
    ``stack=False`` steps every run on its own trainer (what a pass did before stacks; kept
    for comparison). Under a distributed launch every dictionary trains data-parallel over
    the ranks, as :func:`guardrail.training.train` does, and nothing stacks.
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
            trained = _one_pass(prepared[ratio], [jobs[i] for i in group], comm, resume, progress, on_finished, callback, window, stack)
            for i, cc in zip(group, trained):
                out[i] = cc
        failed = False
        return [cc for cc in out if cc is not None]
    finally:
        comm.close(barrier=not failed)
