"""The report's "Is the scorer valid?" section, which leads its scores: per scored model (run with `--validity`),
the planted units' table, NeuronEval's sanity checks, who each layer mean counts, and every flag, those of the
CRATE - GPT verdicts included (crate.eval.validity.flags)."""

from __future__ import annotations

from crate.eval.report.aggregate import N_BOOT, difference, layer_scores
from crate.eval.report.reproduction_tables import model_groups
from crate.eval.report.results import ModelResult
from crate.eval.validity.estimands import density_mix, density_reweighted
from crate.eval.validity.flags import comparison_flags
from crate.eval.validity.report import layers_table, planted_table, sanity_table, x100


def verdict_flags(results: list[ModelResult]) -> list[str]:
    """The flags of each CRATE - GPT (and GPT-SAE - GPT) verdict of the main table, per protocol and scorer: flagged,
    not flagged, or not evaluated (a model scored without --validity)."""
    out = []
    for (size, protocol, scorer), by_arch in model_groups(results).items():
        for arch in [a for a in by_arch if a != "gpt"]:
            a, b = by_arch[arch], by_arch.get("gpt")
            if b is None:
                continue
            what = f"{size} {protocol} ({scorer}) {arch} - gpt"
            va, vb = a.validity.get(protocol), b.validity.get(protocol)
            if not va or not vb:
                missing = " and ".join(r.name for r, v in ((a, va), (b, vb)) if not v)
                out.append(f"- {what}: not evaluated ({missing} scored without --validity)")
                continue
            d = difference(a, b, protocol, n_boot=1)  # the main table's point estimate and layers
            flags = comparison_flags(va, vb, d["difference"] / 100, (arch, "gpt"))
            out += [f"- {what} flagged ({f['flag']}): {f['reason']}" for f in flags] or [f"- {what}: no flag"]
            w = density_reweighted(density_mix(va["layers"], layer_scores(a, protocol), d["layers_a"]),
                                   density_mix(vb["layers"], layer_scores(b, protocol), d["layers_b"]), n_boot=N_BOOT)
            out.append(f"  - {what} at one activation-density mix (the headline's layers, units reweighted per "
                       f"density bin): {x100(w['difference'])} [{x100(w['ci95'][0])}, {x100(w['ci95'][1])}], the "
                       f"same units unweighted {x100(w['raw_difference'])}")
    return out


def validity_section(results: list[ModelResult]) -> list[str]:
    """The section's lines; one line saying how to get it when no result was validated."""
    checked = [(r, protocol, v) for r in results for protocol, v in r.validity.items()]
    lines = ["## Is the scorer valid?", ""]
    if not checked:
        return lines + ["No result was scored with `--validity` (`crate interpret --validity`; the demo does it): "
                        "nothing here shows the scorer can tell an interpretable unit from noise on this data.", ""]
    lines += ["Units of known behaviour written at each model's neurons on its own tokens and scored by the same "
              "explainer and simulator (planted), NeuronEval's sanity checks on the model's own explanations, and "
              "who each layer mean counts (crate.eval.validity).", ""]
    for r, protocol, v in checked:
        lines += [f"### {r.label}, {protocol}", "", *planted_table(v["planted"]), *layers_table(v["layers"]),
                  *sanity_table(v["sanity"])]
        lines += [f"- flagged ({f['flag']}): {f['reason']}" for f in v.get("flags") or []] or ["No flags."]
        lines.append("")
    return lines + ["Verdicts:", "", *verdict_flags(results), ""]


__all__ = ["validity_section", "verdict_flags"]
