"""The crosscoder inference class (standard crosscoder and DFC).

It holds weights, the normalisation statistics and the sparsity rule, and answers
encode/decode questions. Training machinery (losses, AuxK, optimiser) lives in
``guardrail.training`` and only calls the selection and mask helpers defined here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.partition import Partition
from guardrail.dictionary.sparse import Codes

ARCHITECTURES: dict[str, type["Crosscoder"]] = {}


def register_architecture(name: str) -> Callable[[type["Crosscoder"]], type["Crosscoder"]]:
    """Class decorator: make an architecture loadable from an artifact by name."""

    def deco(cls: type["Crosscoder"]) -> type["Crosscoder"]:
        ARCHITECTURES[name] = cls
        return cls

    return deco


@register_architecture("crosscoder")
class Crosscoder(nn.Module):
    """Two-model crosscoder; a DFC when its config carries a partition with exclusive features.

    Works in normalised space: ``x = (x_raw - act_mean) / act_std`` per model and channel.
    Shapes: W_enc [2, d, D], b_enc [D], W_dec [D, 2, d], b_dec [2, d].
    """

    def __init__(self, config: CrosscoderConfig, *, seed: int | None = 0) -> None:
        super().__init__()
        if config.d_model is None:
            raise ValueError("CrosscoderConfig.d_model is not set (train() fills it from the data)")
        self.config = config
        d, D = config.d_model, config.dict_size
        self.W_enc = nn.Parameter(torch.zeros(2, d, D))
        self.b_enc = nn.Parameter(torch.zeros(D))
        self.W_dec = nn.Parameter(torch.zeros(D, 2, d))
        self.b_dec = nn.Parameter(torch.zeros(2, d))
        self.register_buffer("act_mean", torch.zeros(2, d))
        self.register_buffer("act_std", torch.ones(2, d))
        # BatchTopK inference threshold per feature (only used when sparsity == "batchtopk").
        self.register_buffer("threshold", torch.zeros(D))
        part = config.resolved_partition()
        self.register_buffer("enc_mask", part.encoder_mask(), persistent=False)
        self.register_buffer("dec_mask", part.decoder_mask(), persistent=False)
        self.manifest = None  # set by load_artifact
        if seed is not None:
            self.reset_parameters(seed)

    # ── construction ────────────────────────────────────────────────────

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """The paper's init (randn / sqrt(fan)), exclusive encoder columns scaled, masks applied."""
        g = torch.Generator().manual_seed(seed)
        d, D = self.d_model, self.dict_size
        self.W_enc.copy_(torch.randn(2, d, D, generator=g) / d**0.5)
        self.W_dec.copy_(torch.randn(D, 2, d, generator=g) / D**0.5)
        self.b_enc.zero_()
        self.b_dec.zero_()
        part = self.partition
        excl = slice(0, part.n_a + part.n_b)
        self.W_enc[:, :, excl] *= self.config.exclusive_init_scale
        self.apply_masks()

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dict_size(self) -> int:
        return self.W_enc.shape[2]

    @property
    def partition(self) -> Partition:
        return self.config.resolved_partition()

    @property
    def is_dfc(self) -> bool:
        return self.config.is_dfc

    # ── partition enforcement ───────────────────────────────────────────

    def _forbidden_views(self, tensors: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """Views of the forbidden blocks of (W_enc-shaped, W_dec-shaped) tensors.

        Only exclusive columns have forbidden entries: B's encoder/decoder for A-exclusive
        features and A's for B-exclusive ones, so zeroing touches n_a + n_b features, not D.
        """
        enc, dec = tensors
        p = self.partition
        a, b = slice(0, p.n_a), slice(p.n_a, p.n_a + p.n_b)
        return [enc[1, :, a], enc[0, :, b], dec[a, 1, :], dec[b, 0, :]]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the forbidden weights (B cannot encode/decode A-exclusive features, and vice versa)."""
        for view in self._forbidden_views((self.W_enc, self.W_dec)):
            view.zero_()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        if self.W_enc.grad is None or self.W_dec.grad is None:
            for name in ("W_enc", "W_dec"):
                g = getattr(self, name).grad
                if g is not None:
                    g.mul_(self.enc_mask.unsqueeze(1) if name == "W_enc" else self.dec_mask.unsqueeze(-1))
            return
        for view in self._forbidden_views((self.W_enc.grad, self.W_dec.grad)):
            view.zero_()

    @torch.no_grad()
    def partition_violation(self) -> float:
        """Largest absolute forbidden weight; 0.0 when the partition holds exactly."""
        enc = (self.W_enc * ~self.enc_mask.unsqueeze(1)).abs().max()
        dec = (self.W_dec * ~self.dec_mask.unsqueeze(-1)).abs().max()
        return float(torch.maximum(enc, dec))

    # ── normalisation ───────────────────────────────────────────────────

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.act_mean.shape or std.shape != self.act_std.shape:
            raise ValueError(f"normalisation stats must be {tuple(self.act_mean.shape)}, got {tuple(mean.shape)}/{tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("normalisation std must be positive everywhere")
        self.act_mean.copy_(mean.to(self.act_mean))
        self.act_std.copy_(std.to(self.act_std))

    def _stats(self, model: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if model is None:
            return self.act_mean, self.act_std
        if model not in (0, 1):
            raise ValueError(f"model must be 0 (A) or 1 (B), got {model}")
        return self.act_mean[model], self.act_std[model]

    def normalize(self, x_raw: torch.Tensor, model: int | None = None) -> torch.Tensor:
        """Raw residual activations -> the dictionary's space ([..., 2, d], or [..., d] with ``model``)."""
        mean, std = self._stats(model)
        return (x_raw - mean) / std

    def denormalize(self, x: torch.Tensor, model: int | None = None) -> torch.Tensor:
        mean, std = self._stats(model)
        return x * std + mean

    # ── encoding ────────────────────────────────────────────────────────

    def _check_input(self, x: torch.Tensor, paired: bool) -> None:
        want = (2, self.d_model) if paired else (self.d_model,)
        if tuple(x.shape[-len(want) :]) != want:
            raise ValueError(f"expected input [..., {', '.join(map(str, want))}], got {tuple(x.shape)}")

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [N, D] of normalised [N, 2, d] inputs (both models summed + b_enc)."""
        n = x.shape[0]
        return x.reshape(n, -1) @ self.W_enc.reshape(-1, self.dict_size) + self.b_enc

    @torch.no_grad()
    def select(self, pre: torch.Tensor, *, batch_rule: bool = False) -> Codes:
        """Active positions under the sparsity rule.

        ``batch_rule`` picks the training-time BatchTopK rule (top k*N over the batch);
        otherwise BatchTopK uses the learned per-feature threshold, so inference does not
        depend on what else is in the batch.
        """
        cfg = self.config
        if cfg.sparsity == "topk":
            return Codes.from_topk(self._topk_indices(pre), self.dict_size)
        if cfg.sparsity == "batchtopk":
            if batch_rule:
                n_sel = min(cfg.k * pre.shape[0], pre.numel())
                cutoff = pre.flatten().topk(n_sel, sorted=False).values.min()
                return Codes.from_mask((pre >= cutoff) & (pre > 0))
            return Codes.from_mask((pre > self.threshold) & (pre > 0))
        return Codes.from_mask(pre > 0)

    def _topk_indices(self, pre: torch.Tensor) -> torch.Tensor:
        """Indices [N, k] of the features the top-k rule selects (the one top-k, for training and inference).

        Joint (``k_exclusive`` None, the paper's rule): one top-k over all D pre-activations.
        An A-exclusive feature then competes with the shared features, whose pre-activations
        read B's activation too, so whether it survives depends on B although its own
        pre-activation does not.

        Per-partition (``k_exclusive = m``): m slots for the A-exclusive features, m for the
        B-exclusive ones and k - 2m for the shared ones, each a top-k within its own range.
        The A-exclusive selection reads only A-exclusive pre-activations, which B's masked
        encoder columns never feed, so single-model encoding of A gives its A-exclusive codes
        as the joint encoding does.

        Why an explicit m rather than k split in proportion to partition sizes: at the
        paper's sizes a proportional share is a fraction of a slot (k=45 with 5 % of 8192
        features gives 2.25), so rounding would decide whether exclusive features can fire
        at all, and the split would silently change whenever the partition shares change.
        How many model-specific features may be active per sample is a modelling choice; it
        is stated in the config and recorded with it in the artifact manifest.
        """
        cfg = self.config
        if cfg.k_exclusive is None:
            return pre.topk(cfg.k, dim=-1, sorted=False).indices
        part = self.partition
        ke = cfg.k_exclusive
        parts = [(part.a_exclusive, ke), (part.b_exclusive, ke), (part.shared, cfg.k - 2 * ke)]
        out = [pre[:, r.start : r.stop].topk(kk, dim=-1, sorted=False).indices + r.start for r, kk in parts if kk > 0]
        return torch.cat(out, dim=1)

    def _encode_pre(self, pre: torch.Tensor) -> torch.Tensor:
        codes = self.select(pre)
        return codes.dense(codes.gather(pre).clamp(min=0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [..., 2, d] -> sparse feature activations [..., D] (ReLU + sparsity rule)."""
        self._check_input(x, paired=True)
        lead = x.shape[:-2]
        f = self._encode_pre(self.preacts(x.reshape(-1, 2, self.d_model)))
        return f.reshape(*lead, self.dict_size)

    def encode_single(self, x: torch.Tensor, model: int) -> torch.Tensor:
        """Encode from one model's normalised activation [..., d]; the other model contributes zero.

        For a DFC served as model A the A-exclusive *pre-activations* equal the joint ones
        (B's encoder columns for them are masked to zero). Whether the *codes* do depends on
        the selection rule (``config.exclusive_codes_exact``): under the paper's joint top-k
        the shared features compete without B's half of their input, so a different set can
        survive and the A-exclusive codes are approximate; under per-partition top-k
        (``k_exclusive``), BatchTopK's inference thresholds or L1 they are exact. Shared
        features lose B's half of their input under every rule.
        """
        self._check_input(x, paired=False)
        if model not in (0, 1):
            raise ValueError(f"model must be 0 (A) or 1 (B), got {model}")
        lead = x.shape[:-1]
        pre = x.reshape(-1, self.d_model) @ self.W_enc[model] + self.b_enc
        return self._encode_pre(pre).reshape(*lead, self.dict_size)

    # ── decoding ────────────────────────────────────────────────────────

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Features [..., D] -> normalised reconstruction [..., 2, d]."""
        if f.shape[-1] != self.dict_size:
            raise ValueError(f"expected features [..., {self.dict_size}], got {tuple(f.shape)}")
        lead = f.shape[:-1]
        out = f.reshape(-1, self.dict_size) @ self.W_dec.reshape(self.dict_size, -1) + self.b_dec.reshape(-1)
        return out.reshape(*lead, 2, self.d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [..., 2, d] -> (reconstruction [..., 2, d], features [..., D])."""
        f = self.encode(x)
        return self.decode(f), f

    def decoder_directions(self, model: int, raw: bool = False) -> torch.Tensor:
        """[D, d] decoder rows for one model; ``raw`` maps them into the model's residual space."""
        if model not in (0, 1):
            raise ValueError(f"model must be 0 (A) or 1 (B), got {model}")
        dirs = self.W_dec[:, model, :]
        return dirs * self.act_std[model] if raw else dirs

    def decoder_norms(self) -> torch.Tensor:
        """[D, 2] L2 norm of each feature's decoder row per model."""
        return self.W_dec.norm(dim=-1)

    def relative_decoder_norm(self) -> torch.Tensor:
        """[D] ||d^A|| / (||d^A|| + ||d^B||): 1 = writes only to A, 0 = only to B."""
        n = self.decoder_norms()
        return n[:, 0] / n.sum(-1).clamp(min=1e-12)

    def extra_repr(self) -> str:
        p = self.partition
        kind = f"DFC(n_a={p.n_a}, n_b={p.n_b}, shared={p.n_shared})" if self.is_dfc else "standard"
        return f"d_model={self.d_model}, dict_size={self.dict_size}, sparsity={self.config.sparsity}, k={self.config.k}, {kind}"
