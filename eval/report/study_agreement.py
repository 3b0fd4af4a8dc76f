"""The study's "Does the fast scorer stand in for an LLM?" table: on the units of the first training seed that the
embedded SmolLM2 scored, their token-statistics correlation against SmolLM2's (crate.eval.stats.agreement), per
system over every size and over both systems together."""

from __future__ import annotations

from crate.eval.report.paper import SYSTEM_LABELS
from crate.eval.report.study_scores import Collected
from crate.eval.report.tables import Table, fmt_ci
from crate.eval.stats.agreement import scorer_agreement


def paired_units(collected: Collected, sizes: list[str], system: str) -> tuple[list[float], list[float]]:
    """(stats, SmolLM2) correlation x100 of every unit both scored, over `sizes`, in a fixed order."""
    stats, llm = [], []
    for size in sizes:
        a, b = collected.by_unit.get(("trained", size, system), {}), collected.by_unit.get(("llm", size, system), {})
        for unit in sorted(set(a) & set(b)):
            stats.append(a[unit])
            llm.append(b[unit])
    return stats, llm


def agreement_table(collected: Collected, sizes: list[str]) -> Table:
    rows, pooled = [], ([], [])
    for system in ("crate", "gpt"):
        stats, llm = paired_units(collected, sizes, system)
        if not stats:
            continue
        pooled[0].extend(stats)
        pooled[1].extend(llm)
        rows.append((SYSTEM_LABELS[system], scorer_agreement(stats, llm)))
    if len(rows) > 1:
        rows.append(("both", scorer_agreement(*pooled)))
    columns = ["system", "units", "Pearson r", "95% CI", "Spearman rho", "stats x100", "SmolLM2 x100"]
    return Table("Does the fast scorer stand in for an LLM? The same units through both (first seed, TaR)", columns,
                 [{"system": name, "units": a["n"], "Pearson r": a["pearson"], "95% CI": fmt_ci(*a["pearson_ci95"]),
                   "Spearman rho": a["spearman"], "stats x100": a["mean_a"], "SmolLM2 x100": a["mean_b"], "_numbers": a}
                  for name, a in rows],
                 "Each unit of the first seed that the embedded SmolLM2 explained and simulated (--llm-neurons a layer, "
                 "every size), against its token-statistics correlation on the same records: Pearson's r with "
                 "Fisher's 95% interval, and Spearman's rank correlation, over the units both scored. The stats "
                 "scorer's verdicts say what an LLM's would only as far as this correlation goes; a 135M explainer "
                 "is itself a weak LLM.")


__all__ = ["agreement_table", "paired_units"]
