"""The one intervention math: steer, clamp, splice and alert on a crosscoder's feature space.

Every engine (transformers hooks, the vLLM worker hook), the eval harness and the audit call
these functions, so a policy means the same thing wherever it runs. Everything here is a
pure function of tensors: no hooks, no models, no I/O.

Conventions (the paper's; ``docs/architecture.md`` has the data flow):
- Activations ``x`` are *raw* residual-stream rows ``[N, d]`` of model A (index 0) at the
  crosscoder's site. The dictionary works in z-scored space; :class:`DictionaryView`
  carries what is needed to go back and forth.
- Feature activations ``f`` come from the encoding *after* the sparsity rule (top-k /
  threshold): a selected feature that did not fire contributes nothing to a scale-mode steer.
- Edits are deltas added to A's raw activation (never to the reconstruction), except splice,
  which replaces the activation by the reconstruction (optionally keeping the error term).

Single-model encoding: a served model only has its own activation. ``encode_single`` uses
A's encoder half alone. For a DFC, A-exclusive features have zero B encoder columns, so
their single-model *pre-activations* equal the joint ones; shared features lose B's
contribution. Under the paper's joint top-k the shared features also decide which
A-exclusive features survive the selection, so the A-exclusive *codes* are approximate;
with per-partition top-k (``k_exclusive``) they are exact. :func:`compare_encodings`
measures the difference per partition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from guardrail.paper import MODEL_A

EncodingMode = Literal["single", "joint"]


# --------------------------------------------------------------------------- dictionary view
@dataclass(frozen=True)
class DictionaryView:
    """The tensors of one side (model A) of a crosscoder that interventions need.

    Extracted once per policy so that the per-token path does no attribute lookups. ``cc``
    keeps the crosscoder itself for its encode rule (top-k / threshold / ReLU).
    """

    cc: Any
    model: int
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    w_enc: torch.Tensor  # [d, D] encoder half of `model`
    b_enc: torch.Tensor  # [D]
    w_dec: torch.Tensor  # [D, d] decoder half of `model` (normalised space)
    b_dec: torch.Tensor  # [d] (normalised space)
    dirs_raw: torch.Tensor  # [D, d] decoder directions in raw residual space
    typical_norm: float  # expected ‖x_raw‖ at the site, from the normalisation stats

    @property
    def dict_size(self) -> int:
        return int(self.b_enc.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[0])


@torch.no_grad()
def dictionary_view(cc: Any, model: int = MODEL_A) -> DictionaryView:
    """Read the tensors of ``model``'s half of a crosscoder (see the Crosscoder contract)."""
    mean = cc.act_mean[model].detach().float()
    std = cc.act_std[model].detach().float()
    w_dec = cc.W_dec[:, model, :].detach().float()
    dirs = cc.decoder_directions(model, raw=True).detach().float() if hasattr(cc, "decoder_directions") else w_dec * std
    # E‖x‖² = Σ_j (mean_j² + std_j²): the site's typical norm without needing data.
    typical = float(torch.sqrt((mean.pow(2) + std.pow(2)).sum()))
    return DictionaryView(
        cc=cc,
        model=model,
        mean=mean,
        std=std,
        w_enc=cc.W_enc[model].detach().float(),
        b_enc=cc.b_enc.detach().float(),
        w_dec=w_dec,
        b_dec=cc.b_dec[model].detach().float(),
        dirs_raw=dirs,
        typical_norm=typical,
    )


# --------------------------------------------------------------------------- encoding
def normalize(view: DictionaryView, x_raw: torch.Tensor) -> torch.Tensor:
    return (x_raw - view.mean) / view.std


def denormalize(view: DictionaryView, x: torch.Tensor) -> torch.Tensor:
    return x * view.std + view.mean


@torch.no_grad()
def encode(view: DictionaryView, x_a_raw: torch.Tensor, x_b_raw: torch.Tensor | None = None) -> torch.Tensor:
    """Features ``[N, D]`` after the crosscoder's sparsity rule.

    ``x_b_raw`` given → the paper's joint encoding (both models' activations); otherwise the
    single-model encoding from A alone (``encode_single``).
    """
    cc = view.cc
    if x_b_raw is None:
        return cc.encode_single(normalize(view, x_a_raw), model=view.model).float()
    if view.model != MODEL_A:
        raise ValueError("joint encoding expects the view of model A (index 0)")
    x_raw = torch.stack([x_a_raw, x_b_raw], dim=-2)
    return cc.encode(cc.normalize(x_raw)).float()


@torch.no_grad()
def pre_activations(view: DictionaryView, x_a_raw: torch.Tensor, idx: torch.Tensor, x_b_raw: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder pre-activations ``[N, k]`` of features ``idx`` (before ReLU / top-k)."""
    pre = normalize(view, x_a_raw) @ view.w_enc[:, idx] + view.b_enc[idx]
    if x_b_raw is not None:
        other = view.cc
        mean_b, std_b = other.act_mean[1].float(), other.act_std[1].float()
        pre = pre + ((x_b_raw - mean_b) / std_b) @ other.W_enc[1][:, idx].float()
    return pre


@torch.no_grad()
def reconstruct(view: DictionaryView, f: torch.Tensor) -> torch.Tensor:
    """A's raw reconstruction ``x̂ [N, d]`` from features ``f [N, D]``."""
    return denormalize(view, f @ view.w_dec + view.b_dec)


# --------------------------------------------------------------------------- edits (deltas)
def steer_scale_delta(f: torch.Tensor, idx: torch.Tensor, dirs_raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's steer: δ = Σ_{i∈S} (α−1)·f_i·d_i (raw decoder directions).

    α=1 is the identity; α=0 removes the features' decoded contribution; a feature that did
    not fire (f_i = 0 after top-k) contributes nothing.
    """
    return (alpha - 1.0) * (f[:, idx] @ dirs_raw[idx])


def steer_additive_delta(n: int, idx: torch.Tensor, dirs_raw: torch.Tensor, gain: float, typical_norm: float) -> torch.Tensor:
    """Additive steer: δ = g·‖x‖_typ·Σ_i d_i/‖d_i‖, the same for every token.

    Scaling by the site's typical norm makes ``gain`` a fraction of the residual's size, so a
    policy transfers between models whose residual scales differ.
    """
    d = dirs_raw[idx]
    unit = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (gain * typical_norm * unit.sum(0)).expand(n, -1)


def clamp_delta_decoder(f: torch.Tensor, idx: torch.Tensor, dirs_raw: torch.Tensor, value: float) -> torch.Tensor:
    """Reconstruction-space clamp: δ = Σ_i (v − f_i)·d_i (what the decoder would add)."""
    return (value - f[:, idx]) @ dirs_raw[idx]


def clamp_delta_encoder(
    view: DictionaryView,
    x_a_raw: torch.Tensor,
    idx: torch.Tensor,
    value: float,
    x_b_raw: torch.Tensor | None = None,
    iterations: int = 4,
) -> torch.Tensor:
    """Clamp so that *re-encoding* the edited activation gives ``value`` for features ``idx``.

    The edit is the smallest one (L2, in the dictionary's normalised space) that sets the
    pre-activations of the features that need moving to the target: δ = E_A·c with
    (E_Aᵀ E_A)·c = target − pre_A, E_A the encoder columns of those features. The encoder
    Gram matrix is well conditioned for distinct features, unlike a solve restricted to the
    decoder span (e_i·w_j), which blows up on dictionaries whose encoder and decoder are
    not aligned. For ``value == 0`` only features with a positive pre-activation move, to a
    small negative target so ReLU gives an exact zero; the solve repeats because moving
    some features can lift others. Features A cannot encode (B-exclusive) are left alone.
    """
    target = -1e-4 if value == 0 else float(value)
    enc = view.w_enc[:, idx]  # [d, k]
    gram = enc.T @ enc  # [k, k]
    encodable = enc.abs().sum(0) > 0
    n, k = x_a_raw.shape[0], idx.numel()
    coef = torch.zeros(n, k, dtype=x_a_raw.dtype)
    eye = torch.eye(k, dtype=gram.dtype)
    for _ in range(iterations):
        delta = (coef @ enc.T) * view.std
        pre = pre_activations(view, x_a_raw + delta, idx, x_b_raw)
        need = (pre > 0) if value == 0 else ((pre - target).abs() > 1e-6)
        need = need & encodable
        if not bool(need.any()):
            break
        pair = need.unsqueeze(-1) & need.unsqueeze(-2)
        sys = torch.where(pair, gram.expand(n, k, k), eye.expand(n, k, k))
        rhs = torch.where(need, target - pre, torch.zeros_like(pre))
        step = torch.linalg.solve(sys, rhs.unsqueeze(-1)).squeeze(-1)
        coef = coef + torch.where(need, step, torch.zeros_like(step))
    return (coef @ enc.T) * view.std


def splice(x_raw: torch.Tensor, x_hat: torch.Tensor, keep_error: bool, x_hat_edited: torch.Tensor | None = None) -> torch.Tensor:
    """Replace the activation by the reconstruction.

    Without the error term this is the paper's splice (x → x̂). With it, x → x̂' + (x − x̂):
    only the feature edits carried by ``x_hat_edited`` reach the model, the part of x the
    dictionary cannot explain is kept.
    """
    new = x_hat if x_hat_edited is None else x_hat_edited
    return new + (x_raw - x_hat) if keep_error else new


def alert_mask(f: torch.Tensor, idx: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool ``[N, k]``: feature ``idx[j]`` is strictly above ``threshold`` at token n."""
    return f[:, idx] > threshold


@torch.no_grad()
def alert_candidates(view: DictionaryView, x_a_raw: torch.Tensor, idx: torch.Tensor, threshold: float,
                     x_b_raw: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[N]``: some feature of ``idx`` *could* be above ``threshold`` (≥ 0) at token n.

    Every sparsity rule keeps a feature at its ReLU'd pre-activation or zeroes it, so
    ``f_i ≤ max(pre_i, 0)``: tokens where no selected pre-activation exceeds the threshold
    cannot alert, and a monitor skips the full ``[N, D]`` encoding for them. Exact, and
    cheap: ``k`` encoder columns instead of ``D``.
    """
    return (pre_activations(view, x_a_raw, idx, x_b_raw) > threshold).any(dim=-1)


def top_features(values: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor, limit: int) -> list[list[list]]:
    """Per row, up to ``limit`` ``[feature id, value]`` pairs of ``idx`` where ``keep``, largest first.

    ``values``/``keep`` are ``[N, k]`` (the activations of features ``idx``); one sort and
    one ``tolist`` for the whole batch, because events are built on the request path.
    """
    if values.numel() == 0:
        return [[] for _ in range(values.shape[0])]
    masked = torch.where(keep, values, torch.full_like(values, float("-inf")))
    top = masked.topk(min(limit, values.shape[1]), dim=-1)
    ids, vals, ok = idx[top.indices].tolist(), top.values.tolist(), (top.values > float("-inf")).tolist()
    return [[[i, round(v, 6)] for i, v, o in zip(ri, rv, ro) if o] for ri, rv, ro in zip(ids, vals, ok)]


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool ``[N]``: the row has no NaN/Inf."""
    return torch.isfinite(x).all(dim=-1)


def sanitize(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keep ``old`` wherever ``new`` has a non-finite value: no NaN/Inf ever enters the model.

    Returns the safe tensor and how many rows were reverted (the caller counts them).
    """
    ok = finite_rows(new)
    bad = int((~ok).sum())
    if bad == 0:
        return new, 0
    return torch.where(ok.unsqueeze(-1), new, old), bad


# --------------------------------------------------------------------------- single vs joint
@torch.no_grad()
def compare_encodings(cc: Any, acts: torch.Tensor, partition: Any | None = None, batch: int = 4096) -> dict[str, Any]:
    """How single-model (A only) features differ from the joint encoding, per partition.

    ``acts`` is ``[N, 2, d]`` raw paired activations (held-out rows). For each partition
    reports: max |f_single − f_joint|, relative L2 error, Pearson r over all (row, feature)
    pairs, and the Jaccard overlap of the active sets. ``exclusive_codes_exact`` says whether
    the A-exclusive rows must show zero difference (per-partition top-k, thresholds, L1);
    under the joint top-k they differ where the selection does. Shared features show what a
    served single model loses.
    """
    view = dictionary_view(cc, MODEL_A)
    singles, joints = [], []
    for start in range(0, acts.shape[0], batch):
        chunk = acts[start : start + batch].float()
        singles.append(encode(view, chunk[:, 0]))
        joints.append(encode(view, chunk[:, 0], chunk[:, 1]))
    fs, fj = torch.cat(singles), torch.cat(joints)
    groups: dict[str, torch.Tensor] = {"all": torch.arange(fs.shape[1])}
    if partition is not None:
        for name in ("a_exclusive", "b_exclusive", "shared"):
            groups[name] = torch.as_tensor(list(getattr(partition, name)), dtype=torch.long)
    out: dict[str, Any] = {"n_rows": int(fs.shape[0]), "exclusive_codes_exact": bool(cc.config.exclusive_codes_exact)}
    for name, idx in groups.items():
        if idx.numel() == 0:
            continue
        a, b = fs[:, idx], fj[:, idx]
        act_a, act_b = a > 0, b > 0
        union = (act_a | act_b).sum().item()
        diff = a - b
        denom = b.norm().item()
        ac, bc = a.flatten() - a.mean(), b.flatten() - b.mean()
        r = (ac @ bc / (ac.norm() * bc.norm()).clamp_min(1e-12)).item()
        out[name] = {
            "n_features": int(idx.numel()),
            "max_abs_diff": float(diff.abs().max()),
            "rel_l2_error": float(diff.norm().item() / denom) if denom > 0 else 0.0,
            "pearson_r": r,
            "active_jaccard": float((act_a & act_b).sum().item() / union) if union else 1.0,
            "fire_rate_single": float(act_a.float().mean()),
            "fire_rate_joint": float(act_b.float().mean()),
        }
    return out
