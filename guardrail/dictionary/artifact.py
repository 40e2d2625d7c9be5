"""Crosscoder artifacts: ``crosscoder.safetensors`` + ``manifest.json``, verified on load.

Never pickle: tensors go through safetensors, everything else is JSON validated by pydantic.
The manifest records the sha256 of the tensor file and of every tensor, and a digest of
itself; ``load_artifact`` refuses a folder where any of them disagree, or where a DFC's
forbidden weights are not exactly zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import guardrail
from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import ARCHITECTURES, Crosscoder
from guardrail.dictionary.partition import Partition

TENSORS_FILE = "crosscoder.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "guardrail.crosscoder"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """The artifact folder is missing, malformed, or does not match its manifest."""


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str
    sha256: str


class Normalization(BaseModel):
    """Per-channel z-score statistics the dictionary expects its inputs normalised with."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zscore"] = "zscore"
    source: str = "training data"
    mean: list[list[float]]  # [2, d]
    std: list[list[float]]  # [2, d]


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["trained", "paper-import", "dictionary-learning-import", "other"] = "trained"
    path: str | None = None
    notes: list[str] = []


class ArtifactManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["guardrail.crosscoder"] = FORMAT
    format_version: int = FORMAT_VERSION
    guardrail_version: str = guardrail.__version__
    created_at: str = Field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    architecture: str
    kind: Literal["dfc", "crosscoder"]
    model_a: str | None = None
    model_b: str | None = None
    layer: int | None = None
    positions: str | None = None
    d_model: int
    dict_size: int
    sparsity: str
    k: int | None
    partition: Partition
    config: CrosscoderConfig
    normalization: Normalization
    training_data_hash: str | None = None
    training: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    source: Source = Field(default_factory=Source)
    tensors_file: str = TENSORS_FILE
    tensors_sha256: str
    tensors: dict[str, TensorInfo]
    manifest_sha256: str = ""

    def digest(self) -> str:
        """sha256 of the canonical JSON of every field except ``manifest_sha256``."""
        payload = self.model_dump(mode="json", exclude={"manifest_sha256"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return _sha256_bytes(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _state_tensors(cc: Crosscoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in cc.state_dict().items()}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_artifact(cc: Crosscoder, out_dir: str | Path, **manifest_fields: Any) -> Path:
    """Write ``cc`` to ``out_dir`` (created); returns the folder.

    ``manifest_fields`` fill the descriptive manifest fields (model_a, model_b, layer,
    positions, training_data_hash, training, metrics, source, normalization source...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    violation = cc.partition_violation()
    if violation != 0.0:
        raise ArtifactError(f"refusing to save: partition integrity broken (max forbidden weight {violation:.3g})")
    tensors = _state_tensors(cc)
    tmp = out / f".{TENSORS_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    with open(tmp, "rb") as fh:
        file_sha = _sha256_bytes(fh.read())
    os.replace(tmp, out / TENSORS_FILE)

    norm_source = manifest_fields.pop("normalization_source", "training data")
    src = manifest_fields.get("source")
    if isinstance(src, str):  # a free-text note about where the dictionary came from
        manifest_fields["source"] = Source(kind="trained", notes=[src])
    elif isinstance(src, dict):
        manifest_fields["source"] = Source(**src)
    cfg = cc.config
    manifest = ArtifactManifest(
        architecture=cfg.architecture,
        kind="dfc" if cc.is_dfc else "crosscoder",
        d_model=cc.d_model,
        dict_size=cc.dict_size,
        sparsity=cfg.sparsity,
        k=cfg.k,
        partition=cc.partition,
        config=cfg,
        normalization=Normalization(source=norm_source, mean=cc.act_mean.tolist(), std=cc.act_std.tolist()),
        tensors_sha256=file_sha,
        tensors={k: TensorInfo(shape=list(v.shape), dtype=str(v.dtype).removeprefix("torch."), sha256=tensor_sha256(v)) for k, v in tensors.items()},
        **manifest_fields,
    )
    manifest.manifest_sha256 = manifest.digest()
    _write_atomic(out / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
    cc.manifest = manifest
    return out


def read_manifest(path: str | Path) -> ArtifactManifest:
    """Parse and self-check ``manifest.json`` of an artifact folder (tensors not read)."""
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder")
    if not mpath.exists():
        raise ArtifactError(f"{root} has no {MANIFEST_FILE}; not a guardrail crosscoder artifact")
    try:
        manifest = ArtifactManifest.model_validate_json(mpath.read_bytes())
    except ValidationError as exc:
        raise ArtifactError(f"{mpath} is not a valid crosscoder manifest: {exc}") from exc
    if manifest.manifest_sha256 != manifest.digest():
        raise ArtifactError(f"{mpath} was modified after it was written (manifest digest mismatch)")
    return manifest


def load_artifact(path: str | Path, *, device: str | torch.device = "cpu") -> Crosscoder:
    """Load and verify an artifact folder; the manifest is at ``cc.manifest``."""
    root = Path(path)
    manifest = read_manifest(root)
    tpath = root / manifest.tensors_file
    if not tpath.exists():
        raise ArtifactError(f"{root} lacks its tensor file {manifest.tensors_file}")
    data = tpath.read_bytes()
    if _sha256_bytes(data) != manifest.tensors_sha256:
        raise ArtifactError(f"{tpath} does not match the sha256 in its manifest: the file was modified or damaged")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{tpath} is not a readable safetensors file: {exc}") from exc
    _verify_tensors(tensors, manifest, tpath)
    cls = ARCHITECTURES.get(manifest.architecture)
    if cls is None:
        raise ArtifactError(f"unknown architecture {manifest.architecture!r}; known: {sorted(ARCHITECTURES)}")
    cc = cls(manifest.config, seed=None)
    try:
        cc.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{tpath} tensors do not fit the {manifest.architecture} architecture: {exc}") from exc
    if not torch.equal(cc.act_mean, torch.tensor(manifest.normalization.mean)) or not torch.equal(
        cc.act_std, torch.tensor(manifest.normalization.std)
    ):
        raise ArtifactError(f"{root}: normalisation stats in the manifest differ from the stored tensors")
    violation = cc.partition_violation()
    if violation != 0.0:
        raise ArtifactError(f"{root}: partition integrity broken (max forbidden weight {violation:.3g})")
    cc.manifest = manifest
    return cc.to(device).eval()


def _verify_tensors(tensors: dict[str, torch.Tensor], manifest: ArtifactManifest, tpath: Path) -> None:
    if set(tensors) != set(manifest.tensors):
        raise ArtifactError(f"{tpath} holds tensors {sorted(tensors)} but the manifest lists {sorted(manifest.tensors)}")
    for name, info in manifest.tensors.items():
        t = tensors[name]
        if list(t.shape) != info.shape or tensor_sha256(t) != info.sha256:
            raise ArtifactError(f"tensor {name!r} in {tpath} does not match its manifest entry (shape or sha256)")
