"""Crosscoder artifacts: ``crosscoder.safetensors`` + ``manifest.json``, verified on load.

Never pickle: tensors go through safetensors, everything else is JSON validated by pydantic.
The manifest records the sha256 of the tensor file and of every tensor, and a digest of
itself; ``load_artifact`` refuses a folder where any of them disagree, or where a DFC's
forbidden weights are not exactly zero.

Artifacts are files strangers publish, so everything is checked *before* a tensor is
allocated or used: a folder holding pickle-format files is refused without opening them;
the manifest's sizes are bounded and must agree with its architecture, its tensor list
and the safetensors header; the file size must be exactly what the header declares.
Only then is the file hashed (streamed) and read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
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
from guardrail.fileio import fsync_replace, sha256_file, write_atomic

TENSORS_FILE = "crosscoder.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "guardrail.crosscoder"
FORMAT_VERSION = 1


# Files guardrail refuses to find in an artifact folder: they are (or may be) pickles,
# and unpickling runs code. Convert a checkpoint you trust with the importers instead.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
MAX_MANIFEST_BYTES = 64 << 20  # normalisation stats of d=65536 take ~3 MB of JSON
MAX_HEADER_BYTES = 16 << 20
MAX_D_MODEL = 1 << 16
MAX_DICT_SIZE = 1 << 24
DEFAULT_MAX_ARTIFACT_BYTES = 64 << 30
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class ArtifactError(ValueError):
    """The artifact folder is missing, malformed, or does not match its manifest."""


def max_artifact_bytes() -> int:
    """Largest tensor payload ``load_artifact`` accepts (env ``GUARDRAIL_MAX_ARTIFACT_BYTES``)."""
    raw = os.environ.get("GUARDRAIL_MAX_ARTIFACT_BYTES")
    try:
        return int(raw) if raw else DEFAULT_MAX_ARTIFACT_BYTES
    except ValueError:
        raise ArtifactError(f"GUARDRAIL_MAX_ARTIFACT_BYTES={raw!r} is not an integer number of bytes") from None


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
    tensors_file: str = Field(default=TENSORS_FILE, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\.safetensors$")  # a file in the folder, never a path
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
    file_sha = sha256_file(tmp)
    fsync_replace(tmp, out / TENSORS_FILE)

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
    write_atomic(out / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
    cc.manifest = manifest
    return out


def read_manifest(path: str | Path) -> ArtifactManifest:
    """Parse and self-check ``manifest.json`` of an artifact folder (tensors not read)."""
    root = Path(path)
    mpath = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder")
    _refuse_pickles(root)
    if not mpath.exists():
        raise ArtifactError(f"{root} has no {MANIFEST_FILE}; not a guardrail crosscoder artifact")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{mpath} is {size} bytes, above the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
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
    if not tpath.is_file():
        raise ArtifactError(f"{root} lacks its tensor file {manifest.tensors_file}")
    cls = ARCHITECTURES.get(manifest.architecture)
    if cls is None:
        raise ArtifactError(f"unknown architecture {manifest.architecture!r}; known: {sorted(ARCHITECTURES)}")
    _check_declared_sizes(manifest, cls, root)
    _check_safetensors_header(tpath, manifest)
    if sha256_file(tpath) != manifest.tensors_sha256:
        raise ArtifactError(f"{tpath} does not match the sha256 in its manifest: the file was modified or damaged")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{tpath} is not a readable safetensors file: {exc}") from exc
    _verify_tensors(tensors, manifest, tpath)
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


# --------------------------------------------------------------------------- hostile-file checks
def _refuse_pickles(root: Path) -> None:
    """Refuse a folder holding pickle-format files, without opening them."""
    found = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise ArtifactError(
            f"{root} contains pickle-format file(s) {found}; guardrail never unpickles artifact files. "
            f"An artifact is {TENSORS_FILE} + {MANIFEST_FILE} only: remove them, or convert a checkpoint you trust "
            "with `guardrail import-paper` / `guardrail import-dictionary-learning` (tensors-only loading)."
        )


def _check_declared_sizes(manifest: ArtifactManifest, cls: type, root: Path) -> None:
    """Bound the manifest's sizes and check they agree with each other, before any allocation."""
    d, D = manifest.d_model, manifest.dict_size
    if not 0 < d <= MAX_D_MODEL:
        raise ArtifactError(f"{root}: manifest d_model={d} is outside 1..{MAX_D_MODEL}")
    if not 0 < D <= MAX_DICT_SIZE:
        raise ArtifactError(f"{root}: manifest dict_size={D} is outside 1..{MAX_DICT_SIZE}")
    checks = (("config.d_model", manifest.config.d_model, "d_model", d), ("config.dict_size", manifest.config.dict_size, "dict_size", D),
              ("partition.dict_size", manifest.partition.dict_size, "dict_size", D))
    for field, value, ref, expected in checks:
        if value != expected:
            raise ArtifactError(f"{root}: manifest {field}={value} disagrees with {ref}={expected}")
    for name in ("mean", "std"):
        rows = getattr(manifest.normalization, name)
        if len(rows) != 2 or any(len(r) != d for r in rows):
            raise ArtifactError(f"{root}: manifest normalization.{name} is not [2, {d}]")
    total = 0
    for name, info in manifest.tensors.items():
        if info.dtype not in _DTYPE_BYTES or any(n < 0 for n in info.shape):
            raise ArtifactError(f"{root}: manifest tensor {name!r} has dtype {info.dtype!r} / shape {info.shape}, which guardrail does not load")
        total += math.prod(info.shape) * _DTYPE_BYTES[info.dtype]
    limit = max_artifact_bytes()
    if total > limit:
        raise ArtifactError(f"{root}: manifest declares {total} bytes of tensors, above the {limit}-byte limit (GUARDRAIL_MAX_ARTIFACT_BYTES)")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected_shapes = {k: list(v.shape) for k, v in cls(manifest.config, seed=None).state_dict().items()}
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"{root}: manifest config does not describe a buildable {manifest.architecture}: {exc}") from exc
    declared = {k: v.shape for k, v in manifest.tensors.items()}
    if declared != expected_shapes:
        diff = {k: (declared.get(k), expected_shapes.get(k)) for k in sorted(set(declared) | set(expected_shapes)) if declared.get(k) != expected_shapes.get(k)}
        raise ArtifactError(
            f"{root}: manifest tensor shapes do not fit a {manifest.architecture} with d_model={d}, dict_size={D} "
            f"(name: (declared, expected)) {diff}"
        )


def _check_safetensors_header(tpath: Path, manifest: ArtifactManifest) -> None:
    """Read only the safetensors header; it must list the manifest's tensors and cover the file exactly."""
    size = tpath.stat().st_size
    with open(tpath, "rb") as fh:
        head = fh.read(8)
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            raise ArtifactError(f"{tpath} is a pickle/zip checkpoint, not safetensors; refused without loading it")
        if len(head) < 8:
            raise ArtifactError(f"{tpath} is {size} bytes: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ArtifactError(f"{tpath} declares a {n}-byte safetensors header in a {size}-byte file; refused")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{tpath} has no valid safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{tpath} has no valid safetensors header")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(entries) != set(manifest.tensors):
        raise ArtifactError(f"{tpath} holds tensors {sorted(entries)} but the manifest lists {sorted(manifest.tensors)}")
    data_bytes = 0
    for name, entry in entries.items():
        info = manifest.tensors[name]
        if not isinstance(entry, dict) or _SAFETENSORS_DTYPES.get(str(entry.get("dtype"))) != info.dtype or entry.get("shape") != info.shape:
            raise ArtifactError(f"tensor {name!r} in {tpath} is declared {entry!r} in the file but {info.dtype} {info.shape} in the manifest")
        data_bytes += math.prod(info.shape) * _DTYPE_BYTES[info.dtype]
    if 8 + n + data_bytes != size:
        raise ArtifactError(f"{tpath} is {size} bytes but its header declares {8 + n + data_bytes}; refused")


