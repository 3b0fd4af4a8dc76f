"""A run's summary: per layer the scores' statistics and the explanation-free measures, per model the aggregate;
the same as a Markdown table; and the JSON files of results (NaN written as null)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crate.eval.autointerp.config import InterpretConfig
from crate.eval.autointerp.protocols import get_protocol
from crate.eval.record.measures import layer_measures
from crate.eval.record.recorder import LayerRecording
from crate.eval.stats.neurons import aggregate_ci, layer_summary, model_aggregate
from crate.provenance import canonical


def summarise_layers(recs: dict[str, LayerRecording], per_layer: dict[str, dict[int, float]], n_layer: int,
                     cfg: InterpretConfig, neurons: dict[str, list[int]],
                     excluded: Callable[[str], int] = lambda _name: 0) -> dict[str, Any]:
    """Per layer the scores' summary over the units the selection was drawn from (`excluded` left out, so the
    finite-population correction collapses when every live SAE latent is scored); per model the aggregate."""
    layers: dict[str, Any] = {}
    for name, rec in recs.items():
        scores = [per_layer.get(name, {}).get(n, math.nan) for n in neurons[name]]
        s = layer_summary(scores, n_total=rec.n_neurons - excluded(name), n_boot=cfg.n_boot, seed=cfg.seed)
        s["measures"] = layer_measures(rec)
        layers[name] = s
    agg = model_aggregate({k: v["mean"] for k, v in layers.items() if k.isdigit()}, n_layer, cfg.exclude_last)
    agg["ci95"] = aggregate_ci(per_layer, agg["layers_used"], n_boot=cfg.n_boot, seed=cfg.seed)
    return canonical({"protocol": get_protocol(cfg.protocol).name, "layers": layers, "aggregate": agg,
                      "scores": {k: {str(n): s for n, s in v.items()} for k, v in per_layer.items()}})


def summary_markdown(models: dict[str, dict[str, Any]], comparison: dict[str, Any] | None = None) -> str:
    """summary.md: per model a row per layer and one for the aggregate (x100), then the comparisons."""
    f = lambda x, s=100: "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * s:.2f}"  # noqa: E731
    lines = ["| model | layer | mean x100 | 95% CI x100 | n (NaN) | L0/token | dead | top/random | top-10 token share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mname, s in models.items():
        for layer, v in s["layers"].items():
            m = v.get("measures", {})
            ci = v.get("ci95") or [None, None]
            lines.append(f"| {mname} | {layer} | {f(v['mean'])} | [{f(ci[0])}, {f(ci[1])}] | {v['n']} ({v['n_nan']}) "
                         f"| {f(m.get('l0_per_token'), 1)} | {m.get('dead')} | {f(m.get('top_random_ratio_median'), 1)} "
                         f"| {f(m.get('token_top10_share_median'), 1)} |")
        a = s["aggregate"]
        lines.append(f"| {mname} | mean of layers {','.join(a['layers_used'])} | {f(a['mean'])} | variance of the "
                     f"x100 layer means {f(a['var_pop'], 100 ** 2)} | | | | | |")
    if comparison:
        for k, c in comparison.items():
            lines.append(f"\n{k}: difference x100 {f(c['difference'])} [{f(c['ci95'][0])}, {f(c['ci95'][1])}] "
                         f"({'paired' if c['paired'] else 'unpaired'} bootstrap over neurons)")
            if c.get("density_reweighted"):
                d = c["density_reweighted"]
                dropped = ", ".join(f"{100 * b['bin'][0]:g}-{100 * b['bin'][1]:g}% ({b['n_a']} vs {b['n_b']} units)"
                                    for b in d["bins_dropped"] if b["n_a"] or b["n_b"])
                lines.append(f"- at one activation-density mix (the units of the layers used, pooled, reweighted per "
                             f"density bin): difference x100 {f(d['difference'])} [{f(d['ci95'][0])}, "
                             f"{f(d['ci95'][1])}]; the same units unweighted {f(d['raw_difference'])}"
                             + (f"; bins only one model populates, left out: {dropped}" if dropped else ""))
            lines += [f"- flagged ({fl['flag']}): {fl['reason']}" for fl in c.get("flags") or []]
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, NaN and infinities as null (crate.provenance.canonical)."""
    path.write_text(json.dumps(canonical(obj), indent=1))


__all__ = ["summarise_layers", "summary_markdown", "write_json"]
