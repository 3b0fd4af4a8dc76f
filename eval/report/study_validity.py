"""The study's "Is the scorer valid?" table: per size, scorer and system, what the planted units of every family
score through that scorer (crate.eval.validity.planted; the mean over training seeds of each seed's family mean,
with the spread of those per-seed means), and each system's flags (crate.eval.validity.flags)."""

from __future__ import annotations

import math

import numpy as np

from crate.eval.report.paper import SYSTEM_LABELS
from crate.eval.report.study_scores import Collected
from crate.eval.report.tables import Table
from crate.eval.validity.flags import OWN_DENSITY

SCORERS = {"trained": "stats", "llm": "SmolLM2-135M"}


def _family_means(validities: list[dict], family: str, metric: str) -> list[float]:
    out = []
    for v in validities:
        m = (((v.get("planted") or {}).get("families") or {}).get(family) or {}).get(metric) or {}
        if isinstance(m.get("mean"), (int, float)) and math.isfinite(m["mean"]):
            out.append(100 * m["mean"])
    return out


def _order(collected: Collected, sizes: list[str]) -> list[tuple[str, str, str, str]]:
    """The (kind, size, system, protocol) keys of the validated folders: stats before the LLM, then as the study."""
    return sorted(collected.validity, key=lambda k: (list(SCORERS).index(k[0]), sizes.index(k[1]),
                                                     collected.systems.index(k[2]), k[3]))


def validity_table(collected: Collected, sizes: list[str]) -> Table:
    rows = []
    for kind, size, system, protocol in _order(collected, sizes):
        validities = collected.validity[(kind, size, system, protocol)]
        families = dict.fromkeys(f for v in validities for f in (v.get("planted") or {}).get("families") or {})
        flags = sorted({f["flag"] for v in validities for f in v.get("flags") or []})
        for family in families:
            score = _family_means(validities, family, "score")
            lift = _family_means(validities, family, "auprc_lift")
            rows.append({"size": size, "scorer": SCORERS[kind], "protocol": protocol, "system": SYSTEM_LABELS[system],
                         "planted family": family if family != OWN_DENSITY else f"{family} (system's density)",
                         "score x100": float(np.mean(score)) if score else math.nan,
                         "score range over seeds": f"{min(score):.1f} to {max(score):.1f}" if score else "n/a",
                         "AUPRC lift x100": float(np.mean(lift)) if lift else math.nan, "seeds": len(score),
                         "system flags": ", ".join(flags) or "none"})
    return Table("Is the scorer valid? Planted units of known behaviour through the study's scorers",
                 ["size", "scorer", "protocol", "system", "planted family", "score x100", "score range over seeds",
                  "AUPRC lift x100", "seeds", "system flags"], rows,
                 "Units of known behaviour written at each trained model's layer-0 neurons on the study's tokens and "
                 "scored like its own (the protocol's correlation; AUPRC lift: (AUPRC - chance) / (1 - chance)): a "
                 "one-key indicator should score 100 and noise 0; the lookups show the scorer's density bias. Flags: "
                 "crate.eval.validity.flags (each interpret folder's validity/<protocol>/validity.md gives the "
                 "reasons).")


__all__ = ["validity_table"]
