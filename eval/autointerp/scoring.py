"""Scores of a simulation against the true activations, all from plain lists so anyone can recompute them.

- `pooled_correlation`: Pearson r over every token of every scoring record (SPEC.md section 6; the paper's
  score, reported x100). NaN with a reason when either side is constant; `score_simulation` scores a constant
  prediction of a varying neuron 0 (no predictive power) and keeps NaN for a neuron constant on those tokens.
- `rsquared` and `absolute_dev_explained`: 1 - SS_res / SS_tot and 1 - sum|t - e| / sum|t - median t|, on the
  true activations rescaled to 0..10 by the neuron's maximum (the simulator's scale): not comparable with
  neuron_explainer's, which use the raw activations.
- `balanced_accuracy`: detection and fuzzing scores as EleutherAI's delphi computes them, (TPR + TNR) / 2 (the
  samples are ours: crate.eval.autointerp.steps `neuron_steps`).
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
    """The neuron's scores. A constant prediction of a neuron that varies scores 0: the explanation predicts
    nothing (an LLM's expected values are never exactly constant, the token-statistics simulator's are whenever
    no listed token occurs); left out as NaN, such neurons would lift the layer mean. Only a neuron constant on
    the scoring tokens (dead there) stays NaN."""
    r, note = pooled_correlation(true, expected)
    t = _flat(true)
    if math.isnan(r) and len(t) >= 2 and np.ptp(t) > 0:
        r, note = 0.0, note.replace("correlation undefined", "it predicts nothing, scored 0")
    return {
        "score": r,
        "score_x100": r * 100 if math.isfinite(r) else math.nan,
        "score_note": note,
        "rsquared": rsquared(true, expected, max_activation),
        "absolute_dev_explained": absolute_dev_explained(true, expected, max_activation),
    }


__all__ = ["expected_value", "pooled_correlation", "rsquared", "absolute_dev_explained", "balanced_accuracy",
           "score_simulation"]
