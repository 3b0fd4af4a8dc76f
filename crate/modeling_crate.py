"""CRATE as a transformers model: `CrateConfig` and `CrateForCausalLM` (SPEC.md section 1).

This file is copied beside every exported `config.json` (its `auto_map` points here), so it must run where
crate-lm is not installed: it never imports crate-lm at module level, carries its own reference ISTA, and
uses crate-lm's fused kernels only when `crate.kernels` imports. Module and parameter names equal crate-lm's
(`transformer.h.{i}.attn.c_attn`, `.ista.weight`, `.hook_neurons`, ...), so a state dict moves between the
two unchanged and hook names read the same in both.

MSSA has one projection U that is query, key and value at once, so the KV cache stores U x once per layer
(as both the cache's keys and values) and every new token attends to the cached projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # the fused Triton kernels, where crate-lm is installed
    from crate.kernels.ista import ista_codes as _crate_ista_codes
except ImportError:
    _crate_ista_codes = None

# transformers 5 renamed `past_key_values` to `cache` (in forward arguments and in the outputs)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


class CrateConfig(PretrainedConfig):
    """crate-lm's `ModelConfig` for arch 'crate', under transformers' names where they exist."""

    model_type = "crate"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "block_size", "intermediate_size": "n_hidden"}

    def __init__(self, vocab_size: int = 50304, block_size: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, n_hidden: int | None = None, bias: bool = True, dropout: float = 0.0,
                 ista_steps: int = 2, eta: float = 0.1, lmbda: float = 0.1, learn_eta_lambda: bool = False,
                 block: str = "crate", ista_impl: str = "auto", layer_norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, **kwargs):
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}: choose a divisor of n_embd")
        if block not in ("crate", "alpha"):
            raise ValueError(f"block must be 'crate' or 'alpha', got {block!r}")
        if ista_impl not in ("auto", "triton", "torch"):
            raise ValueError(f"ista_impl must be 'auto', 'triton' or 'torch', got {ista_impl!r}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.n_embd, self.n_layer, self.n_head = n_embd, n_layer, n_head
        self.n_hidden = n_hidden or 4 * n_embd
        self.bias, self.dropout, self.block = bias, dropout, block
        self.ista_steps, self.eta, self.lmbda, self.learn_eta_lambda = ista_steps, eta, lmbda, learn_eta_lambda
        self.ista_impl, self.layer_norm_eps, self.initializer_range = ista_impl, layer_norm_eps, initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)


def ista_reference(v: torch.Tensor, weight: torch.Tensor, eta, lmbda, n_steps: int) -> torch.Tensor:
    """Non-negative ISTA from a0 = 0: a_{k+1} = relu(a_k - eta D^T (D a_k - v) - eta lmbda), weight = D^T (h, d)."""
    threshold = eta * lmbda
    a = torch.relu(eta * (v @ weight.t()) - threshold)
    for _ in range(n_steps - 1):
        a = torch.relu(a - eta * ((a @ weight - v) @ weight.t()) - threshold)
    return a


def ista_codes(v: torch.Tensor, weight: torch.Tensor, eta, lmbda, n_steps: int, impl: str) -> torch.Tensor:
    """crate-lm's dispatch (fused kernels on CUDA) when it imports, this file's reference otherwise."""
    if _crate_ista_codes is not None:
        return _crate_ista_codes(v, weight, eta, lmbda, n_steps, impl)
    if impl == "triton":
        raise ValueError("ista_impl='triton' needs crate-lm's fused kernels (pip install crate-lm); "
                         "set config.ista_impl='torch' or 'auto' to use the reference ISTA")
    return ista_reference(v, weight, eta, lmbda, n_steps)


class HookPoint(nn.Identity):
    """Identity at the places crate-lm names (hook_resid_pre/mid/post, hook_neurons), for hooks and nnsight."""


class CrateAttention(nn.Module):
    """Causal MSSA: w = U x per head's subspace is query, key and value; y = W_o softmax(w w^T / sqrt(p)) w."""

    def __init__(self, config: CrateConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.layer_idx, self.dropout = config.n_head, layer_idx, config.dropout
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        B, T, C = u.shape
        w = self.c_attn(u).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        kv = w if cache is None else cache.update(w, w, self.layer_idx)[0]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(w, kv, kv, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class CrateISTA(nn.Module):
    """Unrolled non-negative ISTA against the tied dictionary D (stored as `weight` = D^T, shape (h, d))."""

    def __init__(self, config: CrateConfig):
        super().__init__()
        self.n_steps, self.impl = config.ista_steps, config.ista_impl
        self.weight = nn.Parameter(torch.empty(config.n_hidden, config.n_embd))
        if config.learn_eta_lambda:
            self.eta, self.lmbda = nn.Parameter(torch.tensor(config.eta)), nn.Parameter(torch.tensor(config.lmbda))
        else:
            self.eta, self.lmbda = config.eta, config.lmbda

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return ista_codes(v, self.weight, self.eta, self.lmbda, self.n_steps, self.impl)


class CrateBlock(nn.Module):
    """x = x + MSSA(LN(x)); a = ISTA(LN(x)); out = D a (paper CRATE, no residual) or x + D_out a (CRATE-alpha)."""

    def __init__(self, config: CrateConfig, layer_idx: int):
        super().__init__()
        self.alpha = config.block == "alpha"
        self.prenorm_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CrateAttention(config, layer_idx)
        self.prenorm_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.ista = CrateISTA(config)
        if self.alpha:
            self.decoder = nn.Linear(config.n_hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.hook_resid_pre, self.hook_resid_mid = HookPoint(), HookPoint()
        self.hook_neurons, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.attn(self.prenorm_1(x), mask, cache))
        a = self.hook_neurons(self.ista(self.prenorm_2(x)))
        x = x + self.dropout(self.decoder(a)) if self.alpha else self.dropout(a @ self.ista.weight)
        return self.hook_resid_post(x)


class CratePreTrainedModel(PreTrainedModel):
    config_class = CrateConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CrateBlock"]
    _supports_cache_class = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """crate-lm's init: N(0, 0.02) Linear/Embedding, unit LayerNorms, kaiming-uniform dictionary."""
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
            if isinstance(module, CrateISTA):
                nn.init.kaiming_uniform_(module.weight, a=0.0)
            if isinstance(module, CrateBlock):
                proj_std = std / math.sqrt(2 * self.config.n_layer)
                for proj in [module.attn.c_proj] + ([module.decoder] if module.alpha else []):
                    proj.weight.normal_(0.0, proj_std)


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, T: int,
                      device: torch.device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, past + T) mask: causal, minus padded keys; None when plain causal SDPA is exact.

    A query always sees itself, so a padded query row is never empty (SDPA would return NaN)."""
    if past == 0 and (attention_mask is None or bool(attention_mask.all())):
        return None
    q = torch.arange(past, past + T, device=device)[:, None]
    k = torch.arange(past + T, device=device)[None, :]
    allowed = (k <= q)[None]
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, -(past + T):].bool()) | (k == q)[None]
    return allowed[:, None]


class CrateModel(CratePreTrainedModel):
    """Embeddings, the CRATE blocks and LN_f: the hidden states before the (tied) LM head."""

    def __init__(self, config: CrateConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(CrateBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config) if TRANSFORMERS_5 else DynamicCache()
        if not use_cache:
            cache = None
        if inputs_embeds is None:
            self._check_tokens(input_ids)
            inputs_embeds = self.wte(input_ids)
        T = inputs_embeds.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"{past + T} tokens exceed the model's context block_size={self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]
        mask = attention_mask_4d(attention_mask, past, T, inputs_embeds.device)
        x = self.drop(inputs_embeds + self.wpe(position_ids))
        hidden = [x]
        for block in self.h:
            x = block(x, mask, cache)
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x  # transformers' convention: the last hidden state is the normalised one
        out = BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache},
                                      hidden_states=tuple(hidden) if output_hidden_states else None)
        return out if return_dict is not False else out.to_tuple()

    def _check_tokens(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got min {int(input_ids.min())} "
                             f"max {int(input_ids.max())}: the text was tokenized with another tokenizer")


class CrateForCausalLM(CratePreTrainedModel, GenerationMixin):
    """CRATE with its LM head tied to the token embedding; `labels` (= input_ids) give the next-token loss."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config: CrateConfig):
        super().__init__(config)
        self.transformer = CrateModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:  # crate-lm's loss: mean cross-entropy of every next token, in fp32
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()


__all__ = ["CrateConfig", "CrateModel", "CrateForCausalLM", "CratePreTrainedModel"]

if __name__ == "crate.modeling_crate":  # crate-lm's own copy, not an export's: the Auto classes need no remote code
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("crate", CrateConfig, exist_ok=True)
    AutoModel.register(CrateConfig, CrateModel, exist_ok=True)
    AutoModelForCausalLM.register(CrateConfig, CrateForCausalLM, exist_ok=True)
