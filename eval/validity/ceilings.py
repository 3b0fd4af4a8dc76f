"""How high and how low a unit's score can be on its own scoring records, whatever the explanation.

- `lookup_ceiling(line)`: the best Pearson correlation that any per-token lookup (one predicted value per token
  key, crate.eval.autointerp.explainers.token_key) reaches on the line's scoring records: the correlation ratio
  eta = corr(t, E[t | key]) = sqrt(SS_between / SS_total). A lookup f is constant within keys, so
  cov(t, f) = cov(E[t | key], f) and corr(t, f) <= sd(E[t | key]) / sd(t) = eta (Cauchy-Schwarz), reached by
  f = E[t | key]. The token-statistics simulator is such a lookup, so eta bounds every token-level explanation;
  a unit driven by context (the previous token, position) sits far below 1. It is an in-sample bound: with every
  key seen once it is 1 whatever the activations.
- `ceiling_summary(lines)`: a layer's mean ceiling and mean score, and the share of the ceiling reached.
- `shuffled_floor(lines, simulator)`: each unit's score with another unit's explanation of the same layer: what
  an explanation scores for no reason specific to the unit (the "any explanation" floor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crate.eval.autointerp.explainers import token_key
from crate.eval.autointerp.scoring import score_simulation
from crate.eval.autointerp.simulators import Simulator, ask
from crate.eval.validity.estimands import line_score


def lookup_ceiling(line: Mapping[str, Any]) -> float:
    """eta of the line's true activations on their token keys, as sqrt(SS_between / SS_total) (non-negative by
    construction, where corr(t, E[t | key]) takes a random sign when the key means differ by rounding only); NaN
    when the activations are constant (or fewer than two), 0 when every key has the same mean."""
    keys = [token_key(t) for ts in line["tokens"] for t in ts]
    t = np.asarray([float(v) for vs in line["true_activations"] for v in vs], dtype=np.float64)
    if len(t) < 2 or np.ptp(t) == 0:
        return math.nan
    _, group = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    n_key = np.bincount(group)
    between = float(n_key @ (np.bincount(group, weights=t) / n_key - t.mean()) ** 2)
    return min(1.0, math.sqrt(between / float(((t - t.mean()) ** 2).sum())))


def ceiling_summary(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A layer's "mean_ceiling" and "mean_score" over the "n" units where both are finite, "fraction" = their
    ratio (the share of the token-level ceiling the explanations reach), and every unit's ceiling ("ceilings")."""
    ceilings = {int(ln["neuron"]): lookup_ceiling(ln) for ln in lines}
    both = [(ceilings[int(ln["neuron"])], line_score(ln)) for ln in lines]
    both = [(c, s) for c, s in both if math.isfinite(c) and math.isfinite(s)]
    mc = float(np.mean([c for c, _ in both])) if both else math.nan
    ms = float(np.mean([s for _, s in both])) if both else math.nan
    return {"mean_ceiling": mc, "mean_score": ms, "fraction": ms / mc if mc > 0 else math.nan, "n": len(both),
            "ceilings": ceilings}


def derangement(n: int, seed: int = 0) -> list[int]:
    """A uniformly drawn permutation p of range(n) with p[i] != i for every i (n >= 2), by rejection."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p.tolist()


def shuffled_floor(lines: Sequence[Mapping[str, Any]], simulator: Simulator, seed: int = 0) -> dict[int, float]:
    """{neuron: score} with the explanation of another unit of the layer (a seeded derangement), simulated on the
    unit's own scoring tokens and scored against its own true activations. Dead units (no activating explanation
    record: max_activation <= 0, the placeholder explanation of crate.eval.autointerp.steps) neither receive nor
    give one. Empty with fewer than two other units; NaN where the unit is constant on its scoring records."""
    live = [ln for ln in lines if ln["max_activation"] > 0]
    if len(live) < 2:
        return {}
    donors = derangement(len(live), seed)
    expected = ask(simulator, [("simulate", (live[d]["explanation"], ln["tokens"])) for ln, d in zip(live, donors)])
    return {int(ln["neuron"]): float(score_simulation(ln["true_activations"], e, ln["max_activation"])["score"])
            for ln, e in zip(live, expected)}


__all__ = ["lookup_ceiling", "ceiling_summary", "derangement", "shuffled_floor"]
