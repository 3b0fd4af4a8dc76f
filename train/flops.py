"""FLOPs per token from the matmuls the model really runs, and MFU against a per-GPU peak table.

One function, `flops_per_token`, serves the trainer's logs and `benchmarks/train_throughput.py`.
Counted per token, forward, 2 FLOPs per multiply-add:

    GPT layer:    QKV 2*d*3d + attention scores and values 2 * 2*t*d + output 2*d*d + MLP 2 * 2*d*h
    CRATE layer:  U 2*d*d + attention 2 * 2*t*d + W_o 2*d*d + ISTA (2 * steps) * 2*d*h
    head:         2*d*V (tied to the embedding, still a real matmul); embeddings are lookups (0)

CRATE's ISTA applies its dictionary 2*steps times (4 for the paper's 2 steps: D^T v, D a1, D^T r, D a2),
which `6 * params` misses since the dictionary is one tensor. t is the number of keys a query attends to:
(T+1)/2 on average for causal attention, as flash attention skips the masked half (llm.c counts the
same); pass causal=False for the full-T (PaLM) convention. Training = 3 x forward (backward = 2 x).
"""

from __future__ import annotations

from crate.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# The order matters: more specific names first.
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),  # fp16
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def flops_per_token(cfg: ModelConfig, context: int | None = None, causal: bool = True) -> dict[str, float]:
    """Forward and training FLOPs per token of `cfg` at sequence length `context` (default block_size)."""
    d, h, V, L = cfg.n_embd, int(cfg.n_hidden), cfg.vocab_size, cfg.n_layer
    T = context or cfg.block_size
    t = (T + 1) / 2 if causal else T
    attention = 2 * (2 * t * d)  # scores q.k and the weighted sum of values, over all heads
    if cfg.arch == "gpt":
        layer = 2 * d * 3 * d + attention + 2 * d * d + 2 * (2 * d * h)
    else:
        layer = 2 * d * d + attention + 2 * d * d + (2 * cfg.ista_steps) * (2 * d * h)
    forward = L * layer + 2 * d * V
    return {"forward": float(forward), "train": float(3 * forward), "attention": float(L * attention)}


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU, from its name (the current CUDA device by default); None if unknown."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(tokens_per_second_per_device: float, cfg: ModelConfig, context: int | None = None,
        peak: float | None = None) -> float | None:
    """Model FLOPs utilisation of one device; None when its peak is unknown (CPU, unlisted GPU)."""
    peak = peak if peak is not None else peak_flops()
    if not peak:
        return None
    return tokens_per_second_per_device * flops_per_token(cfg, context)["train"] / peak
