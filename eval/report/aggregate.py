"""A model's scores as the reports show them: per-layer means and the model's mean over layers, x100, with
bootstrap intervals, and the difference between two models.

All statistics are crate.eval.stats.neurons' (the module `crate interpret` uses); this module only adapts a
ModelResult to it and scales by 100. A layer's score is the mean over its scored neurons (NaN scores dropped and
counted; `layer_summary`); a model's score is the mean of its per-layer means over the layers used, its variance
the population variance of those per-layer means (`model_aggregate`). The layers used are the numbered layers with
a finite score less the last layer of 6- and 12-layer models, as in the paper (`used_layers`, exclude_last="auto";
the depth is the config's, else one past the highest scored layer). Intervals are percentile bootstraps over
neurons, resampled within each layer and seeded (`bootstrap_ci`, `aggregate_ci`); a difference (`compare_models`)
resamples the same neuron indices in both models when both scored the same neurons (paired), else each model
independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from crate.eval.report.results import ModelResult, score_value
from crate.eval.stats import neurons as neuron_stats

N_BOOT = 2000


@dataclass
class LayerStat:
    layer: str
    mean: float  # x100
    lo: float
    hi: float
    n: int
    n_nan: int


@dataclass
class Aggregate:
    mean: float  # x100, mean over the layers used of the per-layer means
    var: float  # population variance of the x100 per-layer means: (x100)^2 units, the paper's convention
    lo: float
    hi: float
    layers_used: list[str]
    layers: list[LayerStat]
    n_neurons: int


def metric_value(row: dict[str, Any], metric: str = "score") -> float:
    """A line's `metric` as a float (the paper's score by default); NaN when missing or undefined."""
    if metric == "score":
        return score_value(row)
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def layer_scores(result: ModelResult, protocol: str, metric: str = "score") -> dict[str, dict[Any, float]]:
    """{layer: {neuron: value of `metric`}} of one protocol, the input of crate.eval.stats.neurons (a neuron scored
    twice: the last line counts, as when `crate interpret` resumes)."""
    def key(n: Any) -> Any:
        try:
            return int(n)
        except (TypeError, ValueError):
            return n

    return {layer: {key(r["neuron"]): metric_value(r, metric) for r in rows}
            for layer, rows in result.scores[protocol].items()}


def _model_layers(scores: dict[str, dict[Any, float]]) -> list[str]:
    """The layers that can enter a model's score: the numbered ones (all, if none is numbered)."""
    return [k for k in scores if k.isdigit()] or list(scores)


def model_depth(result: ModelResult, layers: list[str]) -> int | None:
    """The model's depth: its config's, else one past its highest scored layer."""
    numeric = [int(k) for k in layers if k.isdigit()]
    return result.n_layer if result.n_layer is not None else (max(numeric) + 1 if numeric else None)


def aggregate(result: ModelResult, protocol: str, seed: int = 0, n_boot: int = N_BOOT,
              metric: str = "score") -> Aggregate:
    """Per-layer means and intervals (neurons.layer_summary) and the model's score (neurons.model_aggregate over
    neurons.used_layers, interval neurons.aggregate_ci) of `metric`, all x100; layers without a finite value are not
    used."""
    scores = layer_scores(result, protocol, metric)
    layers = []
    for layer, by_neuron in scores.items():
        s = neuron_stats.layer_summary(list(by_neuron.values()), n_boot=n_boot, seed=seed)
        layers.append(LayerStat(layer, s["mean"] * 100, s["ci95"][0] * 100, s["ci95"][1] * 100, s["n"], s["n_nan"]))
    n = {s.layer: s.n for s in layers}
    candidates = _model_layers(scores)
    agg = neuron_stats.model_aggregate({s.layer: s.mean for s in layers if s.layer in candidates and s.n > 0},
                                       model_depth(result, candidates), exclude_last="auto")
    used = agg["layers_used"]
    if not used:
        nan = math.nan
        return Aggregate(nan, nan, nan, nan, [], layers, 0)
    lo, hi = neuron_stats.aggregate_ci(scores, used, n_boot=n_boot, seed=seed)
    return Aggregate(mean=agg["mean"], var=agg["var_pop"], lo=lo * 100, hi=hi * 100, layers_used=used, layers=layers,
                     n_neurons=sum(n[k] for k in used))


def difference(a: ModelResult, b: ModelResult, protocol: str, seed: int = 0, n_boot: int = N_BOOT,
               metric: str = "score") -> dict[str, Any]:
    """neurons.compare_models for a - b of `metric` on one protocol, x100: paired when both scored the same neuron
    indices."""
    sa, sb = layer_scores(a, protocol, metric), layer_scores(b, protocol, metric)
    la, lb = _model_layers(sa), _model_layers(sb)
    c = neuron_stats.compare_models({k: sa[k] for k in la}, {k: sb[k] for k in lb}, model_depth(a, la),
                                    model_depth(b, lb), exclude_last="auto", n_boot=n_boot, seed=seed)
    return {**c, "difference": c["difference"] * 100, "ci95": [x * 100 for x in c["ci95"]]}
