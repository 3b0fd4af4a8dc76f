"""nanoGPT's pre-LN block, the paper's baseline (SPEC.md section 2).

ReLU and no biases by default (the paper's runs); `activation="gelu", bias=True` gives true GPT-2 (tanh GELU),
`activation="gelu_exact"` the erf GELU of nanoGPT's own runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from crate.config import ModelConfig
from crate.hooks import HookPoint


# ModelConfig.activation -> module: "gelu" is GPT-2's tanh approximation, "gelu_exact" nanoGPT's nn.GELU() (erf)
ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": lambda: nn.GELU(approximate="tanh"), "gelu_exact": nn.GELU}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=cfg.bias)
        self.act = ACTIVATION_MODULES[cfg.activation]()
        self.c_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def encode(self, x: Tensor) -> Tensor:
        """The hidden units after the activation: the GPT "neurons"."""
        return self.act(self.c_fc(x))

    def decode(self, h: Tensor) -> Tensor:
        return self.dropout(self.c_proj(h))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_neurons = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.attn(self.ln_1(x)))
        h = self.hook_neurons(self.mlp.encode(self.ln_2(x)))
        return self.hook_resid_post(x + self.mlp.decode(h))

    def residual_projections(self) -> list[nn.Linear]:
        return [self.attn.c_proj, self.mlp.c_proj]
