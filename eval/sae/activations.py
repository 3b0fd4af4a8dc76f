"""A data split's tokens as model-length sequences, and a model's activations at a hook over them: what SAE
training (an endless shuffled stream) and the SAE metrics (the first sequences, in order) both read."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from crate.eval.sae.base import SAEError
from crate.hooks import record


def n_sequences(stream: np.ndarray, T: int, name: str) -> int:
    """How many whole sequences of `T` tokens the `name` split holds (at least one, or an error)."""
    n = len(stream) // T
    if n < 1:
        raise SAEError(f"the {name} tokens ({len(stream)}) hold no sequence of {T}: use a larger split or --seq-len")
    return n


def token_rows(stream: np.ndarray, rows: Sequence[int], T: int, device: torch.device) -> Tensor:
    """The sequences numbered `rows` as one (len(rows), T) int64 batch on `device`."""
    return torch.from_numpy(np.stack([np.asarray(stream[r * T:(r + 1) * T]) for r in rows]).astype(np.int64)).to(device)


def activation_batches(model: nn.Module, stream: np.ndarray, hook: str, seq_len: int, lm_batch: int,
                       seed: int) -> Iterator[Tensor]:
    """Endless (tokens, d_in) activations at `hook`, sequences in a seeded random order, epoch after epoch."""
    T = min(seq_len, model.config.block_size)
    n = n_sequences(stream, T, "training")
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    while True:
        order = rng.permutation(n)
        for i in range(0, n, lm_batch):
            with torch.no_grad(), record(model, [hook]) as cache:
                model(token_rows(stream, order[i:i + lm_batch], T, device))
            a = cache[hook]
            yield a.reshape(-1, a.shape[-1]).float()


__all__ = ["n_sequences", "token_rows", "activation_batches"]
