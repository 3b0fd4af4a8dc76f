"""The language model around the blocks: token and position embeddings, L blocks, LN_f, tied LM head.

    x0 = W_te[idx] + W_pe[0..T-1]
    x  = block_L(... block_1(x0))          CrateBlock (SPEC.md section 1) or GPTBlock (section 2)
    logits = LN_f(x) @ W_te^T

Names follow nanoGPT (`transformer.wte`, `transformer.h.{i}`, `lm_head`), so the authors' and nanoGPT's
state dicts load key for key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from crate.config import ModelConfig, preset_config
from crate.errors import TokenOutOfRangeError
from crate.crate_block import CrateBlock, scaled_std
from crate.gpt_block import GPTBlock
from crate.hooks import clamp_neuron, hook_points, hooks, neuron_hook_name, record


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        block = CrateBlock if config.arch == "crate" else GPTBlock
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: N(0, 0.02) for Linear and Embedding weights, zero biases, residual
        projections N(0, 0.02/sqrt(2L)); the ISTA dictionary keeps its kaiming-uniform init."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.transformer.h:
            for proj in blk.residual_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=scaled_std(self.config))
            if self.config.arch == "crate":
                blk.ista.reset_parameters()

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T)."""
        self.check_tokens(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for blk in self.transformer.h:
            x = blk(x)
        return self.lm_head(self.transformer.ln_f(x))

    def check_tokens(self, idx: Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        # The check syncs with the device: skipped where it would stall a GPU training loop, whose
        # data shards are validated before training starts.
        if torch.compiler.is_compiling() or idx.numel() == 0 or (idx.is_cuda and self.training):
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise TokenOutOfRangeError(
                f"token ids must lie in [0, {self.config.vocab_size}), got min {lo} max {hi}: "
                f"the data was tokenized with another tokenizer than this model's (vocab_size={self.config.vocab_size})"
            )

    def num_params(self) -> int:
        """Parameters as the authors count them: tied embedding once, position embedding excluded."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    # --- interpretability -------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        return sorted(hook_points(self))

    def neuron_hook(self, layer: int) -> str:
        """Name of layer `layer`'s neurons: CRATE's codes a2, GPT's MLP hidden units after the activation."""
        if not 0 <= layer < self.config.n_layer:
            raise IndexError(f"layer {layer} out of range for a {self.config.n_layer}-layer model")
        return neuron_hook_name(layer)

    @property
    def n_neurons(self) -> int:
        return int(self.config.n_hidden)

    @torch.no_grad()
    def run_with_cache(self, idx: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the activations at the named hook points."""
        with record(self, names) as cache:
            logits = self(idx)
        return logits, dict(cache)

    @contextlib.contextmanager
    def steer(self, layer: int, neuron: int, value: float) -> Iterator[None]:
        """Overwrite one neuron with a constant at every position while the context is open."""
        if not 0 <= neuron < self.n_neurons:
            raise IndexError(f"neuron {neuron} out of range: layer has {self.n_neurons} neurons")
        with hooks(self, {self.neuron_hook(layer): clamp_neuron(neuron, value)}):
            yield


def build_model(arch: str = "crate", preset: str = "tiny", **overrides: Any) -> LanguageModel:
    """An untrained model of a named preset (1L, 2L, 3L, S, B, tiny, micro) with config overrides."""
    return LanguageModel(preset_config(arch, preset, **overrides))  # type: ignore[arg-type]
