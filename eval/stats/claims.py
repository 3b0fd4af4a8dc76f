"""Reading a family of claims about systems trained with several seeds (`crate study`'s verdicts; SPEC.md 6d).

Eight or more claims read at 95% each would call at least one of them by chance about a third of the time
(1 - 0.95^8 = 0.34), and an interval that holds 0 cannot tell "the same" from "too noisy to tell". So:

- `welch_tests(a, b, margin)`: on the per-seed values of two systems, Welch's t test of mean(a) - mean(b) (scipy):
  the two-sided p-value of "the difference is not 0", and with an equivalence margin delta, TOST: the larger of the
  one-sided p-values against -delta and +delta, and the (1 - 2 alpha) interval it amounts to (equivalent when that
  interval lies inside [-delta, delta]).
- `holm(pvalues)`: Holm's step-down correction over one family, with the adjusted p-values.
- `read_family(tests, directions)`: the verdicts of one family: every p-value of the tests (the difference tests and
  the TOSTs) in one Holm correction; holds / reversed when Holm rejects "no difference" (the sign says which),
  else equivalent when Holm rejects "a difference of at least delta", else not resolved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from crate.eval.stats.neurons import finite
from crate.eval.stats.seeds import welch_ttest

ALPHA = 0.05
# Equivalence margins per statistic, x100 score points. 5 points for a mean score: a quarter of the 1L CRATE - GPT gap
# the default study measures (-21), and under a sixth of what training adds to GPT's score over its random init
# (33 to 37). None for the layer variances: in (x100)^2 and quadratic in the spread of the layer means, they have no
# scale on which "the same" reads naturally, and with 3 seeds their 95% intervals in the default study were 48 and 218
# (x100)^2 wide, so any margin a referee would accept is out of reach; they read holds / reversed / not resolved only.
MARGINS: dict[str, float | None] = {"mean": 5.0, "var": None, "var_corrected": None}


def welch_tests(a: Sequence[float], b: Sequence[float], margin: float | None = None,
                alpha: float = ALPHA) -> dict[str, Any]:
    """Welch's tests of mean(a) - mean(b) over per-seed values (NaN left out): {"difference", "p" (two-sided, "not 0"),
    "margin", "p_tost" (max of the one-sided p-values of "d > -margin" and "d < margin"), "ci_tost" (the
    (1 - 2 alpha) Welch interval)}. The p-values are NaN with fewer than 2 values a side, the TOST ones without a
    margin."""
    a, b = finite(a), finite(b)
    out = {"difference": float(a.mean() - b.mean()) if len(a) and len(b) else math.nan, "p": math.nan,
           "margin": margin, "p_tost": math.nan, "ci_tost": [math.nan, math.nan]}
    if len(a) < 2 or len(b) < 2:
        return out
    test = welch_ttest(a, b)
    out["p"] = float(test.pvalue)
    if margin is not None:
        # shifting a by the margin tests the difference against -margin and +margin; a's variance is unchanged
        above = welch_ttest(a + margin, b, alternative="greater").pvalue
        below = welch_ttest(a - margin, b, alternative="less").pvalue
        out["p_tost"] = float(max(above, below))
        ci = test.confidence_interval(1 - 2 * alpha)
        out["ci_tost"] = [float(ci.low), float(ci.high)]
    return out


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down (SPEC.md 6d) over the finite p-values: sort the m of them, reject the i-th smallest (1-based)
    while p_(i) <= alpha / (m - i + 1), and stop at the first that fails. A NaN (a test that could not run) is
    outside the family and never rejected. Returns the rejections and the adjusted p-values,
    max over j <= i of min(1, (m - j + 1) p_(j)), which are <= alpha for the rejected ones."""
    p = np.asarray(pvalues, dtype=float)
    order = [int(k) for k in np.argsort(p, kind="stable") if math.isfinite(p[k])]
    m = len(order)
    reject, adjusted = [False] * len(p), [math.nan] * len(p)
    stepping, running = True, 0.0
    for i, k in enumerate(order):
        stepping = stepping and bool(p[k] <= alpha / (m - i))
        running = max(running, min(1.0, (m - i) * float(p[k])))
        reject[k], adjusted[k] = stepping, running
    return reject, adjusted


def read_family(tests: Sequence[Mapping[str, Any]], directions: Sequence[int],
                alpha: float = ALPHA) -> tuple[list[dict[str, Any]], int]:
    """The verdicts of one family of claims, "a > b" (direction +1) or "a < b" (-1), each from its `welch_tests`.
    The family is every finite p-value: each claim's difference test and each TOST, all in one Holm correction.
    A claim holds / is reversed when Holm rejects "no difference" and the difference is on the claimed / the other
    side of 0 (a difference that is also inside the margin reads holds or reversed: it is there, if small); else it
    is equivalent when Holm rejects "|difference| >= margin"; else not resolved. Returns each test with "p_holm",
    "p_tost_holm" and "verdict", and the family's size."""
    m = len(tests)
    reject, adjusted = holm([t["p"] for t in tests] + [t["p_tost"] for t in tests], alpha)
    out = []
    for i, (t, direction) in enumerate(zip(tests, directions)):
        if reject[i]:
            verdict = "holds" if (t["difference"] > 0) == (direction > 0) else "reversed"
        else:
            verdict = "equivalent" if reject[m + i] else "not resolved"
        out.append({**t, "p_holm": adjusted[i], "p_tost_holm": adjusted[m + i], "verdict": verdict})
    return out, sum(math.isfinite(x) for x in adjusted)


__all__ = ["ALPHA", "MARGINS", "welch_tests", "holm", "read_family"]
