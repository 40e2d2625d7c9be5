"""Sweeps: train every configuration of a YAML grid into its own artifact folder.

A grid file has shared ``base`` settings and ``groups``; each group is a cartesian product
of values. Keys of a grid point go to ``CrosscoderConfig`` (``exclusive`` becomes the
partition share per model; 0 or absent = standard crosscoder) or, if they are training
settings, to ``TrainingConfig``. The paper's 48 runs are ``grids/paper.yaml``; the same
design scaled to d = 576 for a CPU is ``grids/paper-d576.yaml``.

By default the runs train together in one pass over the data (``guardrail.training.multi``);
``one_pass=False`` trains them one by one. Runs whose artifact already exists (and
verifies) are skipped, so an interrupted sweep continues where it stopped; a run
interrupted mid-way resumes from its checkpoint, in either mode.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.dictionary.artifact import ArtifactError, read_manifest
from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.partition import Partition
from guardrail.training.config import TrainingConfig
from guardrail.training.data import prepare_data
from guardrail.training.distributed import setup
from guardrail.training.multi import Job, train_many
from guardrail.training.trainer import train

TRAINING_KEYS = set(TrainingConfig.model_fields)
SUMMARY_FILE = "sweep.json"
# Built-in names that changed, and what to pass instead. ``quick`` was also the name of the
# eval harness's 6-variant grid (``guardrail eval sweep --grid quick``), which keeps it.
RENAMED_GRIDS = {"quick": "paper-d576"}


class SweepError(ValueError):
    """The grid file is malformed or names unknown settings."""


class GridGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = {}
    run_name: str | None = Field(default=None, description="format string over the point's values and *_label entries")
    labels: dict[str, dict[str, str]] = {}


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    base: dict[str, Any] = {}
    training: dict[str, Any] = {}
    groups: list[GridGroup]


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    group: str
    point: dict[str, Any]
    crosscoder: CrosscoderConfig
    training: TrainingConfig


def builtin_grids() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("guardrail.training.grids").iterdir() if p.name.endswith(".yaml"))


def load_grid(src: str | Path) -> Grid:
    """A grid from a YAML path or a built-in name (``paper``, ``paper-d576``)."""
    path = Path(src)
    if not path.exists():
        name = str(src).removesuffix(".yaml")
        if name in RENAMED_GRIDS:
            raise SweepError(
                f"the training grid {name!r} is now {RENAMED_GRIDS[name]!r} (the paper's 48 runs scaled to d=576); "
                f"{name!r} names only the eval harness's 6-variant grid (guardrail eval sweep --grid {name})"
            )
        if name not in builtin_grids():
            raise SweepError(f"grid {src!r} is neither a file nor a built-in grid ({', '.join(builtin_grids())})")
        text = resources.files("guardrail.training.grids").joinpath(f"{name}.yaml").read_text()
    else:
        text = path.read_text()
    try:
        return Grid.model_validate(yaml.safe_load(text))
    except (ValidationError, yaml.YAMLError) as exc:
        raise SweepError(f"grid {src}: {exc}") from exc


def _label(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _run_name(group: GridGroup, point: dict[str, Any]) -> str:
    if group.run_name is None:
        return "-".join([group.name] + [f"{k}{_label(v)}" for k, v in point.items()])
    fmt = dict(point)
    for key, table in group.labels.items():
        fmt[f"{key}_label"] = table.get(_label(point.get(key)), "")
    if "dict_size" in point:
        fmt["dict_size_k"] = point["dict_size"] // 1024
    if "exclusive" in point:
        fmt["exclusive_pct"] = round(float(point["exclusive"]) * 100)
    try:
        return group.run_name.format(**fmt)
    except (KeyError, ValueError) as exc:
        raise SweepError(f"group {group.name}: run_name {group.run_name!r} cannot be filled: {exc}") from exc


def _specs_of(grid: Grid, group: GridGroup) -> list[RunSpec]:
    keys = list(group.grid)
    specs = []
    for values in itertools.product(*(group.grid[k] for k in keys)):
        point = dict(zip(keys, values))
        settings = {**grid.base, **group.fixed, **point}
        train_kw = {**grid.training, **{k: settings.pop(k) for k in list(settings) if k in TRAINING_KEYS}}
        exclusive = float(settings.pop("exclusive", 0.0) or 0.0)
        if exclusive > 0:
            settings["partition"] = Partition.from_fraction(int(settings["dict_size"]), exclusive)
        try:
            cfg = CrosscoderConfig(**settings)
            tc = TrainingConfig(**train_kw)
        except ValidationError as exc:
            raise SweepError(f"grid {grid.name}, group {group.name}, point {point}: {exc}") from exc
        specs.append(RunSpec(name=_run_name(group, point), group=group.name, point=point, crosscoder=cfg, training=tc))
    return specs


def expand_grid(grid: Grid) -> list[RunSpec]:
    """Every run of the grid, in file order; run names must be unique."""
    specs = [s for g in grid.groups for s in _specs_of(grid, g)]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise SweepError(f"grid {grid.name}: run name {s.name!r} occurs twice; make run_name distinguish all grid keys")
        seen.add(s.name)
    return specs


def _finished(folder: Path) -> bool:
    try:
        read_manifest(folder)
        return True
    except ArtifactError:
        return False


def run_sweep(
    grid: Grid | str | Path,
    data: Any,
    out_dir: str | Path,
    *,
    only: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    one_pass: bool = True,
    per_pass: int | None = None,
    stack: bool = True,
) -> list[dict[str, Any]]:
    """Train every run (or those whose names contain one of ``only``); returns the summary rows.

    ``overrides`` replace training settings of every run (e.g. ``{"steps": 100}`` for a smoke test).
    By default the unfinished runs train together in one pass over the data
    (:mod:`guardrail.training.multi`: the same dictionaries as one by one, in less time);
    ``one_pass=False`` trains them one after the other; ``per_pass`` caps how many share a pass;
    ``stack=False`` keeps every run of a pass on its own trainer (no stacks: for comparison).
    Under a distributed launch every run trains data-parallel over the ranks, and rank 0
    writes the artifacts and ``sweep.json``.
    """
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    specs = expand_grid(grid)
    if only:
        specs = [s for s in specs if any(o in s.name for o in only)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comm = setup()  # one process group for the whole sweep under a launcher; every run joins it
    failed = True
    try:
        rows = _train_pending(grid, specs, data, out, overrides, progress and comm.is_main, one_pass, per_pass, comm.is_main, stack)
        failed = False
        return rows
    finally:
        comm.close(barrier=not failed)


def _train_pending(grid: Grid, specs: list[RunSpec], data: Any, out: Path, overrides: dict[str, Any] | None, progress: bool,
                   one_pass: bool, per_pass: int | None, writes: bool, stack: bool = True) -> list[dict[str, Any]]:
    """Train the unfinished runs; the data is normalised once per outlier rule (``max_norm_ratio``) the runs ask for."""
    status = {s.name: "skipped (artifact exists)" for s in specs if _finished(out / s.name)}
    jobs = [_job(grid, spec, out, overrides, progress) for spec in specs if spec.name not in status]

    def record(job: Job, _cc: Any = None) -> None:
        status[job.name] = "trained"
        _write_summary(grid, specs, out, status, writes)

    if jobs and one_pass:
        if progress:
            print(f"one pass: {len(jobs)} of {len(specs)} runs ({len(specs) - len(jobs)} already finished)", flush=True)
        train_many(data, jobs, per_pass=per_pass, progress=progress, on_finished=record, stack=stack)
    else:
        prepared: dict[float | None, Any] = {}
        for i, job in enumerate(jobs, 1):
            if progress:
                print(f"[{i}/{len(jobs)}] {job.name}", flush=True)
            ratio = job.training.max_norm_ratio
            if ratio not in prepared:
                prepared[ratio] = prepare_data(data, max_norm_ratio=ratio)
            train(prepared[ratio], job.config, job.out, training=job.training, manifest_fields=job.manifest_fields)
            record(job)
    return _write_summary(grid, specs, out, status, writes)


def _write_summary(grid: Grid, specs: list[RunSpec], out: Path, status: dict[str, str], writes: bool = True) -> list[dict[str, Any]]:
    """``sweep.json`` (written by rank 0 of a launch): one row per run finished so far (trained or skipped), in grid order."""
    rows = [_summary_row(s, out / s.name, read_manifest(out / s.name), status[s.name]) for s in specs if s.name in status]
    if writes:
        (out / SUMMARY_FILE).write_text(json.dumps({"grid": grid.name, "runs": rows}, indent=1))
    return rows


def _job(grid: Grid, spec: RunSpec, out: Path, overrides: dict[str, Any] | None, progress: bool) -> Job:
    tc = spec.training.model_copy(update={**(overrides or {}), "progress": progress})
    note = f"sweep {grid.name}, run {spec.name}"
    return Job(name=spec.name, config=spec.crosscoder, training=tc, out=out / spec.name, manifest_fields={"source": {"kind": "trained", "notes": [note]}})


def _summary_row(spec: RunSpec, folder: Path, manifest: Any, status: str) -> dict[str, Any]:
    m = manifest.metrics
    parts = m.get("partitions", {})
    return {
        "name": spec.name,
        "group": spec.group,
        "point": spec.point,
        "artifact": str(folder),
        "status": status,
        "fvu": m.get("fvu"),
        "fvu_A": m.get("fvu_A"),
        "fvu_B": m.get("fvu_B"),
        "l0": m.get("l0"),
        "dead": {k: v.get("dead_fraction") for k, v in parts.items()},
    }
