"""Neuron-level statistics: bootstrap intervals over neurons, the paper's aggregation, paired comparisons.

The one implementation of these statistics: `crate interpret` and `crate report` (which scales them by 100) both
compute through this module; `crate.eval.stats.seeds` builds on it for systems trained with several seeds.

- `layer_summary(scores, n_total)`: mean over neurons with a percentile-bootstrap 95% interval; NaN scores
  (dead or constant neurons) are counted in `n_nan` and left out. When the neurons are a sample of the layer
  (n < n_total), `ci95_fpc` applies the finite-population correction sqrt((N - n) / (N - 1)) to the interval's
  half-widths, so the interval says what sampling costs (and shrinks to the mean when every neuron is scored).
- `model_aggregate(layer_means, exclude_last)`: the paper's numbers, mean and population variance of the
  per-layer means; `exclude_last="auto"` drops the last layer for 6- and 12-layer models (as the paper does)
  and the result says which layers were used.
- `compare_models(a, b)`: the difference of the model aggregates (a - b) with a bootstrap interval that
  resamples neurons within each layer; paired (the same resampled neuron indices for both) when both models
  scored the same neuron indices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def finite(x: Sequence[float]) -> np.ndarray:
    a = np.asarray([np.nan if v is None else v for v in x], dtype=np.float64)
    return a[np.isfinite(a)]


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    v = finite(values)
    if len(v) == 0:
        return (math.nan, math.nan)
    if len(v) == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def layer_summary(scores: Sequence[float], n_total: int | None = None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    raw = [np.nan if s is None else float(s) for s in scores]
    v = finite(raw)
    n_total = int(n_total if n_total is not None else len(raw))
    mean = float(v.mean()) if len(v) else math.nan
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {"mean": mean, "ci95": [lo, hi], "n": int(len(v)), "n_nan": int(len(raw) - len(v)),
                           "n_scored": len(raw), "n_total": n_total,
                           "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan}
    if len(raw) < n_total and n_total > 1 and math.isfinite(mean):
        f = math.sqrt((n_total - len(raw)) / (n_total - 1))
        out["ci95_fpc"] = [mean - (mean - lo) * f, mean + (hi - mean) * f]
    else:
        out["ci95_fpc"] = [mean, mean] if len(raw) >= n_total else [lo, hi]
    return out


def used_layers(layers: Sequence[str], n_layer: int | None, exclude_last: bool | str = "auto") -> list[str]:
    """The paper drops the last layer of its 6- and 12-layer models ("auto"); True/False force it."""
    layers = list(layers)
    drop = (n_layer in (6, 12)) if exclude_last == "auto" else bool(exclude_last)
    if drop and n_layer is not None and str(n_layer - 1) in layers:
        layers.remove(str(n_layer - 1))
    return layers


def model_aggregate(layer_means: Mapping[str, float], n_layer: int | None = None,
                    exclude_last: bool | str = "auto") -> dict[str, Any]:
    use = used_layers(sorted(layer_means, key=_layer_key), n_layer, exclude_last)
    m = np.asarray([layer_means[k] for k in use], dtype=np.float64)
    m = m[np.isfinite(m)]
    return {"mean": float(m.mean()) if len(m) else math.nan, "var_pop": float(m.var()) if len(m) else math.nan,
            "layers_used": use, "exclude_last": exclude_last, "n_layer": n_layer}


def _layer_key(k: str) -> tuple[int, Any]:
    return (0, int(k)) if k.isdigit() else (1, k)


def _boot_aggregate(per_layer: Mapping[str, tuple[np.ndarray, np.ndarray]], use: list[str], rng: np.random.Generator,
                    idx: Mapping[str, np.ndarray] | None) -> float:
    means = []
    for k in use:
        neurons, scores = per_layer[k]
        pick = idx[k] if idx is not None else rng.integers(0, len(scores), size=len(scores))
        s = scores[pick]
        s = s[np.isfinite(s)]
        if len(s):
            means.append(s.mean())
    return float(np.mean(means)) if means else math.nan


def compare_models(a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]],
                   n_layer_a: int | None = None, n_layer_b: int | None = None, exclude_last: bool | str = "auto",
                   n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """a, b: {layer: {neuron: score}}. The difference of model aggregates (a - b) with a bootstrap 95% interval."""
    use_a = used_layers(sorted(a, key=_layer_key), n_layer_a, exclude_last)
    use_b = used_layers(sorted(b, key=_layer_key), n_layer_b, exclude_last)
    arr = lambda d: {k: (np.asarray(sorted(v)), np.asarray([np.nan if v[n] is None else v[n] for n in sorted(v)],  # noqa: E731
                                                            dtype=np.float64)) for k, v in d.items()}
    pa, pb = arr(a), arr(b)
    paired = use_a == use_b and all(np.array_equal(pa[k][0], pb[k][0]) for k in use_a)
    mean_of = lambda p, use: float(np.nanmean([np.nanmean(p[k][1]) if np.isfinite(p[k][1]).any() else np.nan  # noqa: E731
                                               for k in use]))
    diff = mean_of(pa, use_a) - mean_of(pb, use_b)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        if paired:
            idx = {k: rng.integers(0, len(pa[k][1]), size=len(pa[k][1])) for k in use_a}
            boots.append(_boot_aggregate(pa, use_a, rng, idx) - _boot_aggregate(pb, use_b, rng, idx))
        else:
            boots.append(_boot_aggregate(pa, use_a, rng, None) - _boot_aggregate(pb, use_b, rng, None))
    bt = np.asarray(boots)
    bt = bt[np.isfinite(bt)]
    lo, hi = (np.quantile(bt, [0.025, 0.975]) if len(bt) else (math.nan, math.nan))
    base = mean_of(pb, use_b)
    return {"difference": diff, "ci95": [float(lo), float(hi)], "paired": paired, "layers_a": use_a,
            "layers_b": use_b, "relative": diff / base if base else math.nan, "exclude_last": exclude_last}


def aggregate_ci(scores: Mapping[str, Mapping[int, float]], layers_used: Sequence[str], n_boot: int = 2000,
                 seed: int = 0) -> list[float]:
    """Bootstrap 95% interval of the model aggregate (mean of layer means), resampling neurons within layers."""
    per = {k: (np.asarray(sorted(scores[k])), np.asarray([np.nan if scores[k][n] is None else scores[k][n]
                                                          for n in sorted(scores[k])], dtype=np.float64))
           for k in layers_used if k in scores and len(scores[k])}
    use = [k for k in layers_used if k in per]
    if not use:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    bt = np.asarray([_boot_aggregate(per, use, rng, None) for _ in range(n_boot)])
    bt = bt[np.isfinite(bt)]
    return [float(x) for x in np.quantile(bt, [0.025, 0.975])] if len(bt) else [math.nan, math.nan]


def sample_neurons(n_total: int, n: int | None, seed: int, layer: str = "") -> list[int]:
    """All neurons (n None or >= n_total) or a seeded sample, sorted; the same for every model of the width."""
    if n is None or n >= n_total:
        return list(range(n_total))
    rng = np.random.default_rng([seed, 7919])  # the same sample for every layer and model: paired comparisons
    return sorted(int(i) for i in rng.choice(n_total, size=n, replace=False))
