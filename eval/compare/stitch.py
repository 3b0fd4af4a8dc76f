"""Model stitching (Bansal, Nakkiran, Barak 2021; Brown et al. 2023, arXiv 2310.14993; SPEC.md section 6d):
model A's bottom up to block i, a trained affine map, model B's top from block j+1, both models frozen.

    penalty = CE(B's top o map o A's bottom) - CE(B)      on held-out tokens, nats per token

The map starts at the least-squares fit of B's residual stream after block j from A's after block i on training
tokens (as Csiszarik et al. 2021 do, so that a few hundred steps suffice and a model stitched into itself starts
at the identity), then Adam lowers B's next-token loss through it, with a learning rate decaying linearly to 0 so
that the map it ends with is settled rather than the last noisy step. The training windows are drawn from `seed`
alone, so every stitch of one run sees the same tokens: penalties of different pairs are paired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crate.errors import CrateError


@dataclass
class StitchConfig:
    steps: int = 200  # Adam steps per stitch
    batch: int = 8  # sequences per step (and per evaluation batch)
    lr: float = 1e-3
    init_batches: int = 8  # batches of training tokens for the least-squares start
    ridge: float = 1e-6  # x mean diagonal of the normal equations: a dead direction of A gets weight 0


def bottom(model: Any, idx: Tensor, layer: int) -> Tensor:
    """The residual stream after block `layer` (what `hook_resid_post` sees), running only the blocks up to it."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos))
    for blk in model.transformer.h[: layer + 1]:
        x = blk(x)
    return x


def top(model: Any, x: Tensor, layer: int) -> Tensor:
    """The logits from the residual stream after block `layer`: blocks layer+1.., LN_f and the head."""
    for blk in model.transformer.h[layer + 1:]:
        x = blk(x)
    return model.lm_head(model.transformer.ln_f(x))


def next_token_nll(logits: Tensor, idx: Tensor) -> Tensor:
    """Summed cross-entropy of each position's next token (float64), over B x (T-1) positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), idx[:, 1:].flatten(), reduction="sum")


def train_windows(stream: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> Tensor:
    """`batch` random windows of `seq_len` tokens of the training split."""
    if len(stream) < seq_len:
        raise CrateError(f"the training split has {len(stream)} tokens, fewer than one sequence of {seq_len}: "
                         f"stitching trains on it (use --no-stitch, or a smaller --seq-len)")
    starts = rng.integers(0, len(stream) - seq_len + 1, size=batch)
    return torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len]) for s in starts]).astype(np.int64))


@torch.no_grad()
def least_squares(source: Any, target: Any, i: int, j: int, batches: list[Tensor], ridge: float) -> nn.Linear:
    """The affine map minimising ||B_j - (W A_i + b)||^2 over the tokens of `batches` (normal equations in float64,
    accumulated batch by batch)."""
    if not batches:
        raise ValueError("the least-squares start needs at least one batch of training tokens")
    gram = cross = None
    for idx in batches:
        a = bottom(source, idx, i).flatten(0, 1).double()
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        b = bottom(target, idx, j).flatten(0, 1).double()
        gram = a.T @ a if gram is None else gram + a.T @ a
        cross = a.T @ b if cross is None else cross + a.T @ b
    reg = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    sol = torch.linalg.solve(gram + reg, cross)  # (d_a + 1, d_b)
    lin = nn.Linear(sol.shape[0] - 1, sol.shape[1]).to(gram.device)
    lin.weight.copy_(sol[:-1].T)
    lin.bias.copy_(sol[-1])
    return lin


@torch.no_grad()
def mean_loss(logits_of: Callable[[Tensor], Tensor], batches: list[Tensor]) -> float:
    """Mean next-token loss (nats/token) over every position of `batches`."""
    total, count = 0.0, 0
    for idx in batches:
        total += float(next_token_nll(logits_of(idx), idx))
        count += idx.shape[0] * (idx.shape[1] - 1)
    return total / count


def stitched_loss(source: Any, target: Any, i: int, j: int, stitch: nn.Module, batches: list[Tensor]) -> float:
    """B's held-out loss with A's bottom (to block i) stitched in before its block j+1."""
    return mean_loss(lambda idx: top(target, stitch(bottom(source, idx, i)), j), batches)


def fit_stitch(source: Any, target: Any, i: int, j: int, train: np.ndarray, seq_len: int, cfg: StitchConfig,
               seed: int, tick: Callable[[], None] = lambda: None) -> tuple[nn.Linear, dict[str, float]]:
    """The map A_i -> B_j, least squares then `cfg.steps` Adam steps on B's loss (both models frozen); with the
    training loss (nats/token) at the start and over the last tenth of the steps."""
    device = next(target.parameters()).device
    rng = np.random.default_rng(seed)
    batches = [train_windows(train, seq_len, cfg.batch, rng).to(device) for _ in range(cfg.init_batches)]
    stitch = least_squares(source, target, i, j, batches, cfg.ridge)
    for p in (*source.parameters(), *target.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.Adam(stitch.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(cfg.steps, 1))
    losses = []
    for _ in range(cfg.steps):
        idx = train_windows(train, seq_len, cfg.batch, rng).to(device)
        with torch.no_grad():
            a = bottom(source, idx, i)
        loss = next_token_nll(top(target, stitch(a), j), idx) / (idx.shape[0] * (idx.shape[1] - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        tick()
    tail = losses[-max(1, len(losses) // 10):]
    return stitch, {"train_loss_first": losses[0] if losses else float("nan"),
                    "train_loss_last": float(np.mean(tail)) if losses else float("nan")}


__all__ = ["StitchConfig", "bottom", "top", "next_token_nll", "train_windows", "least_squares", "mean_loss",
           "stitched_loss", "fit_stitch"]
