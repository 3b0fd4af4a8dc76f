"""The study's scores, read once from every scored folder (laid out by crate.eval.report.study_layout): each
system's per-layer x100 values over its training seeds, and each system's estimate with its intervals
(crate.eval.stats.seeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from crate.errors import PipelineError
from crate.eval.report.aggregate import metric_value, model_depth
from crate.eval.report.paper import PROTOCOL_LABELS, canonical_protocol
from crate.eval.report.results import ModelResult, load_model_result
from crate.eval.report.study_layout import interpret_dir
from crate.eval.stats import neurons as neuron_stats
from crate.eval.stats import seeds as seed_stats

SCORE_METRICS = ("correlation", "random_score", "auprc_lift", "intruder", "detection", "fuzzing")
Runs = list[dict[str, np.ndarray]]  # per training seed: {layer: x100 scores of its neurons}


def _metric(row: dict[str, Any], metric: str) -> float:
    return metric_value(row, "score" if metric == "correlation" else metric)


def model_runs(result: ModelResult, protocol: str, metric: str) -> dict[str, np.ndarray]:
    """{layer: x100 values} of one scored model, over the layers that enter its score."""
    rows = result.scores.get(protocol) or {}
    layers = [k for k in rows if k.isdigit()]
    return {k: 100 * np.asarray([_metric(r, metric) for r in rows[k]], dtype=np.float64)
            for k in neuron_stats.used_layers(sorted(layers, key=int), model_depth(result, layers))}


def unit_sizes(units: list[Any]) -> list[str]:
    """The study's sizes, in the order of its units."""
    return list(dict.fromkeys(u.size for u in units))


class Collected:
    """Every scored folder of the study, read once: scores by (kind, size, system, protocol, metric) over seeds."""

    def __init__(self, out: Path, opts: Any, units: list[Any]):
        self.protocols = [canonical_protocol(p) for p in opts.protocols]
        self.systems = ["crate", "gpt", *(["gpt-sae"] if opts.sae else [])]
        self.runs: dict[tuple[str, str, str, str, str], Runs] = {}
        self.measures: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
        self.inputs: list[dict[str, Any]] = []
        self.validity: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}  # (kind, size, system, protocol)
        # the first seed's TaR correlation x100 of every unit, by (layer, neuron): the scorers compared unit by unit
        self.by_unit: dict[tuple[str, str, str], dict[tuple[str, int], float]] = {}  # (kind, size, system)
        self._compared: dict[tuple, dict[str, Any]] = {}
        for unit in units:
            for system in self.systems:
                folders = [("trained", interpret_dir(out, unit.seed, unit.size, system))]
                if opts.control_neurons != 0 and system != "gpt-sae":
                    folders.append(("control", interpret_dir(out, unit.seed, unit.size, f"{system}-control")))
                if unit.seed == 0 and opts.llm_neurons and system != "gpt-sae":
                    folders.append(("llm", interpret_dir(out, 0, unit.size, system, llm=True)))
                for kind, folder in folders:
                    self._read(kind, unit, system, folder)

    def _read(self, kind: str, unit: Any, system: str, folder: Path) -> None:
        if not (folder / "scores").is_dir():
            raise PipelineError(f"{folder} has no scores: run `crate study` with the same options to finish it")
        result = load_model_result(folder)
        protocols = [PROTOCOL_LABELS["tar"]] if kind == "llm" else self.protocols
        for protocol in protocols:
            if protocol not in result.scores:
                raise PipelineError(f"{folder} has no {protocol} scores: run `crate study` again to finish it")
            for metric in SCORE_METRICS if kind != "llm" else ("correlation",):
                self.runs.setdefault((kind, unit.size, system, protocol, metric), []).append(
                    model_runs(result, protocol, metric))
        tar = PROTOCOL_LABELS["tar"]
        if unit.seed == 0 and tar in result.scores:
            self.by_unit[(kind, unit.size, system)] = {(layer, int(r["neuron"])): 100 * _metric(r, "correlation")
                                                       for layer, rows in result.scores[tar].items() for r in rows}
        if kind == "trained":
            self.measures.setdefault((unit.size, system), []).append(result.measures)
        for protocol, v in result.validity.items():  # per seed
            self.validity.setdefault((kind, unit.size, system, protocol), []).append(v)
        provenance = result.summary.get("provenance") or {}
        data = provenance.get("data") or {}
        self.inputs.append({"kind": kind, "seed": unit.seed, "size": unit.size, "system": system, "path": str(folder),
                            "key": provenance.get("key"), "token_offset": data.get("offset", 0),
                            "tokens_sha256": data.get("tokens_sha256")})

    def get(self, kind: str, size: str, system: str, protocol: str, metric: str = "correlation") -> Runs | None:
        return self.runs.get((kind, size, system, protocol, metric))

    def n_layers(self, size: str, protocol: str) -> int:
        """How many layers enter a model's score at this size (GPT's, first seed; 0 when not scored)."""
        runs = self.get("trained", size, "gpt", protocol)
        return len(runs[0]) if runs else 0

    def compare(self, a: tuple[str, str, str, str, str], b: tuple[str, str, str, str, str], statistic: str,
                n_boot: int, seed: int) -> dict[str, Any] | None:
        """seeds.seed_compare of two keys of `runs` (None when one is missing), computed once: the verdicts and the
        tables ask for the same differences."""
        if a not in self.runs or b not in self.runs:
            return None
        key = (a, b, statistic, n_boot, seed)
        if key not in self._compared:
            self._compared[key] = seed_stats.seed_compare(self.runs[a], self.runs[b], n_boot, seed, statistic)
        return self._compared[key]


def describe_system(runs: Runs, n_boot: int, seed: int, statistic: str = "mean") -> dict[str, Any]:
    """One system: estimate, the seed-aware (t), two-level bootstrap and seed-0-alone intervals, each seed's value."""
    both = seed_stats.seed_bootstrap(runs, n_boot, [seed, 11], True, statistic)
    first = seed_stats.seed_bootstrap(runs[:1], n_boot, [seed, 12], False, statistic)
    seeds = seed_stats.t_interval(both["per_seed"])
    return {"estimate": both["estimate"], "ci95_seeds": seeds, "ci95_bootstrap": both["ci95"],
            "estimate_seed0": first["estimate"], "ci95_seed0": first["ci95"],
            "width_ratio": width_ratio(seeds, first["ci95"]), "per_seed": both["per_seed"], "n_seeds": both["n_seeds"],
            "neurons_per_seed": [int(sum(np.isfinite(v).sum() for v in r.values())) for r in runs]}


def width_ratio(wide: list[float], narrow: list[float]) -> float:
    """The width of interval `wide` over that of `narrow` (NaN when `narrow` has no width)."""
    w, n = wide[1] - wide[0], narrow[1] - narrow[0]
    return w / n if n > 0 else math.nan
