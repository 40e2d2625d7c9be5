"""A dense reference of the paper's DFC (``dfc.py`` of Antebe/model_diffing_crosscoders).

Masked einsum encode, per-sample top-k, dense einsum decode, masks re-applied after every
step. Used to check the fast sparse path (gradients, reconstructions, imports) and as the
baseline of ``benchmarks/bench_training.py``. Not used for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PaperDFC(nn.Module):
    """Same parameter names and buffers as the paper's ``DFCCrossCoder`` state dict."""

    def __init__(self, activation_dim: int, dict_size: int, k: int, n_a: int, n_b: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.activation_dim, self.dict_size, self.k = activation_dim, dict_size, k
        self.n_a, self.n_b = n_a, n_b
        self.a_end, self.b_end = n_a, n_a + n_b
        self.W_enc = nn.Parameter(torch.randn(2, activation_dim, dict_size, generator=g) / activation_dim**0.5)
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.randn(dict_size, 2, activation_dim, generator=g) / dict_size**0.5)
        self.b_dec = nn.Parameter(torch.zeros(2, activation_dim))
        enc_mask = torch.ones(2, dict_size)
        enc_mask[1, : self.a_end] = 0
        enc_mask[0, self.a_end : self.b_end] = 0
        self.register_buffer("enc_mask", enc_mask)
        self.register_buffer("dec_mask", enc_mask.T.contiguous())
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        self.W_enc.mul_(self.enc_mask.unsqueeze(1))
        self.W_dec.mul_(self.dec_mask.unsqueeze(-1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        W = self.W_enc * self.enc_mask.unsqueeze(1)
        pre = F.relu(torch.einsum("bmd,mdf->bf", x, W) + self.b_enc)
        vals, idx = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        W = self.W_dec * self.dec_mask.unsqueeze(-1)
        return torch.einsum("bf,fmd->bmd", f, W) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def loss(self, x: torch.Tensor, sparsity_coef: float, exclusive_sparsity_coef: float, form: str = "partition") -> torch.Tensor:
        """MSE + lambda_sh * mean|f_shared| + lambda_excl * (exclusive term; see ``form``)."""
        recon, f = self.forward(x)
        mse = F.mse_loss(recon, x)
        fs = f[:, self.b_end :]
        if form == "paper":
            fa = torch.cat([f[:, : self.a_end], fs], dim=-1)
            fb = torch.cat([f[:, self.a_end : self.b_end], fs], dim=-1)
            l1_excl = (fa.abs().mean() + fb.abs().mean()) / 2
        else:
            fe = f[:, : self.b_end]
            l1_excl = fe.abs().mean() if fe.numel() else f.new_zeros(())
        l1_shared = fs.abs().mean() if fs.numel() else f.new_zeros(())
        return mse + exclusive_sparsity_coef * l1_excl + sparsity_coef * l1_shared

    def paper_config(self) -> dict:
        """The ``config.json`` the paper writes next to ``model.pt``."""
        return dict(activation_dim=self.activation_dim, dict_size=self.dict_size, k=self.k, n_a=self.n_a, n_b=self.n_b)


def dense_train_step(model: PaperDFC, opt: torch.optim.Optimizer, x: torch.Tensor, lambda_shared: float, lambda_excl: float, form: str = "partition") -> float:
    """One step of the paper's loop: loss, backward, clip 1.0, Adam, re-apply masks."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x, lambda_shared, lambda_excl, form)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.apply_masks()
    return float(loss.detach())
