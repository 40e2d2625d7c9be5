"""Resumable training checkpoints, safe against ``kill -9``.

A checkpoint is ``step-XXXXXXXX.safetensors`` (model, optimiser and trainer tensors) plus
``step-XXXXXXXX.json`` (step, configs, optimiser hyper-parameters, history, file sha256),
each written to a temporary name, fsynced and renamed; ``latest.json`` is then replaced
atomically to point at it. A process killed at any moment leaves the previous checkpoint
intact and referenced. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from guardrail.fileio import fsync_replace, sha256_file, write_atomic

LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or belongs to a different run."""


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(payload, indent=1, sort_keys=True))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Adam state flattened to named tensors + JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"opt.{pid}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    # Fused kernels walk memory linearly: moment buffers must share their parameter's strides.
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                if isinstance(val, torch.Tensor) and val.shape == p.shape and val.stride() != p.stride():
                    opt.state[p][key] = torch.empty_strided(p.shape, p.stride(), dtype=val.dtype).copy_(val)


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step-{step:08d}"
    tpath = folder / f"{stem}.safetensors"
    tmp = folder / f".{stem}.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    fsync_replace(tmp, tpath)
    meta = dict(meta, step=step, tensors_sha256=sha256_file(tpath), tensors_file=tpath.name)
    _write_json(folder / f"{stem}.json", meta)
    _write_json(folder / LATEST, {"step": step, "meta": f"{stem}.json"})
    _prune(folder, keep)
    return tpath


def _prune(folder: Path, keep: int) -> None:
    stems = sorted({p.name.split(".")[0] for p in folder.glob("step-*.json")})
    for stem in stems[:-keep]:
        for suffix in (".safetensors", ".json"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _pointer(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint's pointer (``step`` and its ``meta`` file), or None if there is none."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    try:
        latest = json.loads(pointer.read_text())
        return {"step": int(latest["step"]), "meta": str(latest["meta"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint pointer {pointer} is unreadable: {exc}") from exc


def latest_step(folder: Path) -> int:
    """The step of the newest checkpoint in ``folder`` (0 if there is none), read from its pointer alone.

    A one-pass sweep groups runs by the step they resume at before it loads any of them.
    """
    latest = _pointer(folder)
    return 0 if latest is None else int(latest["step"])


def load_latest(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint in ``folder``, or None if there is none."""
    latest = _pointer(folder)
    if latest is None:
        return None
    try:
        meta = json.loads((folder / latest["meta"]).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint pointer {folder / LATEST} is unreadable: {exc}") from exc
    tpath = folder / meta["tensors_file"]
    if not tpath.exists() or sha256_file(tpath) != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint {tpath} is missing or does not match its recorded sha256")
    return load_file(str(tpath)), meta
