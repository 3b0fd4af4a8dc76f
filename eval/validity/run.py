"""Is the scorer valid on this model and data? The checks of one interpret run (`crate interpret --validity`), run
on the records and scores it just wrote, and their summary:

    <out>/validity/validity.json   {"protocol", "planted": {"families": {family: {metric: {"mean", "ci95", "n",
                                   "n_nan"}}}, "units": [...], "own_density", "layer", "replicates"},
                                   "layers": {layer: {"counts", "means", "density" ({neuron: activation
                                   density} of the scored units), "density_bins", "ceiling", "floor"}},
                                   "sanity": crate.eval.validity.sanity.sanity_checks(...), "flags": [...],
                                   "provenance": {"key" (the scores' key), "planted_key"}}
    <out>/validity/validity.md     the same as tables
    <out>/validity/planted/        the planted units' own interpret run (crate.eval.autointerp.interpret's layout)

The planted units go through the run's own explainer and simulator on its own tokens, so they measure this
scorer here; everything else is recomputed from the score files and recordings each time (seconds; an LLM
simulator's calls come from the run's LLM cache), and the planted run reuses what matches its inputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.autointerp.config import InterpretConfig, InterpretPlan
from crate.eval.autointerp.interpret import run_interpret
from crate.eval.autointerp.scores_io import done_neurons
from crate.eval.autointerp.summary import write_json
from crate.eval.progress import say
from crate.eval.record.recorder import LayerRecording
from crate.eval.stats.neurons import bootstrap_ci
from crate.eval.validity.ceilings import ceiling_summary, shuffled_floor
from crate.eval.validity.estimands import density_bins, layer_means, unit_counts
from crate.eval.validity.flags import model_flags
from crate.eval.validity.planted import family_table, plant_units
from crate.eval.validity.report import VALIDITY, validity_markdown
from crate.eval.validity.sanity import sanity_checks

METRICS = ("score", "random_score", "auprc", "auprc_lift", "detection", "fuzzing")
LLM_REPLICATES = 1  # planted units per family with an LLM scorer (a seeded sample: 11 units); 4 with stats


def score_lines(plan: InterpretPlan, layer: str) -> list[dict[str, Any]]:
    """The run's JSONL lines of `layer` (this run's key only), in neuron order."""
    done = done_neurons(plan.out / "scores" / plan.protocol.name / f"{layer}.jsonl", plan.key)
    return [done[n][0] for n in sorted(done) if n in set(plan.neurons[layer])]


def own_density(recs: dict[str, LayerRecording], neurons: dict[str, list[int]]) -> float:
    """The median activation density (fraction of tokens > 0) over the run's selected units: the density at which
    a perfectly token-determined unit is planted to show what the scorer gives such a unit here."""
    freq = np.concatenate([recs[k].active_count[np.asarray(v, dtype=np.int64)] / recs[k].n_tokens
                           for k, v in neurons.items()])
    return float(np.median(freq))


def _layer(rec: LayerRecording, lines: list[dict[str, Any]], plan: InterpretPlan) -> dict[str, Any]:
    cfg = plan.cfg
    counts = unit_counts(rec, lines)
    scores = {int(x["neuron"]): x["score"] for x in lines}
    freq = {n: float(rec.active_count[n] / rec.n_tokens) for n in scores}
    floor = shuffled_floor(lines, plan.simulator, seed=cfg.seed)
    vals = [v for v in floor.values() if v is not None and np.isfinite(v)]
    return {"counts": counts, "means": layer_means(lines, set(counts["dead_neurons"])),
            "density": {str(n): f for n, f in freq.items()},
            "density_bins": density_bins(freq, scores, n_boot=cfg.n_boot, seed=cfg.seed),
            "ceiling": ceiling_summary(lines),
            "floor": {"mean": float(np.mean(vals)) if vals else None, "n": len(vals),
                      "ci95": list(bootstrap_ci(vals, n_boot=cfg.n_boot, seed=cfg.seed))}}


def _planted(plan: InterpretPlan, recs: dict[str, LayerRecording], density: float) -> dict[str, Any]:
    """The planted units' own interpret run into <out>/validity/planted (reused when its inputs match)."""
    cfg = plan.cfg
    layer = min(int(k) for k in recs if k.isdigit()) if any(k.isdigit() for k in recs) else 0
    replicates = 4 if cfg.explainer == cfg.simulator == "stats" else LLM_REPLICATES
    model = plant_units(plan.model, plan.stream, plan.token_strings, plan.spec.n_tokens, plan.spec.seq_len,
                        layer=layer, replicates=replicates, seed=cfg.seed, own_density=round(density, 4) or None)
    k = len(model.units)
    sub = InterpretConfig(**{**cfg.to_dict(), "layers": [layer], "neurons": list(range(k)), "control": False,
                             "cache": cfg.cache or str(plan.out / "llm_cache.sqlite"), "progress": False})
    say(f"validity: {k} planted units ({k // replicates} families x {replicates}) through the run's scorer")
    # overwrite: the planted run is derived from this run's inputs alone, which plan_interpret has already let
    # replace what they replace; a planted run of other inputs belongs to the run this one replaced
    run_interpret(None, None, plan.out / VALIDITY / "planted", sub, model=model, stream=plan.stream,
                  token_strings=plan.token_strings, explainer=plan.explainer, simulator=plan.simulator,
                  name="planted", overwrite=True)
    path = plan.out / VALIDITY / "planted" / "scores" / plan.protocol.name / f"{layer}.jsonl"
    lines = [row for row, _ in done_neurons(path, _key(plan.out / VALIDITY / "planted")).values()]
    return {"families": family_table(lines, model.units, metrics=METRICS, n_boot=cfg.n_boot, seed=cfg.seed),
            "units": [dataclasses.asdict(u) for u in model.units], "own_density": density, "layer": layer,
            "replicates": replicates}


def _key(out: Path) -> str:
    import json

    return json.loads((out / "provenance.json").read_text())["key"]


def validate(plan: InterpretPlan, recs: dict[str, LayerRecording]) -> dict[str, Any]:
    """Check the scorer on the run `plan` just scored; write <out>/validity/ and return its summary."""
    out = plan.out / VALIDITY
    out.mkdir(parents=True, exist_ok=True)
    lines = {name: score_lines(plan, name) for name in recs}
    density = own_density(recs, plan.neurons)
    summary: dict[str, Any] = {
        "protocol": plan.protocol.name,
        "planted": _planted(plan, recs, density),
        "layers": {name: _layer(rec, lines[name], plan) for name, rec in recs.items()},
        "sanity": sanity_checks([x for ls in lines.values() for x in ls], plan.simulator, seed=plan.cfg.seed),
        "provenance": {"key": plan.key, "planted_key": _key(out / "planted")},
    }
    summary["flags"] = model_flags(summary)
    write_json(out / "validity.json", summary)
    (out / "validity.md").write_text(validity_markdown(summary), encoding="utf-8")
    say(f"validity {out}: recomputed from the scores ({len(summary['flags'])} flag(s))")
    return summary


__all__ = ["METRICS", "score_lines", "own_density", "validate"]
