"""Whether two scorers agree on the same units: Pearson's r with its 95% interval (Fisher's z, scipy) and Spearman's
rank correlation, over the units both scored (finite in both). A fast scorer is a proxy for a slow one only as far
as this correlation goes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def scorer_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """n (units finite in both), pearson, pearson_ci95 (NaN below 4 units), spearman, spearman_p and each scorer's
    mean over those units; the correlations are NaN when either scorer is constant there."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"the two scorers' values must pair up unit by unit: {x.shape} against {y.shape}")
    both = np.isfinite(x) & np.isfinite(y)
    x, y = x[both], y[both]
    n = int(len(x))
    out: dict[str, Any] = {"n": n, "pearson": math.nan, "pearson_ci95": (math.nan, math.nan), "spearman": math.nan,
                           "spearman_p": math.nan, "mean_a": float(x.mean()) if n else math.nan,
                           "mean_b": float(y.mean()) if n else math.nan}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    r = stats.pearsonr(x, y)
    rho = stats.spearmanr(x, y)
    out.update(pearson=float(r.statistic), spearman=float(rho.statistic), spearman_p=float(rho.pvalue))
    if n > 3:
        ci = r.confidence_interval(0.95)
        out["pearson_ci95"] = (float(ci.low), float(ci.high))
    return out


__all__ = ["scorer_agreement"]
