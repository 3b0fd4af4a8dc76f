"""Export of the GPT baseline to a Hugging Face `GPT2LMHeadModel` directory.

transformers' GPT-2 uses Conv1D layers, whose weights are the transpose of our nn.Linear ones. A model
without biases exports with zero biases, and the paper's ReLU baseline with `activation_function="relu"`:
both give the same logits as ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crate.errors import CheckpointError
from crate.model import LanguageModel

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config(model: LanguageModel):  # -> transformers.GPT2Config
    from transformers import GPT2Config

    cfg = model.config
    eot = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return GPT2Config(
        bos_token_id=eot, eos_token_id=eot, vocab_size=cfg.vocab_size, n_positions=cfg.block_size,
        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_hidden, layer_norm_epsilon=cfg.layer_norm_eps,
        activation_function="gelu_new" if cfg.activation == "gelu" else "relu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )


def gpt2_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """Our GPT weights under transformers' names, Conv1D weights transposed, absent biases as zeros."""
    if model.config.arch != "gpt":
        raise CheckpointError("only arch 'gpt' exports to GPT2LMHeadModel: CRATE has no transformers counterpart")
    out: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        t = p.detach().cpu()
        if name.endswith(CONV1D):
            t = t.t()
        out[name] = t.contiguous()
    if not model.config.bias:
        for name, p in list(out.items()):
            if name.endswith("weight") and ("ln" in name or name.endswith(CONV1D)):
                width = p.shape[-1] if name.endswith(CONV1D) else p.shape[0]
                out[name.removesuffix("weight") + "bias"] = torch.zeros(width, dtype=p.dtype)
    return out


def export_gpt2(model: LanguageModel, out_dir: str | os.PathLike) -> Path:
    """Write a directory that `GPT2LMHeadModel.from_pretrained(out_dir)` loads with our logits."""
    from transformers import GPT2LMHeadModel

    state = gpt2_state_dict(model)
    hf = GPT2LMHeadModel(gpt2_config(model))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise CheckpointError(f"export to GPT2LMHeadModel failed: missing {missing}, unexpected {unexpected}")
    out = Path(out_dir)
    hf.save_pretrained(out)
    return out
