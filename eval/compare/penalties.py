"""The stitches a comparison makes, and their penalties (crate.eval.compare.stitch), at each depth both models have
(A's block i into B's block i+1):

    self       each model into itself: the floor, about 0 (below 0 where the map improves an undertrained model)
    trained    every pair, both directions: A into B and B into A
    control    a random-initialised copy of the source into the target: what the affine map recovers by itself
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
from torch import Tensor

from crate.eval.compare.stitch import StitchConfig, fit_stitch, mean_loss, stitched_loss


def plan(names: list[str], depths: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """(kind, source, target, layer) of every stitch, in the order they are made."""
    out = [("self", n, n, i) for n in names for i in range(depths[n])]
    for a, b in combinations(names, 2):
        for src, tgt in ((a, b), (b, a)):
            out += [(kind, src, tgt, i) for kind in ("trained", "control") for i in range(min(depths[a], depths[b]))]
    return out


def stitch_penalties(models: dict[str, Any], train: np.ndarray, val: list[Tensor], seq_len: int, cfg: StitchConfig,
                     seed: int, tick: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """One row per stitch of `plan`: its losses and penalty (nats/token); `tick` after each Adam step."""
    from crate.eval.models import reset_weights

    own = {n: mean_loss(m, val) for n, m in models.items()}
    controls: dict[str, Any] = {}
    rows = []
    for kind, src, tgt, i in plan(list(models), {n: m.config.n_layer for n, m in models.items()}):
        source = models[src]
        if kind == "control":
            if src not in controls:
                controls[src] = copy.deepcopy(source)
                reset_weights(controls[src], seed)
                controls[src].eval()
            source = controls[src]
        stitch, train_info = fit_stitch(source, models[tgt], i, i, train, seq_len, cfg, seed, tick)
        loss = stitched_loss(source, models[tgt], i, i, stitch, val)
        rows.append({"kind": kind, "source": src, "target": tgt, "layer_source": i, "layer_target": i,
                     "loss_target": own[tgt], "loss_stitched": loss, "penalty": loss - own[tgt], **train_info})
    return rows


def n_steps(models: dict[str, Any], cfg: StitchConfig) -> int:
    """Adam steps of the whole plan (the progress bar's total)."""
    return cfg.steps * len(plan(list(models), {n: m.config.n_layer for n, m in models.items()}))


__all__ = ["plan", "stitch_penalties", "n_steps"]
