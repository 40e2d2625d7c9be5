"""Importers for crosscoders trained elsewhere, converted to guardrail artifacts.

* The paper's checkpoints (``model.pt`` state dict with W_enc, W_dec, b_enc, b_dec and, for
  DFCs, enc_mask/dec_mask; ``config.json`` with activation_dim, dict_size, k, n_a, n_b;
  optionally ``hparams.json`` with layer, models and loss coefficients).
* dictionary_learning-style crosscoders (``encoder.weight`` [L, d, D], ``encoder.bias``,
  ``decoder.weight`` [L, D, d], ``decoder.bias`` [L, d]; BatchTopK variants add ``k`` and
  ``threshold``).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors only, no code runs.
Neither format stores normalisation statistics; pass them (``mean``/``std``) or the
artifact records identity normalisation and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from guardrail.dictionary.artifact import ArtifactError
from guardrail.dictionary.config import AuxKConfig, CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.dictionary.partition import Partition


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ArtifactError(f"checkpoint file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ArtifactError(f"{path} could not be read as a tensors-only checkpoint (weights_only=True): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path} is not a state dict of tensors")
    return state


def _require(state: dict[str, torch.Tensor], keys: list[str], path: Path) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}; found keys {sorted(state)}")


def _partition_from_masks(state: dict[str, torch.Tensor], dict_size: int, path: Path) -> Partition:
    """Derive (n_a, n_b) from dec_mask as the paper's loader does, then check both masks match."""
    if "dec_mask" not in state:
        return Partition(dict_size=dict_size, n_a=0, n_b=0)
    dec_mask = state["dec_mask"].bool()
    n_a = int((~dec_mask[:, 1]).sum())
    n_b = int((~dec_mask[n_a:, 0]).sum())
    part = Partition(dict_size=dict_size, n_a=n_a, n_b=n_b)
    if not torch.equal(dec_mask, part.decoder_mask()):
        raise ArtifactError(f"{path}: dec_mask is not the contiguous [A-excl | B-excl | shared] layout")
    if "enc_mask" in state and not torch.equal(state["enc_mask"].bool(), part.encoder_mask()):
        raise ArtifactError(f"{path}: enc_mask disagrees with dec_mask")
    return part


def _set_norm(cc: Crosscoder, mean: torch.Tensor | None, std: torch.Tensor | None) -> str:
    if mean is None and std is None:
        return "identity: the checkpoint carries no normalisation statistics; inputs must already be z-scored"
    if mean is None or std is None:
        raise ValueError("pass both mean and std, or neither")
    cc.set_normalization(mean, std)
    return "provided at import"


def import_paper_checkpoint(
    src: str | Path,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> tuple[Crosscoder, dict[str, Any]]:
    """Read a paper checkpoint folder; returns the crosscoder and manifest fields for ``save_artifact``."""
    root = Path(src)
    cfg_path, pt_path = root / "config.json", root / "model.pt"
    if not cfg_path.exists():
        raise ArtifactError(f"{root} lacks config.json (expected the paper's checkpoint folder)")
    pcfg = json.loads(cfg_path.read_text())
    hp_path = root / "hparams.json"
    hp = json.loads(hp_path.read_text()) if hp_path.exists() else {}
    state = _torch_load(pt_path)
    _require(state, ["W_enc", "W_dec", "b_enc", "b_dec"], pt_path)
    two, d, D = state["W_enc"].shape
    if two != 2 or tuple(state["W_dec"].shape) != (D, 2, d) or state["b_enc"].shape != (D,) or tuple(state["b_dec"].shape) != (2, d):
        raise ArtifactError(f"{pt_path}: unexpected shapes {({k: tuple(v.shape) for k, v in state.items()})}")
    for key, val in (("activation_dim", d), ("dict_size", D)):
        if key in pcfg and int(pcfg[key]) != val:
            raise ArtifactError(f"{cfg_path}: {key}={pcfg[key]} but the weights have {val}")
    part = _partition_from_masks(state, D, pt_path)
    k = int(pcfg.get("k", hp.get("k", 0)))
    config = CrosscoderConfig(
        d_model=d,
        dict_size=D,
        k=k,
        sparsity="topk",
        partition=part if not part.is_standard else None,
        lambda_shared=float(hp.get("sparsity_coef", 0.0)),
        lambda_excl=float(hp.get("exclusive_sparsity_coef", 0.0)),
        penalty_form="paper",
        exclusive_init_scale=1.0,
        aux_k=AuxKConfig(enabled=False),  # the paper trained without revival
    )
    cc = Crosscoder(config, seed=None)
    notes: list[str] = []
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(cc, name).copy_(state[name].float())
        before = cc.partition_violation()
        cc.apply_masks()  # the paper's forward multiplies by the masks, so this is the same function
    if before:
        notes.append(f"forbidden weights up to {before:.3g} were zeroed (the paper's forward masks them)")
    notes.append(_set_norm(cc, mean, std))
    fields: dict[str, Any] = {
        "model_a": hp.get("model_a"),
        "model_b": hp.get("model_b"),
        "layer": hp.get("layer"),
        "positions": "last_prompt",
        "source": {"kind": "paper-import", "path": str(root.resolve()), "notes": notes},
        "normalization_source": notes[-1],
        "training": {k: hp[k] for k in ("steps", "lr", "train_batch") if k in hp} or None,
    }
    return cc, fields


def _strip_compiled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split("_orig_mod.", 1)[-1]: v for k, v in state.items()}


def import_dictionary_learning(
    src: str | Path,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    k: int | None = None,
    swap_models: bool = False,
) -> tuple[Crosscoder, dict[str, Any]]:
    """Read a dictionary_learning ``CrossCoder`` / ``BatchTopKCrossCoder`` checkpoint (``.pt`` or folder).

    Its layer index 0 becomes model A; many model-diffing crosscoders put the base model
    first, so pass ``swap_models=True`` when index 0 is the base (B) model.

    BatchTopK crosscoders there threshold the code scaled by the summed decoder norms
    (``f * sum_m |d_i^m| > theta``); that is ``f > theta / sum_m |d_i^m|`` per feature,
    which is how the threshold is stored here.
    """
    state, meta = _read_dictionary_learning(Path(src))
    W_enc, W_dec = state["encoder.weight"], state["decoder.weight"]
    _, d, D = W_enc.shape
    sparsity, k_val, notes = _sparsity_of(state, meta, k)
    if swap_models:
        W_enc, W_dec = W_enc.flip(0), W_dec.flip(0)
        state = dict(state, **{"decoder.bias": state["decoder.bias"].flip(0)})
        notes.append("model order swapped: checkpoint index 0 is model B (mean/std are taken in guardrail's order, 0 = A)")
    config = CrosscoderConfig(d_model=d, dict_size=D, k=k_val, sparsity=sparsity, exclusive_init_scale=1.0,
                              aux_k=AuxKConfig(enabled=False))
    cc = Crosscoder(config, seed=None)
    with torch.no_grad():
        cc.W_enc.copy_(W_enc.float())
        cc.b_enc.copy_(state["encoder.bias"].float())
        cc.W_dec.copy_(W_dec.float().permute(1, 0, 2))
        cc.b_dec.copy_(state["decoder.bias"].float())
        if sparsity == "batchtopk":
            code_norm = W_dec.float().norm(dim=-1).sum(0).clamp(min=1e-12)  # [D]
            cc.threshold.copy_(float(state["threshold"]) / code_norm)
    notes.append(_set_norm(cc, mean, std))
    fields: dict[str, Any] = {
        "model_a": meta.get("model_a") or meta.get("lm_name"),
        "model_b": meta.get("model_b"),
        "layer": meta.get("layer"),
        "source": {"kind": "dictionary-learning-import", "path": str(Path(src).resolve()), "notes": notes},
        "normalization_source": notes[-1],
    }
    return cc, fields


def _read_dictionary_learning(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict (shapes checked) and the folder's config/hparams, from a file or a folder."""
    meta: dict[str, Any] = {}
    if path.is_dir():
        cands = [p for p in (path / "model.pt", path / "ae.pt", path / "crosscoder.pt") if p.exists()]
        if not cands:
            raise ArtifactError(f"{path} holds no model.pt / ae.pt / crosscoder.pt")
        for name in ("config.json", "hparams.json"):
            if (path / name).exists():
                meta.update(json.loads((path / name).read_text()))
        path = cands[0]
    state = _strip_compiled(_torch_load(path))
    state.pop("_hub_mixin_config", None)
    _require(state, ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"], path)
    W_enc, W_dec = state["encoder.weight"], state["decoder.weight"]
    if W_enc.dim() != 3 or W_enc.shape[0] != 2:
        raise ArtifactError(f"{path}: encoder.weight {tuple(W_enc.shape)} is not a two-model crosscoder [2, d, D]")
    _, d, D = W_enc.shape
    if tuple(W_dec.shape) != (2, D, d):
        raise ArtifactError(f"{path}: decoder.weight {tuple(W_dec.shape)} does not match [2, {D}, {d}]")
    return state, meta


def _sparsity_of(state: dict[str, torch.Tensor], meta: dict[str, Any], k: int | None) -> tuple[str, int | None, list[str]]:
    """BatchTopK when a k and a learned threshold are stored, top-k with a k only, else L1."""
    k_val = k if k is not None else (int(state["k"]) if "k" in state else meta.get("k"))
    threshold = state.get("threshold")
    if threshold is not None and threshold.numel() == 1 and float(threshold) >= 0 and k_val:
        return "batchtopk", int(k_val), []
    if k_val:
        notes = ["BatchTopK checkpoint without a learned threshold: per-sample top-k used at inference"] if threshold is not None else []
        return "topk", int(k_val), notes
    return "l1", None, []
