"""Is the scorer valid on this model and data? The checks of one interpret run (`crate interpret --validity`), run
on the records and scores it just wrote, and their summary:

    <out>/validity/<protocol>/validity.json   {"protocol", "planted": {"families": {family: {metric: {"mean",
                                   "ci95", "n", "n_nan"}}}, "units": [...], "own_density", "layer", "replicates",
                                   "notes" (families not planted, and why), "key" (the planted run's)},
                                   "layers": {layer: {"counts", "means", "density" ({neuron: active share of the
                                   random records} of the scored units), "density_bins", "ceiling", "floor"}},
                                   "sanity": crate.eval.validity.sanity.sanity_checks(...), "flags": [...],
                                   "not_evaluated": [...] (controls that could not be read), "provenance": {"key"
                                   (the scores' key)}}
    <out>/validity/<protocol>/validity.md     the same as tables
    <out>/validity/<protocol>/planted/        the planted units' own interpret run (interpret's layout)

One folder per protocol, as the scores; its provenance names the scores' key it was made from (the report uses it
only with those scores), and its summary goes whenever those scores are discarded (the planted run stays: its own
provenance decides whether it is reused).

The planted units go through the run's own explainer and simulator on its own tokens, so they measure this
scorer here, and their run reuses what matches its inputs. Everything else is recomputed from the score files and
recordings each time: seconds with the stats scorer; with an LLM simulator the shuffled-explanation floor and the
explanation-level checks ask it new questions the first time (cached in the run's LLM cache after that).
"""

from __future__ import annotations

import dataclasses
import math
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
from crate.eval.validity.estimands import active_share, density_bins, layer_means, unit_counts
from crate.eval.validity.flags import OWN_DENSITY, model_flags, unevaluated
from crate.eval.validity.planted import FAMILIES, family_table, plant_units
from crate.eval.validity.report import VALIDITY, validity_markdown
from crate.eval.validity.sanity import sanity_checks

METRICS = ("score", "random_score", "auprc", "auprc_lift", "intruder", "detection", "fuzzing")
REPLICATES = {"stats": 4, "llm": 2}  # planted units per family: all the stats scorer's, a seeded sample with an LLM


def folder(plan: InterpretPlan) -> Path:
    """<out>/validity/<protocol>/ of a run."""
    return plan.out / VALIDITY / plan.protocol.name


def score_lines(plan: InterpretPlan, layer: str) -> list[dict[str, Any]]:
    """The run's JSONL lines of `layer` (this run's key only), in neuron order."""
    done = done_neurons(plan.out / "scores" / plan.protocol.name / f"{layer}.jsonl", plan.key)
    return [done[n][0] for n in sorted(done) if n in set(plan.neurons[layer])]


def own_density(lines: dict[str, list[dict[str, Any]]]) -> float:
    """The median activation density (`active_share`: the scorer's active share of the random records) over the
    run's live scored units: where a perfectly token-determined unit is planted to show what the scorer gives such a
    unit at this model's density; NaN when no live unit has random records."""
    shares = [active_share(x) for ls in lines.values() for x in ls if x["max_activation"] > 0]
    shares = [v for v in shares if np.isfinite(v)]
    return float(np.median(shares)) if shares else math.nan


def _layer(rec: LayerRecording, lines: list[dict[str, Any]], plan: InterpretPlan) -> dict[str, Any]:
    cfg = plan.cfg
    counts = unit_counts(rec, lines)
    scores = {int(x["neuron"]): x["score"] for x in lines}
    freq = {int(x["neuron"]): active_share(x) for x in lines}
    floor = shuffled_floor(lines, plan.simulator, seed=cfg.seed)
    vals = [v for v in floor.values() if v is not None and np.isfinite(v)]
    return {"counts": counts, "means": layer_means(lines, set(counts["dead_neurons"])),
            "density": {str(n): f for n, f in freq.items()},
            "density_bins": density_bins(freq, scores, n_boot=cfg.n_boot, seed=cfg.seed),
            "ceiling": ceiling_summary(lines),
            "floor": {"mean": float(np.mean(vals)) if vals else None, "n": len(vals),
                      "ci95": list(bootstrap_ci(vals, n_boot=cfg.n_boot, seed=cfg.seed))}}


def _planted(plan: InterpretPlan, recs: dict[str, LayerRecording], density: float) -> dict[str, Any]:
    """The planted units' own interpret run into <out>/validity/<protocol>/planted (reused when its inputs match):
    every family these tokens can carry, REPLICATES units each (fewer where the layer is narrow)."""
    cfg = plan.cfg
    layer = min(int(k) for k in recs if k.isdigit()) if any(k.isdigit() for k in recs) else 0
    own = round(density, 4) if np.isfinite(density) and round(density, 4) > 0 else None
    n_families = len(FAMILIES) + (own is not None)
    wanted = REPLICATES["stats" if cfg.explainer == cfg.simulator == "stats" else "llm"]
    replicates = min(wanted, int(plan.model.n_neurons) // n_families)
    notes = [] if own is not None else [f"{OWN_DENSITY} not planted: no live scored unit is active on the random "
                                        f"records (median active share {density})"]
    if replicates < 1:
        return {"families": {}, "units": [], "own_density": density, "layer": layer, "replicates": 0,
                "notes": notes + [f"nothing planted: layer {layer} has {plan.model.n_neurons} units, fewer than the "
                                  f"{n_families} families"]}
    model = plant_units(plan.model, plan.stream, plan.token_strings, plan.spec.n_tokens, plan.spec.seq_len,
                        layer=layer, replicates=replicates, seed=cfg.seed, own_density=own, strict=False)
    notes += [f"{f} not planted: it {why}" for f, why in model.skipped.items()]
    k = len(model.units)
    sub = InterpretConfig(**{**cfg.to_dict(), "layers": [layer], "neurons": list(range(k)), "control": False,
                             "cache": cfg.cache or str(plan.out / "llm_cache.sqlite"), "progress": False})
    say(f"validity: {k} planted units ({k // replicates} families x {replicates}) through the run's scorer")
    # overwrite: the planted run is derived from this run's inputs alone, which plan_interpret has already let
    # replace what they replace; a planted run of other inputs belongs to the run this one replaced
    key = run_interpret(None, None, folder(plan) / "planted", sub, model=model, stream=plan.stream,
                        token_strings=plan.token_strings, explainer=plan.explainer, simulator=plan.simulator,
                        name="planted", overwrite=True)["provenance"]["key"]
    path = folder(plan) / "planted" / "scores" / plan.protocol.name / f"{layer}.jsonl"
    lines = [row for row, _ in done_neurons(path, key).values()]
    return {"families": family_table(lines, model.units, metrics=METRICS, n_boot=cfg.n_boot, seed=cfg.seed),
            "units": [dataclasses.asdict(u) for u in model.units], "own_density": density, "layer": layer,
            "replicates": replicates, "notes": notes, "key": key}


def validate(plan: InterpretPlan, recs: dict[str, LayerRecording]) -> dict[str, Any]:
    """Check the scorer on the run `plan` just scored; write <out>/validity/ and return its summary."""
    out = folder(plan)
    out.mkdir(parents=True, exist_ok=True)
    lines = {name: score_lines(plan, name) for name in recs}
    density = own_density(lines)
    summary: dict[str, Any] = {
        "protocol": plan.protocol.name,
        "planted": _planted(plan, recs, density),
        "layers": {name: _layer(rec, lines[name], plan) for name, rec in recs.items()},
        "sanity": sanity_checks([x for ls in lines.values() for x in ls], plan.simulator, seed=plan.cfg.seed),
        "provenance": {"key": plan.key},
    }
    summary["flags"] = model_flags(summary)
    summary["not_evaluated"] = unevaluated(summary)
    write_json(out / "validity.json", summary)
    (out / "validity.md").write_text(validity_markdown(summary), encoding="utf-8")
    say(f"validity {out}: recomputed from the scores ({len(summary['flags'])} flag(s))")
    return summary


__all__ = ["METRICS", "folder", "score_lines", "own_density", "validate"]
