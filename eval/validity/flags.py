"""Verdicts flagged when the scorer fails its own controls on the data at hand, each flag with its reason.

A model's flags come from its validity summary (crate.eval.validity.run: the planted units' scores and the layer
estimands); a comparison's from both models' summaries and the measured difference. The thresholds:

- `indicator`: a one-key indicator is perfectly explained by a token-level explanation; a scorer that gives it
  less than INDICATOR_MIN (0.95, x100 = 95) cannot be trusted to rank anything on this data.
- `noise`: noise has nothing to explain; when its planted units' interval (two units or more) lies wholly above
  NOISE_MAX (0.1) the scorer rewards something other than the explanation (chance overlap of few records, say).

A control that could not be read (`unevaluated`: no finite score, or one unit where an interval is needed) gives no
flag, and is listed, so that no flag is never mistaken for a pass.
- `density`: a perfectly token-determined unit planted at the model's own median activation density should score
  near the top; below DENSITY_MIN (0.5) the scores at this density measure density at least as much as
  explanation quality (the stats scorer gives such units about 0.86, 0.72 and 0.52 at 2%, 18% and 49% density).
- `density-confounded` (a comparison): the planted token-determined units at the two models' own densities differ
  in the same direction as the models and by at least CONFOUNDED_SHARE (half) of their difference: at least half
  of the gap is what the scorer gives perfectly explainable units at those densities, so the verdict cannot tell
  interpretability from density.
- `populations`: the two layer means are over populations that differ by more than POPULATION_GAP (5 points) in
  their share of dead units (left out of the means); compare the dead-as-zero means beside them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

INDICATOR_MIN = 0.95
NOISE_MAX = 0.1
DENSITY_MIN = 0.5
CONFOUNDED_SHARE = 0.5
POPULATION_GAP = 0.05
OWN_DENSITY = "lookup-own"  # the planted family at the model's median activation density


def _family(validity: Mapping[str, Any], family: str, metric: str = "score") -> dict[str, Any]:
    return ((validity.get("planted") or {}).get("families") or {}).get(family, {}).get(metric) or {}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def model_flags(validity: Mapping[str, Any]) -> list[dict[str, str]]:
    """The flags of one model's scores: [{"flag", "reason"}], empty when its controls pass."""
    flags = []
    ind = _family(validity, "indicator-1").get("mean")
    if _finite(ind) and ind < INDICATOR_MIN:
        flags.append({"flag": "indicator", "reason": f"planted one-key indicators score {100 * ind:.1f} (< "
                      f"{100 * INDICATOR_MIN:.0f}): the scorer does not recover a perfectly explainable unit here"})
    for family in ("noise-dense", "noise-sparse"):
        lo = (_family(validity, family).get("ci95") or [None])[0]
        if _family(validity, family).get("n", 0) >= 2 and _finite(lo) and lo > NOISE_MAX:
            flags.append({"flag": "noise", "reason": f"planted {family} units score above {100 * NOISE_MAX:.0f} "
                          f"(95% interval from {100 * lo:.1f}): the scorer rewards more than the explanation"})
    own = _family(validity, OWN_DENSITY).get("mean")
    density = (validity.get("planted") or {}).get("own_density")
    if _finite(own) and own < DENSITY_MIN:
        flags.append({"flag": "density", "reason": f"token-determined units planted at this model's median "
                      f"activation density ({100 * density:.0f}% of tokens) score {100 * own:.1f} (< "
                      f"{100 * DENSITY_MIN:.0f}): its scores measure density as much as explanation quality"})
    return flags


def unevaluated(validity: Mapping[str, Any]) -> list[str]:
    """The model's controls that could not be read (no finite score, or one unit where an interval is needed): no
    flag from them is not a pass."""
    out = []
    for family, need in (("indicator-1", 1), (OWN_DENSITY, 1), ("noise-dense", 2), ("noise-sparse", 2)):
        n = _family(validity, family).get("n", 0)
        if n < need:
            out.append(f"{family}: {n} unit(s) with a finite score, {need} needed")
    return out


def _dead_share(validity: Mapping[str, Any]) -> float:
    counts = [v["counts"] for v in (validity.get("layers") or {}).values() if "counts" in v]
    units = sum(c["n_units"] for c in counts)
    return sum(c["dead"] for c in counts) / units if units else math.nan


def comparison_flags(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, difference: float,
                     names: tuple[str, str] = ("a", "b")) -> list[dict[str, str]]:
    """The flags of the verdict `a - b = difference` (correlation units) from both models' validity summaries;
    a model without one (scored without --validity) gives no flag, never a pass."""
    if not a or not b or not _finite(difference):
        return []
    flags = []
    pa, pb = _family(a, OWN_DENSITY).get("mean"), _family(b, OWN_DENSITY).get("mean")
    if _finite(pa) and _finite(pb) and difference != 0:
        bias = pa - pb
        if bias * difference > 0 and abs(bias) >= CONFOUNDED_SHARE * abs(difference):
            da, db = a["planted"]["own_density"], b["planted"]["own_density"]
            flags.append({"flag": "density-confounded", "reason": (
                f"perfectly token-determined units planted at {names[0]}'s density ({100 * da:.0f}%) and "
                f"{names[1]}'s ({100 * db:.0f}%) score {100 * pa:.1f} and {100 * pb:.1f}: the scorer's density bias "
                f"alone ({100 * bias:+.1f}) is at least {100 * CONFOUNDED_SHARE:.0f}% of the difference "
                f"({100 * difference:+.1f})")})
    sa, sb = _dead_share(a), _dead_share(b)
    if _finite(sa) and _finite(sb) and abs(sa - sb) > POPULATION_GAP:
        flags.append({"flag": "populations", "reason": (
            f"{100 * sa:.0f}% of {names[0]}'s units and {100 * sb:.0f}% of {names[1]}'s are dead and left out of "
            f"the layer means: the means are over different populations (see the dead-as-zero means)")})
    return flags


__all__ = ["INDICATOR_MIN", "NOISE_MAX", "DENSITY_MIN", "CONFOUNDED_SHARE", "POPULATION_GAP", "OWN_DENSITY",
           "model_flags", "unevaluated", "comparison_flags"]
