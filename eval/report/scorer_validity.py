"""The report's "Is the scorer valid?" section, which leads its scores: per scored model (run with `--validity`),
the planted units' table, NeuronEval's sanity checks, who each layer mean counts, and every flag, those of the
CRATE - GPT verdicts included (crate.eval.validity.flags)."""

from __future__ import annotations

import math

from crate.eval.report.reproduction_tables import model_groups
from crate.eval.report.results import ModelResult
from crate.eval.validity.flags import comparison_flags
from crate.eval.validity.report import layers_table, planted_table, sanity_table


def _aggregate(r: ModelResult) -> float:
    summary = r.summary if isinstance(r.summary.get("aggregate"), dict) else (r.summary.get("models") or {}).get(
        r.name) or {}
    mean = (summary.get("aggregate") or {}).get("mean")
    return mean if isinstance(mean, (int, float)) else math.nan


def verdict_flags(results: list[ModelResult]) -> list[str]:
    """The flags of each CRATE - GPT (and GPT-SAE) verdict of the main table whose models were validated."""
    out = []
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        for arch in [a for a in by_arch if a != "gpt"]:
            a, b = by_arch[arch], by_arch.get("gpt")
            if b is None or not a.validity or not b.validity:
                continue
            for f in comparison_flags(a.validity, b.validity, _aggregate(a) - _aggregate(b), (arch, "gpt")):
                out.append(f"- {size} {protocol} ({scorer}) {arch} - gpt flagged ({f['flag']}): {f['reason']}")
    return out


def validity_section(results: list[ModelResult]) -> list[str]:
    """The section's lines; one line saying how to get it when no result was validated."""
    checked = [r for r in results if r.validity]
    lines = ["## Is the scorer valid?", ""]
    if not checked:
        return lines + ["No result was scored with `--validity` (`crate interpret --validity`; the demo does it): "
                        "nothing here shows the scorer can tell an interpretable unit from noise on this data.", ""]
    lines += ["Units of known behaviour written at each model's neurons on its own tokens and scored by the same "
              "explainer and simulator (planted), NeuronEval's sanity checks on the model's own explanations, and "
              "who each layer mean counts (crate.eval.validity).", ""]
    for r in checked:
        v = r.validity
        lines += [f"### {r.label}", "", *planted_table(v["planted"]), *layers_table(v["layers"]),
                  *sanity_table(v["sanity"])]
        lines += [f"- flagged ({f['flag']}): {f['reason']}" for f in v.get("flags") or []] or ["No flags."]
        lines.append("")
    flags = verdict_flags(results)
    lines += ["Verdicts:", "", *(flags or ["No CRATE - GPT verdict flagged."]), ""]
    return lines


__all__ = ["validity_section", "verdict_flags"]
