"""What a layer mean is a mean OF: the populations behind a layer's score, and comparisons over the same one.

A layer mean that leaves dead units (NaN scores) out is a mean over the units that fire on the data, so two
systems with different dead fractions (CRATE 17%, GPT none) are averaged over different populations; the
Random-only protocol also scores a live unit that no uniformly sampled record catches as NaN. These functions make
the population explicit:

- `unit_counts(rec, lines)`: how many units of a layer are scored, dead, always on, rare and never sampled, with
  their neuron ids (dead and always-on as crate.eval.record.measures defines them).
- `layer_means(lines, dead)`: the layer mean over scored units and with dead units counted as 0; a verdict names
  the one it uses.
- `active_share(line)`, `density_bins(freq, scores)`: scores tabulated by activation density (the share of the
  uniformly sampled tokens where the unit is active as the scorer labels it), since a dense unit and a rare one
  are scored on very different records.
- `density_reweighted(a, b)`: the difference of two systems' means with both reweighted to the same density
  distribution, so that a difference in density mix does not pass for a difference in interpretability.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from crate.eval.autointerp.scoring import active_tokens, random_records
from crate.eval.record.measures import layer_measures
from crate.eval.record.recorder import LayerRecording
from crate.eval.stats.neurons import bootstrap_ci

DENSITY_EDGES = (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)


def line_score(line: Mapping[str, Any]) -> float:
    """A JSONL line's score as a float: NaN where it is undefined (written as null)."""
    s = line.get("score")
    return math.nan if s is None else float(s)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def active_share(line: Mapping[str, Any]) -> float:
    """The share of a line's uniformly sampled (random:*) scoring tokens where the unit is active as the scorer
    labels it (normalised activation >= 1: crate.eval.autointerp.scoring.active_tokens): its activation density as
    the scorer sees it (> 0 would count a GELU or ReLU unit's tiny values); NaN without random records."""
    sampled = [line["true_activations"][i] for i in random_records(line["record_ids"])]
    flags = [x for xs in active_tokens(sampled, float(line["max_activation"])) for x in xs]
    return float(np.mean(flags)) if flags else math.nan


def unit_counts(rec: LayerRecording, lines: Sequence[Mapping[str, Any]], rare: float = 1e-3) -> dict[str, Any]:
    """One layer's units by category, each a count and its neuron ids ("<category>_neurons"): "scored" (a line
    with a finite score), "dead" (never > 0 on the recorded tokens), "always_on" (> 0 on at least the always-on
    threshold of crate.eval.record.measures), "rare" (live, > 0 on fewer than `rare` of the tokens) and
    "never_sampled" (live, with a line whose uniformly sampled scoring records, ids "random:...", are all <= 0; a
    line with no such record counts in none). Dead and always-on counts are the recording measures' own."""
    measures = layer_measures(rec)
    threshold = float(measures["always_on_threshold"])
    count = np.asarray(rec.active_count)
    freq = count / rec.n_tokens
    by_neuron = {int(ln["neuron"]): ln for ln in lines}

    def sampled_zero(ln: Mapping[str, Any]) -> bool:
        rand = [ln["true_activations"][i] for i in random_records(ln["record_ids"])]
        return bool(rand) and all(v <= 0 for acts in rand for v in acts)

    ids = {
        "scored": sorted(n for n, ln in by_neuron.items() if math.isfinite(line_score(ln))),
        "dead": np.flatnonzero(count == 0).tolist(),
        "always_on": np.flatnonzero(freq >= threshold).tolist(),
        "rare": np.flatnonzero((count > 0) & (freq < rare)).tolist(),
        "never_sampled": sorted(n for n, ln in by_neuron.items() if count[n] > 0 and sampled_zero(ln)),
    }
    return {"n_units": rec.n_neurons, "n_tokens": rec.n_tokens, "n_lines": len(by_neuron),
            "scored": len(ids["scored"]), "dead": int(measures["dead"]), "always_on": int(measures["always_on"]),
            "rare": len(ids["rare"]), "never_sampled": len(ids["never_sampled"]),
            "always_on_threshold": threshold, "rare_threshold": rare, **{f"{k}_neurons": v for k, v in ids.items()}}


def layer_means(lines: Sequence[Mapping[str, Any]], dead: Iterable[int]) -> dict[str, Any]:
    """Two estimands of a layer's mean score. "over_scored": the mean over units with a finite score (the units
    that fire on the data; what crate.eval.stats.neurons.layer_summary reports). "dead_as_zero": the mean over
    every unit with a line, dead units scored 0 (an explanation of a dead unit predicts nothing), over
    "n_dead_as_zero" units; live units with an undefined score (constant on their scoring records) stay out of
    both ("n_left_out"). Dead units are those of `dead` that have a line (a sample of neurons adds no others)."""
    dead = {int(n) for n in dead}
    scores = {int(ln["neuron"]): line_score(ln) for ln in lines}
    scored = [s for s in scores.values() if math.isfinite(s)]
    as_zero = [0.0 if n in dead else s for n, s in scores.items() if n in dead or math.isfinite(s)]
    return {"over_scored": _mean(scored), "dead_as_zero": _mean(as_zero), "n_scored": len(scored),
            "n_dead": sum(n in dead for n in scores), "n_dead_as_zero": len(as_zero),
            "n_left_out": len(scores) - len(as_zero)}


def _binned(freq: Mapping[int, float], scores: Mapping[int, float], edges: Sequence[float]) -> list[np.ndarray]:
    """The finite scores of the units in each density bin [lo, hi) (the last bin includes its upper edge)."""
    units = [n for n in scores if n in freq and scores[n] is not None and math.isfinite(scores[n])]
    f = np.asarray([freq[n] for n in units], dtype=np.float64)
    s = np.asarray([scores[n] for n in units], dtype=np.float64)
    b = np.searchsorted(np.asarray(edges, dtype=np.float64), f, side="right") - 1
    b[f == edges[-1]] = len(edges) - 2
    return [s[b == k] for k in range(len(edges) - 1)]


def density_bins(freq: Mapping[int, float], scores: Mapping[int, float], edges: Sequence[float] = DENSITY_EDGES,
                 n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Finite scores by activation-density bin: [{"bin": [lo, hi], "n", "mean", "ci95" (bootstrap over units)}].
    `freq` and `scores` map neuron ids to density (`active_share`) and score; units in only one are left out."""
    return [{"bin": [float(edges[k]), float(edges[k + 1])], "n": int(len(v)), "mean": _mean(v),
             "ci95": list(bootstrap_ci(v, n_boot=n_boot, seed=seed))}
            for k, v in enumerate(_binned(freq, scores, edges))]


def density_mix(validity_layers: Mapping[str, Mapping[str, Any]], scores: Mapping[str, Mapping[Any, float]],
                used: Sequence[str]) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """`density_reweighted`'s input for one validated model: (activation density, score) of its scored units in the
    layers `used` (those its headline averages), keyed by (layer, neuron); `validity_layers` is a validity summary's
    "layers" (crate.eval.validity.run) and `scores` {layer: {neuron: score}}."""
    freq = {(k, str(n)): f for k, v in validity_layers.items() if k in used for n, f in v["density"].items()}
    vals = {(k, str(n)): x for k, v in scores.items() for n, x in v.items() if (k, str(n)) in freq}
    return freq, vals


def density_reweighted(a: tuple[Mapping[int, float], Mapping[int, float]],
                       b: tuple[Mapping[int, float], Mapping[int, float]], edges: Sequence[float] = DENSITY_EDGES,
                       n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """a, b: (freq, scores) of two systems. The estimand: sum_k w_k (mean_a,k - mean_b,k), where mean_x,k is
    system x's mean finite score in density bin k and w_k the share of bin k in the pooled scored units of both
    systems, over the bins both populate (bins where either has no scored unit are dropped and listed in
    "bins_dropped"). It is the difference the two systems would show if their units had the same density mix
    (a direct standardisation); "raw_difference" is the plain difference of means for comparison. The 95%
    interval is a percentile bootstrap that resamples units within each system and bin (the weights, fixed by
    the bin counts, do not vary)."""
    ba, bb = _binned(*a, edges), _binned(*b, edges)
    bins = [[float(edges[k]), float(edges[k + 1])] for k in range(len(edges) - 1)]
    used = [k for k in range(len(bins)) if len(ba[k]) and len(bb[k])]
    pooled = np.asarray([len(ba[k]) + len(bb[k]) for k in used], dtype=np.float64)
    w = pooled / pooled.sum() if used else pooled
    mean_a = float(sum(wk * ba[k].mean() for wk, k in zip(w, used))) if used else math.nan
    mean_b = float(sum(wk * bb[k].mean() for wk, k in zip(w, used))) if used else math.nan
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for wk, k in zip(w, used):
        for v, sign in ((ba[k], 1.0), (bb[k], -1.0)):
            boot += sign * wk * v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975]) if used else (math.nan, math.nan)
    all_a, all_b = np.concatenate(ba), np.concatenate(bb)
    return {"difference": mean_a - mean_b, "ci95": [float(lo), float(hi)], "weights": [float(x) for x in w],
            "bins_used": [bins[k] for k in used], "mean_a": mean_a, "mean_b": mean_b,
            "bins_dropped": [{"bin": bins[k], "n_a": int(len(ba[k])), "n_b": int(len(bb[k]))}
                             for k in range(len(bins)) if k not in used],
            "raw_difference": _mean(all_a) - _mean(all_b)}


__all__ = ["DENSITY_EDGES", "line_score", "active_share", "unit_counts", "layer_means", "density_bins",
           "density_mix", "density_reweighted"]
