"""CKA between every layer of two models on the same held-out tokens, for the residual stream after each block
(`hook_resid_post`) and each block's neurons (`model.neuron_hook`: CRATE's ISTA codes, GPT's MLP hidden units).

The tokens are cut into sequences (context restarts at each) and the sequences into minibatches of whole sequences;
each minibatch's Gram matrices are computed once per model, in float64, and serve every pair that model is in
(crate.eval.compare.cka.MinibatchCKA), so memory is one n x n Gram per representation whatever the token count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crate.errors import CrateError
from crate.eval.compare.cka import GramStats, MinibatchCKA
from crate.hooks import resid_hook_name

KINDS = ("resid", "neurons")


def sequences(stream: np.ndarray, n_tokens: int, seq_len: int) -> Tensor:
    """The first `n_tokens` of `stream` (or all of it, if shorter) as whole sequences (n, seq_len), int64."""
    n = min(n_tokens, len(stream)) // seq_len
    if n < 1:
        raise CrateError(f"the split has {len(stream)} tokens, fewer than one sequence of {seq_len}: use a larger "
                         f"split or a smaller --seq-len")
    return torch.from_numpy(np.asarray(stream[: n * seq_len]).astype(np.int64)).view(n, seq_len)


def layer_hooks(model: Any) -> dict[str, list[str]]:
    """The hook points of each kind, one per layer, in layer order."""
    layers = range(model.config.n_layer)
    return {"resid": [resid_hook_name(i, "post") for i in layers], "neurons": [model.neuron_hook(i) for i in layers]}


@torch.no_grad()
def gram_stats(model: Any, idx: Tensor) -> dict[str, GramStats]:
    """The Grams over the tokens of `idx` (B, T) of each kind's representations, every layer stacked."""
    names = layer_hooks(model)
    _, cache = model.run_with_cache(idx, [n for kind in KINDS for n in names[kind]])
    return {kind: GramStats.of([cache[n].flatten(0, 1) for n in names[kind]]) for kind in KINDS}


def minibatches(seqs: Tensor, batch_tokens: int) -> list[Tensor]:
    """Minibatches of whole sequences, about `batch_tokens` tokens each (at least one sequence, at least 4 tokens:
    the unbiased HSIC needs n >= 4); a remainder shorter than a minibatch is left out so that every HSIC in a sum
    has the same n."""
    per = max(1, batch_tokens // seqs.shape[1], -(-4 // seqs.shape[1]))
    if per > len(seqs):
        raise CrateError(f"{len(seqs)} sequences of {seqs.shape[1]} tokens are fewer than one CKA minibatch of "
                         f"{per * seqs.shape[1]} tokens: use more --tokens or a smaller --cka-batch")
    return [seqs[k:k + per] for k in range(0, len(seqs) - per + 1, per)]


def cka_pairs(models: dict[str, Any], pairs: list[tuple[str, str]], batches: list[Tensor],
              tick: Callable[[], None] = lambda: None) -> dict[tuple[str, str], dict[str, dict[str, Tensor]]]:
    """{(a, b): {kind: {"unbiased"|"biased": (L_a, L_b) float64 CKA}}} for each pair of named models (all on one
    device); `tick` is called after each minibatch (progress)."""
    used = sorted({m for p in pairs for m in p}, key=list(models).index)
    acc = {(p, kind): MinibatchCKA() for p in pairs for kind in KINDS}
    for idx in batches:
        grams = {m: gram_stats(models[m], idx.to(_device(models[m]))) for m in used}
        for (a, b), kind in acc:
            acc[(a, b), kind].add(grams[a][kind], grams[b][kind])
        tick()
    return {p: {kind: {e: m.cpu() for e, m in acc[p, kind].result().items()} for kind in KINDS} for p in pairs}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


__all__ = ["KINDS", "sequences", "layer_hooks", "gram_stats", "minibatches", "cka_pairs"]
