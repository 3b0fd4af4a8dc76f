"""Two systems compared at the same validation loss rather than the same number of steps (`crate study`'s matched-loss
reading). A system that converges faster than another scores after k steps what a better-trained model scores;
read at equal loss, the comparison asks what each architecture's units are like at one quality of model.

Each training run keeps a grid of checkpoints (crate.train.export.GridExport), each scored on a neuron sample and
with its validation loss (the same validation windows for every point). For one training seed of each system:

- the matched loss is the worse (higher) of the two runs' losses at their last grid point: the loss both reach;
- each system is read along its own path where its loss first falls to the matched loss (`score_at_loss`): between
  the two consecutive grid points that straddle it, linear in the loss (the system that ends there: at its last
  point, unless its loss dipped below the matched loss earlier). Scores are not extrapolated: when a path's first
  point is already below the matched loss, the reading is NaN (a finer grid, `crate study --grid`, reaches it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def score_at_loss(losses: Sequence[float], scores: Sequence[float], target: float) -> float:
    """The score of a training path (grid points in step order) where its validation loss first falls to `target`:
    linear in the loss between the two points that straddle it (the earlier at or above it, the later at or below
    it); the first point's score when it sits exactly at `target`; NaN when the path never comes down to `target`
    or starts below it, or a score needed is NaN."""
    if len(losses) != len(scores):
        raise ValueError(f"{len(losses)} losses but {len(scores)} scores")
    if not losses or not math.isfinite(target) or not losses[0] >= target:
        return math.nan
    if losses[0] == target:
        return float(scores[0])
    for (l0, s0), (l1, s1) in zip(zip(losses, scores), zip(losses[1:], scores[1:])):
        if l0 >= target >= l1 and l0 > l1:
            return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))
    return math.nan


def matched_pair(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """One seed of two systems, each a path of (validation loss, score) grid points in step order: {"loss" (the
    matched loss), "a", "b" (each one's score there)}; all NaN when either path is empty or its last loss is not a
    number."""
    if not a or not b or not (math.isfinite(a[-1][0]) and math.isfinite(b[-1][0])):
        return {"loss": math.nan, "a": math.nan, "b": math.nan}
    target = max(a[-1][0], b[-1][0])
    return {"loss": target, **{side: score_at_loss([p[0] for p in path], [p[1] for p in path], target)
                               for side, path in (("a", a), ("b", b))}}


__all__ = ["score_at_loss", "matched_pair"]
