"""A validity summary (crate.eval.validity.run) as Markdown tables: the planted units first (what the scorer gives
units whose truth is known), then ceilings and floors, what each layer mean is a mean of, scores by activation
density, the sanity checks, and the flags."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from crate.eval.validity.flags import OWN_DENSITY

VALIDITY = "validity"  # <out>/validity/ of an interpret run: validity.json, validity.md, planted/
METRIC_NAMES = {"score": "score (protocol's correlation)", "random_score": "correlation on random records",
                "auprc": "AUPRC", "auprc_lift": "AUPRC above chance", "intruder": "intruder (chance 20)",
                "detection": "detection", "fuzzing": "fuzzing"}


def x100(v: Any) -> str:
    return "n/a" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{100 * v:.1f}"


def with_ci(s: Mapping[str, Any] | None) -> str:
    if not s or not isinstance(s.get("mean"), (int, float)) or not math.isfinite(s["mean"]):
        return "n/a"
    lo, hi = s.get("ci95") or (None, None)
    return f"{x100(s['mean'])} [{x100(lo)}, {x100(hi)}]"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def planted_table(planted: Mapping[str, Any]) -> list[str]:
    """Per planted family, its units' mean density and every metric's mean x100 with a bootstrap 95% interval."""
    families = planted.get("families") or {}
    metrics = [m for m in METRIC_NAMES if any(m in v for v in families.values())]
    density: dict[str, list[float]] = {}
    for u in planted.get("units") or []:
        density.setdefault(u["family"], []).append(u["density"])
    rows = []
    for family, by_metric in families.items():
        d = density.get(family, [])
        name = f"{OWN_DENSITY} ({100 * planted['own_density']:.0f}%)" if family.startswith(OWN_DENSITY) else family
        rows.append([name, f"{100 * sum(d) / len(d):.1f}%" if d else "n/a",
                     *(with_ci(by_metric.get(m)) for m in metrics)])
    return _table(["planted family", "active on", *(METRIC_NAMES[m] + " x100" for m in metrics)], rows)


def layers_table(layers: Mapping[str, Any]) -> list[str]:
    """Per layer: who is counted (units, scored, dead, always on, rare, never sampled), the means over scored units
    and with dead units as 0, the per-token lookup ceiling and the shuffled-explanation floor."""
    rows = []
    for name, v in layers.items():
        c, m, ceil = v["counts"], v["means"], v["ceiling"]
        rows.append([name, c["n_units"], c["scored"], c["dead"], c["always_on"], c["rare"], c["never_sampled"],
                     x100(m["over_scored"]), x100(m["dead_as_zero"]), x100(ceil.get("mean_ceiling")),
                     x100(ceil.get("fraction")), with_ci(v["floor"])])
    return _table(["layer", "units", "scored", "dead", "always on", "rare", "never sampled", "mean x100 (scored)",
                   "mean x100 (dead as 0)", "lookup ceiling x100", "score / ceiling x100",
                   "shuffled floor x100"], rows)


def density_table(layers: Mapping[str, Any]) -> list[str]:
    rows = [[name, f"{100 * b['bin'][0]:g}-{100 * b['bin'][1]:g}%", b["n"], with_ci(b)]
            for name, v in layers.items() for b in v["density_bins"] if b["n"]]
    return _table(["layer", "active on", "units", "mean score x100 [95% CI]"], rows)


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else "pass" if passed else "fail"


def sanity_table(sanity: Mapping[str, Any]) -> list[str]:
    """Per metric, the % of units whose score drops when the explanation loses true labels (missing) or gains
    false ones (extra), at label level and at explanation level (the explanation itself changed and simulated again)."""
    out = []
    for level in ("label", "explanation"):
        checks = sanity.get(level)
        if not checks:
            continue
        rows = [[m, f"{c['missing']:.1f}" if c.get("missing") is not None else "n/a",
                 f"{c['extra']:.1f}" if c.get("extra") is not None else "n/a", c.get("n"),
                 _verdict(((sanity.get("passes_by_level") or {}).get(level) or {}).get(m))]
                for m, c in checks.items()]
        out += [f"{level}-level:", "", *_table(["metric", "missing labels: % drop", "extra labels: % drop", "units",
                                                  "verdict"], rows)]
    return out


def validity_markdown(summary: Mapping[str, Any]) -> str:
    lines = [f"# Is the scorer valid here? ({summary['protocol']} protocol)", "",
             "## Planted units (known behaviour, this run's explainer, simulator and tokens)", "",
             *planted_table(summary["planted"]),
             "## Who is counted, ceilings and floors", "", *layers_table(summary["layers"]),
             "## Scores by activation density", "", *density_table(summary["layers"]),
             "## Sanity checks (NeuronEval: a sound metric drops for missing and for extra labels)", "",
             *sanity_table(summary["sanity"]), "## Flags", ""]
    lines += [f"- {f['flag']}: {f['reason']}" for f in summary["flags"]]
    lines += [f"- not evaluated: {x}" for x in summary.get("not_evaluated") or []]
    lines += [f"- {x}" for x in summary["planted"].get("notes") or []]
    if not summary["flags"]:
        lines.append("No flag" + (": the scorer passes the controls it could be given here." if not
                                  summary.get("not_evaluated") else " from the controls that could be read."))
    return "\n".join(lines) + "\n"


__all__ = ["VALIDITY", "planted_table", "layers_table", "density_table", "sanity_table", "validity_markdown", "x100", "with_ci"]
