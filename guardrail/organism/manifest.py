"""The build's records, typed: ``warmstart.json`` and ``manifest.json`` of a built organism.

One record per job of the build: the warm start (``WarmStartRecord``), GRPO with its dev
selection and, for a continued run, its segments (``RLRecord``), the dev metrics
(``BuildMetrics``), and the whole manifest (``BuildManifest``). A continued GRPO run extends
the parsed record of the run it continues (``BuildManifest.rl_continued_by``).

Optional parts are written only when present (a resume's origin, the selection, the
segments, the totals of a continued build), so a manifest keeps the keys it always had.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.fields import FieldInfo

from guardrail.organism.build_config import BuildConfig, legacy_of

REWARD = "ToolRL: format {0,1} + correctness [-3,3] vs BFCL possible answers (guardrail.tasks.reward)"
RL_ALGORITHM = ("GRPO (prefix-cached, one policy iteration per batch, beta=0, group-normalised advantages, "
                "token-mean loss); with config.guidance, the reference completion joins a group when no "
                "sample reached its reward (config.guide_when=below_reference) or when the group has no "
                "reward variance (no_variance): off-policy guidance")
SELECTION_METRIC = "strict tool-name accuracy, answered dev tasks, greedy"


def _absent() -> Any:
    """An optional field that is left out of the JSON while it is None."""
    return Field(None, exclude_if=lambda v: v is None)


class Record(BaseModel):
    """A record of the build: strict on read, written as the JSON the build always wrote."""

    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict[str, Any]:
        """The record as JSON values (what ``json.dumps`` writes to the file)."""
        return self.model_dump(mode="json")


class WarmCheck(Record):
    """One dev format check of the warm start."""

    step: int
    dev_format: float
    lr: float


class WarmStartRecord(Record):
    """The supervised warm start (``warmstart/warmstart.json`` and the manifest's ``warm_start``)."""

    steps: int
    examples_seen: int
    dev_format: float
    history: list[WarmCheck]
    seconds: float
    in_target: bool
    resumed_from: str | None = _absent()  # the saved warm start this build loaded instead of training one

    @classmethod
    def read(cls, folder: Path) -> WarmStartRecord:
        """The record of the warm start saved in ``folder``."""
        return cls.model_validate_json((folder / "warmstart.json").read_text())

    def write(self, folder: Path) -> None:
        (folder / "warmstart.json").write_text(json.dumps(self.dump(), indent=2))


class GRPOStep(Record):
    """One GRPO step: mean reward and sampled format over its groups."""

    step: int
    reward: float
    sample_format: float
    groups_updated: int
    groups_guided: int
    seconds: float


class SelectionCheck(Record):
    """One dev check during GRPO: strict tool names right of ``n`` answered dev tasks."""

    step: int
    dev_names: int
    n: int
    seconds: float


class SelectionRecord(Record):
    """Which GRPO step's adapter was kept, and every check that chose it."""

    metric: str = SELECTION_METRIC
    step: int
    dev_names: int
    n: int
    history: list[SelectionCheck]


class _SegmentRun(Record):
    """What a segment records of its run; ``RLSegment`` adds the config fields that shaped it."""

    steps: int
    seconds: float
    resumed_from: str | None = _absent()  # the built A this segment continued
    adam_restarted: bool | None = _absent()  # a continued segment starts Adam's moments from zero

    @classmethod
    def of(cls, cfg: BuildConfig, steps: int, seconds: float, **run: Any) -> _SegmentRun:
        """The segment of ``steps`` GRPO steps run under ``cfg``."""
        return cls(steps=steps, seconds=seconds, **run, **{k: getattr(cfg, k) for k in BuildConfig.segment_fields()})


def _segment_field(info: FieldInfo) -> tuple[Any, Any]:
    """A segment's copy of a config field: required, unless older segments may lack it (its Legacy value)."""
    legacy = legacy_of(info)
    if legacy is None:
        return info.annotation, ...
    return info.annotation, Field(default_factory=lambda: copy.deepcopy(legacy.value))


# one GRPO run of a build that was continued: its length and the config fields that shape GRPO
# (BuildConfig's PER_SEGMENT fields; a segment recorded before a field existed reads its Legacy value)
RLSegment = create_model(
    "RLSegment", __base__=_SegmentRun, __module__=__name__,
    **{name: _segment_field(info) for name, info in BuildConfig.segment_fields().items()},
)


class RLRecord(Record):
    """GRPO over the whole build (all segments of a continued one)."""

    steps: int
    prompts_seen: int
    groups_guided: int
    groups_updated: int
    history: list[GRPOStep]
    segments: list[RLSegment] | None = _absent()  # type: ignore[valid-type]  # only for a continued run
    selected: SelectionRecord | None = _absent()  # only with config.select_every
    seconds: float


class BuildMetrics(Record):
    """Dev format accuracies measured by the build (None: not measured)."""

    dev_format_B: float | None
    dev_format_warmstart: float
    dev_format_A: float | None
    dev_n: int
    final_dev_n: int
    # written beside a shipped build's manifest, not by the build: the test split's headline from
    # eval.json (``guardrail organism eval``) and the kept adapter's dev names
    test: dict[str, Any] | None = _absent()
    dev_names_A: int | None = _absent()


class BuildManifest(Record):
    """A build's record (``manifest.json``): enough to reproduce it (config, split hash, seed) and to judge it."""

    name: str
    base: str
    seed: int
    split_hash: str
    reward: str
    rl_algorithm: str
    config: BuildConfig
    warm_start: WarmStartRecord
    rl: RLRecord
    metrics: BuildMetrics
    wall_time_s: float
    torch: str
    wall_time_total_s: float | None = _absent()  # a continued build: its wall time plus the one it continued
    notes: list[str] | None = _absent()

    @field_validator("config", mode="before")
    @classmethod
    def _recorded_config(cls, config: Any) -> Any:
        """A manifest's config is read as the build ran, whichever version wrote it."""
        return BuildConfig.from_recorded(config) if isinstance(config, dict) else config

    @classmethod
    def of_build(cls, cfg: BuildConfig, warm: WarmStartRecord, rl: RLRecord, metrics: BuildMetrics, wall_time_s: float,
                 split_hash: str, previous: BuildManifest | None = None) -> BuildManifest:
        """The manifest of a build that just ran; ``previous``: the manifest of the build it continued."""
        import torch

        manifest = cls(name="organism", base=cfg.base, seed=cfg.seed, split_hash=split_hash, reward=REWARD,
                       rl_algorithm=RL_ALGORITHM, config=cfg, warm_start=warm, rl=rl, metrics=metrics,
                       wall_time_s=wall_time_s, torch=torch.__version__)
        if previous is not None:  # the build's total cost includes the run it continued
            manifest.wall_time_total_s = previous.total_wall_time_s + wall_time_s
            manifest.notes = (previous.notes or []) + [f"GRPO continued from {cfg.resume_rl} (config.resume_rl)."]
        return manifest

    @property
    def total_wall_time_s(self) -> float:
        """Wall time of this build and of every build it continued."""
        return self.wall_time_s if self.wall_time_total_s is None else self.wall_time_total_s

    @classmethod
    def read(cls, folder: Path) -> BuildManifest:
        """The manifest of the build in ``folder``."""
        return cls.model_validate_json((folder / "manifest.json").read_text())

    def write(self, folder: Path) -> None:
        (folder / "manifest.json").write_text(json.dumps(self.dump(), indent=2))

    def rl_continued_by(self, more: RLRecord, cfg: BuildConfig) -> RLRecord:
        """One RL record for this build's GRPO followed by ``more`` steps run under ``cfg`` (``cfg.resume_rl``).

        A build that was never continued gets its first segment here, from its own config.
        """
        old = self.rl
        first = old.segments or [RLSegment.of(self.config, old.steps, old.seconds)]
        added = RLSegment.of(cfg, more.steps, more.seconds, resumed_from=cfg.resume_rl, adam_restarted=True)
        return RLRecord(
            steps=old.steps + more.steps, prompts_seen=old.prompts_seen + more.prompts_seen,
            groups_guided=old.groups_guided + more.groups_guided, groups_updated=old.groups_updated + more.groups_updated,
            history=old.history + more.history, seconds=old.seconds + more.seconds, segments=first + [added],
            selected=more.selected,
        )
