"""The CRATE block of SPEC.md section 1: causal MSSA, then overcomplete non-negative ISTA.

Module and parameter names match the authors' release (`prenorm_1`, `attn.c_attn`, `attn.c_proj`,
`prenorm_2`, `ista.weight`) so their state dicts load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crate.config import ModelConfig
from crate.hooks import HookPoint
from crate.kernels.ista import ista_codes


class SubspaceAttention(nn.Module):
    """MSSA: one projection U serves as query, key and value of every head's p-dimensional subspace."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)  # U, applied as u @ U^T
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # W_o with bias
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, u: Tensor) -> Tensor:
        B, T, C = u.shape
        w = self.c_attn(u).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            w, w, w, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ISTA(nn.Module):
    """Unrolled non-negative ISTA against the dictionary D (stored as `weight` = D^T, shape (h, d))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_steps = cfg.ista_steps
        self.impl = cfg.ista_impl
        self.recompute = cfg.ista_recompute
        self.weight = nn.Parameter(torch.empty(cfg.n_hidden, cfg.n_embd))
        if cfg.learn_eta_lambda:
            self.eta = nn.Parameter(torch.tensor(cfg.eta))
            self.lmbda = nn.Parameter(torch.tensor(cfg.lmbda))
        else:
            self.eta, self.lmbda = cfg.eta, cfg.lmbda
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The paper keeps kaiming-uniform: bound sqrt(6 / d) for the (h, d) tensor.
        nn.init.kaiming_uniform_(self.weight, a=0.0)

    def forward(self, v: Tensor) -> Tensor:
        return ista_codes(v, self.weight, self.eta, self.lmbda, self.n_steps, self.impl, recompute=self.recompute)


class CrateBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.alpha = cfg.block == "alpha"
        self.prenorm_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = SubspaceAttention(cfg)
        self.prenorm_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.ista = ISTA(cfg)
        if self.alpha:  # CRATE-alpha: a decoder D_out of its own, and a residual around ISTA
            self.decoder = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_neurons = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.attn(self.prenorm_1(x)))
        a = self.hook_neurons(self.ista(self.prenorm_2(x)))
        if self.alpha:
            x = x + self.dropout(self.decoder(a))
        else:
            x = self.dropout(a @ self.ista.weight)  # x = D a: no residual around ISTA
        return self.hook_resid_post(x)

    def residual_projections(self) -> list[nn.Linear]:
        """Linear layers writing into the residual stream, scaled at init by 1/sqrt(2L)."""
        return [self.attn.c_proj] + ([self.decoder] if self.alpha else [])


def scaled_std(cfg: ModelConfig) -> float:
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)
