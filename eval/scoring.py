"""Scores of a simulation against the true activations, all from plain lists so anyone can recompute them.

- `pooled_correlation`: Pearson r over every token of every scoring record (SPEC.md section 6; the paper's
  score, reported x100). NaN with a reason when either side is constant (a dead or constant neuron).
- `rsquared` and `absolute_dev_explained`: true activations normalised to 0..10 by the neuron's maximum
  (the same scale the simulator predicts on), then 1 - SS_res / SS_tot and 1 - sum|t - e| / sum|t - median t|.
- `balanced_accuracy`: detection and fuzzing scores as EleutherAI's delphi defines them, (TPR + TNR) / 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def expected_value(probs: Sequence[float], values: Sequence[float]) -> float:
    """E = sum_v v p(v) with p renormalised over the candidate values; 0 when no candidate has mass."""
    p = np.asarray(probs, dtype=np.float64)
    total = p.sum()
    if not total > 0:
        return 0.0
    return float((p / total) @ np.asarray(values, dtype=np.float64))


def _flat(lists: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray([float(x) for xs in lists for x in xs], dtype=np.float64)


def pooled_correlation(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> tuple[float, str | None]:
    """(r, note): Pearson correlation pooled over all tokens; (nan, reason) when undefined."""
    t, e = _flat(true), _flat(expected)
    if len(t) != len(e):
        raise ValueError(f"{len(t)} true activations but {len(e)} expected ones")
    if len(t) < 2:
        return math.nan, "fewer than two tokens to correlate"
    if np.ptp(t) == 0:
        return math.nan, f"the neuron is constant ({t[0]:g}) on every scoring token: correlation undefined"
    if np.ptp(e) == 0:
        return math.nan, f"the simulator predicted a constant ({e[0]:g}) on every token: correlation undefined"
    tc, ec = t - t.mean(), e - e.mean()
    return float((tc @ ec) / math.sqrt((tc @ tc) * (ec @ ec))), None


def _scaled(true: Sequence[Sequence[float]], max_activation: float) -> np.ndarray:
    t = np.maximum(_flat(true), 0.0)
    return 10.0 * t / max_activation if max_activation > 0 else np.zeros_like(t)


def rsquared(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]], max_activation: float) -> float:
    t, e = _scaled(true, max_activation), _flat(expected)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - float(((t - e) ** 2).sum()) / ss_tot


def absolute_dev_explained(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
                           max_activation: float) -> float:
    t, e = _scaled(true, max_activation), _flat(expected)
    base = float(np.abs(t - np.median(t)).sum())
    return math.nan if base == 0 else 1.0 - float(np.abs(t - e).sum()) / base


def balanced_accuracy(labels: Sequence[bool], predictions: Sequence[bool]) -> float:
    """(TPR + TNR) / 2; with one class only, the accuracy on that class."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predictions, dtype=bool)
    rates = [float((p[y] == True).mean()) if y.any() else None,  # noqa: E712
             float((p[~y] == False).mean()) if (~y).any() else None]  # noqa: E712
    rates = [r for r in rates if r is not None]
    return float(np.mean(rates)) if rates else math.nan


def score_simulation(true: Sequence[Sequence[float]], expected: Sequence[Sequence[float]],
                     max_activation: float) -> dict[str, float | str | None]:
    r, note = pooled_correlation(true, expected)
    return {
        "score": r,
        "score_x100": r * 100 if math.isfinite(r) else math.nan,
        "score_note": note,
        "rsquared": rsquared(true, expected, max_activation),
        "absolute_dev_explained": absolute_dev_explained(true, expected, max_activation),
    }


__all__ = ["expected_value", "pooled_correlation", "rsquared", "absolute_dev_explained", "balanced_accuracy",
           "score_simulation"]
