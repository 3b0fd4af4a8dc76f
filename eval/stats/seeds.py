"""Seed-level statistics: systems trained with several seeds (`crate study`).

- `seed_bootstrap(runs)` / `seed_compare(runs_a, runs_b)`: the estimate is the mean over seeds of each model's
  statistic (`model_statistic`: the mean of its per-layer means, or their population variance, raw or less what
  neuron sampling adds). Intervals: Welch's t over the per-seed values (it holds the training-seed noise; verdicts
  read its per-seed values, as a family: crate.eval.stats.claims), the two-level bootstrap (seeds, then neurons
  within seeds), and the first seed alone with its neurons resampled (what a one-model study shows).
  `verdict(lo, hi, direction)` reads one interval of a difference, uncorrected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crate.eval.stats.neurons import finite


STATISTICS = ("mean", "var", "var_corrected")


def clean_runs(runs: Sequence[Mapping[str, Sequence[float]]], statistic: str) -> list[list[np.ndarray]]:
    """Each run's finite scores per layer; layers without one are left out, and for the variances (which need
    every layer) so is a run that lost a layer."""
    out = []
    for run in runs:
        layers = [finite(v) for v in run.values()]
        kept = [v for v in layers if len(v)]
        if kept and (statistic == "mean" or len(kept) == len(layers)):
            out.append(kept)
    return out


def _noise(run: list[np.ndarray]) -> float:
    """What neuron sampling adds to the expected population variance of L layer means: (L - 1) / L^2 * sum of the
    squared standard errors s_l^2 / n_l (E[var_pop(m^)] = var_pop(m) + that)."""
    L = len(run)
    return (L - 1) / L**2 * sum(float(v.var(ddof=1)) / len(v) for v in run if len(v) > 1)


def model_statistic(run: list[np.ndarray], statistic: str) -> float:
    """One trained model: "mean" (the paper's score, the mean of its per-layer means), "var" (the paper's spread,
    the population variance of the per-layer means) or "var_corrected" (that, less what neuron sampling adds)."""
    means = np.array([v.mean() for v in run])
    if statistic == "mean":
        return float(means.mean())
    return float(means.var()) - (_noise(run) if statistic == "var_corrected" else 0.0)


def _t(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def t_interval(values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Student's t interval of the mean of independent per-seed values (K - 1 degrees of freedom); NaN with < 2."""
    v = finite(values)
    if len(v) < 2:
        return [math.nan, math.nan]
    half = _t(1 - alpha / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return [float(v.mean()) - half, float(v.mean()) + half]


def welch_ttest(a: np.ndarray, b: np.ndarray, alternative: str = "two-sided") -> Any:
    """scipy's Welch t test of mean(a) - mean(b) (`ttest_ind(equal_var=False)`), quiet about its precision-loss
    warning: a side whose seeds all scored the same (a detection score can) has a variance of exactly 0."""
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return ttest_ind(a, b, equal_var=False, alternative=alternative)


def welch_interval(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Welch's t interval of mean(a) - mean(b) (Welch-Satterthwaite degrees of freedom; the point when both sides are
    constant); NaN with < 2 values a side."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return [math.nan, math.nan]
    ci = welch_ttest(a, b).confidence_interval(1 - alpha)
    return [float(ci.low), float(ci.high)]


def seed_bootstrap(runs: Sequence[Mapping[str, Sequence[float]]], n_boot: int = 2000, seed: int | Sequence[int] = 0,
                   resample_seeds: bool = True, statistic: str = "mean", alpha: float = 0.05) -> dict[str, Any]:
    """The two-level bootstrap of one system trained with several seeds: `runs` holds, per training seed,
    {layer: scores of its neurons} over the layers that enter the model's score (NaN scores left out; see
    `clean_runs` for lost layers).

    Estimate: the mean over seeds of each model's statistic (`model_statistic`). Each replicate draws as many
    seeds as there are, with replacement (`resample_seeds`; else every seed once), and for every draw resamples the
    neurons of each layer with replacement; the replicate is the mean of the drawn models' statistics (for the
    variances, less what the resampling of neurons adds to them, so that the replicates centre on the estimate). Returns
    {"estimate", "ci95" (percentile), "boots", "per_seed", "n_seeds"}. With few seeds the percentile interval
    over seeds covers less than it says (the seed-level draws take few distinct values): `seed_compare` reads
    verdicts from t intervals."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    clean = clean_runs(runs, statistic)
    if not clean:
        return {"estimate": math.nan, "ci95": [math.nan, math.nan], "boots": np.full(n_boot, math.nan),
                "per_seed": [], "n_seeds": 0}
    n_seeds = len(clean)
    per_seed = [model_statistic(run, statistic) for run in clean]
    # resampling a layer's neurons adds the neuron-sampling noise to its mean once more, so a replicate's variance
    # of layer means sits _noise above its seed's (measured) one: taken off, the replicates centre on the estimate
    # (the corrected variance takes it off once more, as model_statistic does)
    shift = [0.0 if statistic == "mean" else _noise(run) * (2 if statistic == "var_corrected" else 1) for run in clean]
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    for slot in range(n_seeds):
        drawn = rng.integers(0, n_seeds, size=n_boot) if resample_seeds else np.full(n_boot, slot)
        for s, run in enumerate(clean):
            rows = np.flatnonzero(drawn == s)
            if len(rows):
                means = np.stack([v[rng.integers(0, len(v), size=(len(rows), len(v)))].mean(1) for v in run], 1)
                boots[rows] += (means.mean(1) if statistic == "mean" else means.var(1)) - shift[s]
    boots /= n_seeds
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"estimate": float(np.mean(per_seed)), "ci95": [float(lo), float(hi)], "boots": boots,
            "per_seed": per_seed, "n_seeds": n_seeds}


def seed_compare(runs_a: Sequence[Mapping[str, Sequence[float]]], runs_b: Sequence[Mapping[str, Sequence[float]]],
                 n_boot: int = 2000, seed: int = 0, statistic: str = "mean") -> dict[str, Any]:
    """a - b for two systems of several training seeds each, resampled apart (independent generators). Three
    intervals: "ci95_seeds", Welch's t interval over the per-seed statistics (it holds the training-seed noise, and
    the neuron noise within each seed's value; the verdicts read it); "ci95_bootstrap", the two-level bootstrap
    (seeds, then neurons within seeds); "ci95_seed0", the first seed alone with neurons resampled, the interval a
    one-model study gives (estimate "estimate_seed0"). "a" and "b" hold each system's own."""
    out: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for tag, runs in (("a", runs_a), ("b", runs_b)):
        both = seed_bootstrap(runs, n_boot, [seed, 1 if tag == "a" else 2], True, statistic)
        first = seed_bootstrap(runs[:1], n_boot, [seed, 3 if tag == "a" else 4], False, statistic)
        boots[tag], boots[tag + "0"] = both["boots"], first["boots"]
        out[tag] = {"estimate": both["estimate"], "per_seed": both["per_seed"], "n_seeds": both["n_seeds"],
                    "ci95_seeds": t_interval(both["per_seed"]), "ci95_bootstrap": both["ci95"],
                    "estimate_seed0": first["estimate"], "ci95_seed0": first["ci95"]}

    def pct(d: np.ndarray) -> list[float]:
        d = d[np.isfinite(d)]
        return [float(x) for x in np.quantile(d, [0.025, 0.975])] if len(d) else [math.nan, math.nan]

    out["estimate"] = out["a"]["estimate"] - out["b"]["estimate"]
    out["ci95_seeds"] = welch_interval(out["a"]["per_seed"], out["b"]["per_seed"])
    out["ci95_bootstrap"] = pct(boots["a"] - boots["b"])
    out["estimate_seed0"] = out["a"]["estimate_seed0"] - out["b"]["estimate_seed0"]
    out["ci95_seed0"] = pct(boots["a0"] - boots["b0"])
    return out


def verdict(lo: float, hi: float, direction: int) -> str:
    """A claim "a > b" (direction +1) or "a < b" (-1) read from one 95% interval of a - b, uncorrected: "holds" when
    the interval lies on the claimed side of 0, "reversed" when it lies on the other, else "not resolved" (at this
    noise). The study reads seed 0's neuron interval so, as a one-model study would; its seed-aware verdicts are read
    as a family (crate.eval.stats.claims)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolved"
    if lo > 0 or hi < 0:
        return "holds" if (lo > 0) == (direction > 0) else "reversed"
    return "not resolved"


__all__ = ["clean_runs", "seed_bootstrap", "seed_compare", "model_statistic", "t_interval", "welch_ttest",
           "welch_interval", "verdict"]
