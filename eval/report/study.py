"""The study's report: per size, protocol and metric, each system's score over its training seeds with two
intervals, the differences between systems, the spread across layers, controls, measures, and a verdict per claim.

    <out>/index.md                        everything below, verdicts first
    <out>/tables/verdicts.{md,csv,tex}    one row per claim of the paper at these sizes: holds / reversed / not resolved
    <out>/tables/systems.{md,csv,tex}     CRATE, GPT, GPT-SAE: estimate, seed-aware, bootstrap and seed-0 95% intervals
    <out>/tables/differences.{md,csv,tex} CRATE - GPT, GPT-SAE - GPT, CRATE - GPT-SAE, with both intervals
    <out>/tables/layer_variance.*         the population variance of the per-layer means, CRATE against GPT
    <out>/tables/controls.*, measures.*, val_loss.*, llm_sample.*
    <out>/plots/score_vs_depth_<protocol>.png   score against depth for every system, both intervals
    <out>/study.json                      the numbers, the settings, the machine and each input's provenance key

Scores are x100 (correlations; detection and fuzzing are balanced accuracies x100). A model's score is the mean of
its per-layer means (crate.eval.stats.neurons.used_layers: every layer at these depths); a system's estimate is the mean over
its training seeds. The seed-aware interval is Student's t over the per-seed values (Welch's for a difference): it
holds the training-seed noise, and the neuron noise inside each seed's value, and the verdicts read it. The
two-level bootstrap (seeds, then neurons within each drawn seed) is shown beside it; with 3 seeds it covers less
than 95% (its seed-level draws take 10 distinct values), so no verdict is read from it. "Seed 0 alone" is the first
trained model with its neurons resampled: the interval a one-model study such as the paper's can give, and the
verdict it would reach (crate.eval.stats.seeds.seed_compare). Systems are resampled independently of each other.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.stats import neurons as neuron_stats
from crate.eval.stats import seeds as seed_stats
from crate.eval.report.results import (
    COLORS, PAPER_SAE_LAYERS, PAPER_SCORES, PAPER_VARIANCE, ModelResult, Table, _plt, canonical_protocol, fmt_ci,
    load_model_result, load_train_run, score_value,
)

LABEL = {"crate": "CRATE", "gpt": "GPT", "gpt-sae": "GPT-SAE"}
METRICS = ("correlation", "detection", "fuzzing")
PAIRS = (("crate", "gpt"), ("gpt-sae", "gpt"), ("crate", "gpt-sae"))
MEASURES = ("l0_fraction", "dead", "always_on", "token_top10_share_median", "top_random_ratio_median", "kurtosis_median")
Runs = list[dict[str, np.ndarray]]  # per training seed: {layer: x100 scores of its neurons}


def _metric(row: dict[str, Any], metric: str) -> float:
    if metric == "correlation":
        return score_value(row)
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) else math.nan


def model_runs(result: ModelResult, protocol: str, metric: str) -> dict[str, np.ndarray]:
    """{layer: x100 values} of one scored model, over the layers that enter its score."""
    rows = result.scores.get(protocol) or {}
    layers = [k for k in rows if k.isdigit()]
    n_layer = result.n_layer if result.n_layer is not None else (max(map(int, layers)) + 1 if layers else None)
    return {k: 100 * np.asarray([_metric(r, metric) for r in rows[k]], dtype=np.float64)
            for k in neuron_stats.used_layers(sorted(layers, key=int), n_layer)}


class Collected:
    """Every scored folder of the study, read once: scores by (kind, size, system, protocol, metric) over seeds."""

    def __init__(self, out: Path, opts: Any, units: list[Any]):
        from crate.eval.workflows.study import interpret_dir

        self.protocols = [canonical_protocol(p) for p in opts.protocols]
        self.runs: dict[tuple[str, str, str, str, str], Runs] = {}
        self.measures: dict[tuple[str, str], list[dict[str, dict[str, float]]]] = {}
        self.inputs: list[dict[str, Any]] = []
        self._compared: dict[tuple, dict[str, Any]] = {}
        systems = ["crate", "gpt", *(["gpt-sae"] if opts.sae else [])]
        for unit in units:
            for system in systems:
                folders = [("trained", interpret_dir(out, unit.seed, unit.size, system))]
                if opts.control_neurons != 0 and system != "gpt-sae":
                    folders.append(("control", interpret_dir(out, unit.seed, unit.size, f"{system}-control")))
                if unit.seed == 0 and opts.llm_neurons and system != "gpt-sae":
                    folders.append(("llm", interpret_dir(out, 0, unit.size, system, llm=True)))
                for kind, folder in folders:
                    self._read(kind, unit, system, folder)

    def _read(self, kind: str, unit: Any, system: str, folder: Path) -> None:
        from crate.eval.workflows.study import PipelineError

        if not (folder / "scores").is_dir():
            raise PipelineError(f"{folder} has no scores: run `crate study` with the same options to finish it")
        result = load_model_result(folder)
        protocols = ["TaR"] if kind == "llm" else self.protocols
        for protocol in protocols:
            if protocol not in result.scores:
                raise PipelineError(f"{folder} has no {protocol} scores: run `crate study` again to finish it")
            for metric in METRICS if kind != "llm" else ("correlation",):
                self.runs.setdefault((kind, unit.size, system, protocol, metric), []).append(
                    model_runs(result, protocol, metric))
        if kind == "trained":
            self.measures.setdefault((unit.size, system), []).append(result.measures)
        self.inputs.append({"kind": kind, "seed": unit.seed, "size": unit.size, "system": system, "path": str(folder),
                            "key": (result.summary.get("provenance") or {}).get("key")})

    def get(self, kind: str, size: str, system: str, protocol: str, metric: str = "correlation") -> Runs | None:
        return self.runs.get((kind, size, system, protocol, metric))

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


def describe(runs: Runs, n_boot: int, seed: int, statistic: str = "mean") -> dict[str, Any]:
    """One system: estimate, the seed-aware (t), two-level bootstrap and seed-0-alone intervals, each seed's value."""
    both = seed_stats.seed_bootstrap(runs, n_boot, [seed, 11], True, statistic)
    first = seed_stats.seed_bootstrap(runs[:1], n_boot, [seed, 12], False, statistic)
    seeds = seed_stats.t_interval(both["per_seed"])
    return {"estimate": both["estimate"], "ci95_seeds": seeds, "ci95_bootstrap": both["ci95"],
            "estimate_seed0": first["estimate"], "ci95_seed0": first["ci95"],
            "width_ratio": _ratio(seeds, first["ci95"]), "per_seed": both["per_seed"], "n_seeds": both["n_seeds"],
            "neurons_per_seed": [int(sum(np.isfinite(v).sum() for v in r.values())) for r in runs]}


def _ratio(wide: list[float], narrow: list[float]) -> float:
    w, n = wide[1] - wide[0], narrow[1] - narrow[0]
    return w / n if n > 0 else math.nan


def _intervals(d: dict[str, Any]) -> dict[str, Any]:
    """The columns every table shares, from a describe() or seed_compare() result."""
    return {"seed-aware 95% CI": fmt_ci(*d["ci95_seeds"]), "two-level bootstrap 95% CI": fmt_ci(*d["ci95_bootstrap"]),
            "seed 0 alone": d["estimate_seed0"], "seed 0 95% CI (neurons)": fmt_ci(*d["ci95_seed0"]),
            "width ratio": _ratio(d["ci95_seeds"], d["ci95_seed0"])}


INTERVALS = ["seed-aware 95% CI", "two-level bootstrap 95% CI", "seed 0 alone", "seed 0 95% CI (neurons)", "width ratio"]
INTERVALS_NOTE = ("Seed-aware: Student's t over the per-seed values (Welch's for a difference). Two-level bootstrap: "
                  "seeds, then neurons within each drawn seed (too narrow with few seeds). Seed 0 alone: the first "
                  "trained model, neurons resampled, as a one-model study reports it. Width ratio: the seed-aware "
                  "interval's width over seed 0's.")


def _sizes(units: list[Any]) -> list[str]:
    return list(dict.fromkeys(u.size for u in units))


def _n_layers(collected: Collected, size: str, protocol: str) -> int:
    runs = collected.get("trained", size, "gpt", protocol)
    return len(runs[0]) if runs else 0


# --- claims ------------------------------------------------------------------------------------------------
def claims(sizes: list[str], protocols: list[str], sae: bool, n_layers: dict[str, int]) -> list[dict[str, Any]]:
    """The paper's claims that these sizes can test, each with its direction, from its numbers (SPEC.md 6 and 6a):
    CRATE against GPT at every size and protocol; CRATE's layer variance below GPT's (the paper's 6L and 12L claim,
    tested at the depths here that have two layers or more); GPT-SAE against CRATE, and above GPT on short-context."""
    from crate.eval.report.results import paper_row

    out = []
    for protocol in protocols:
        for size in sizes:
            row = paper_row(size)
            if (row, protocol) not in PAPER_SCORES:
                continue
            c, g = PAPER_SCORES[(row, protocol)]
            out.append({"claim": f"CRATE {'>' if c > g else '<'} GPT at {size}", "protocol": protocol, "size": size,
                        "a": "crate", "b": "gpt", "direction": 1 if c > g else -1, "statistic": "mean",
                        "paper": f"{c:g} vs {g:g}"})
            if sae and (row, protocol) in PAPER_SAE_LAYERS:
                s = float(np.mean(PAPER_SAE_LAYERS[(row, protocol)]))
                out.append({"claim": f"CRATE {'>' if c > s else '<'} GPT-SAE at {size}", "protocol": protocol,
                            "size": size, "a": "crate", "b": "gpt-sae", "direction": 1 if c > s else -1,
                            "statistic": "mean", "paper": f"{c:g} vs {s:.2f}"})
                if protocol == "short-context":
                    out.append({"claim": f"GPT-SAE > GPT at {size}", "protocol": protocol, "size": size,
                                "a": "gpt-sae", "b": "gpt", "direction": 1 if s > g else -1, "statistic": "mean",
                                "paper": f"{s:.2f} vs {g:g}"})
        paper_var = "; ".join(f"{r}: {a:g} vs {b:g}" for (r, p), (a, b) in PAPER_VARIANCE.items() if p == protocol)
        for size in sizes:
            if n_layers.get(size, 0) >= 2 and paper_var:
                out.append({"claim": f"CRATE's layer variance < GPT's at {size}", "protocol": protocol, "size": size,
                            "a": "crate", "b": "gpt", "direction": -1, "statistic": "var_corrected",
                            "paper": f"at 6L/12L only ({paper_var})"})
    return out


def verdict_rows(collected: Collected, claim_list: list[dict[str, Any]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for c in claim_list:
        d = collected.compare(("trained", c["size"], c["a"], c["protocol"], "correlation"),
                              ("trained", c["size"], c["b"], c["protocol"], "correlation"), c["statistic"], n_boot, seed)
        if d is None:
            continue
        rows.append({"claim": c["claim"], "protocol": c["protocol"], "paper": c["paper"],
                     "here": f"{d['a']['estimate']:.2f} vs {d['b']['estimate']:.2f}", "difference": d["estimate"],
                     "seed-aware 95% CI": fmt_ci(*d["ci95_seeds"]),
                     "verdict": seed_stats.verdict(*d["ci95_seeds"], c["direction"]),
                     "two-level bootstrap 95% CI": fmt_ci(*d["ci95_bootstrap"]),
                     "seed 0 alone": d["estimate_seed0"], "seed 0 95% CI (neurons)": fmt_ci(*d["ci95_seed0"]),
                     "verdict from seed 0 alone": seed_stats.verdict(*d["ci95_seed0"], c["direction"]),
                     "seeds": min(d["a"]["n_seeds"], d["b"]["n_seeds"]), "_numbers": d})
    return rows


# --- tables ------------------------------------------------------------------------------------------------
def systems_table(collected: Collected, sizes: list[str], systems: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for metric in METRICS:
            for size in sizes:
                for system in systems:
                    runs = collected.get("trained", size, system, protocol, metric)
                    if not runs:
                        continue
                    d = describe(runs, n_boot, seed)
                    rows.append({"size": size, "protocol": protocol, "metric": metric, "system": LABEL[system],
                                 "estimate": d["estimate"], **_intervals(d),
                                 "per seed": ", ".join(f"{v:.2f}" for v in d["per_seed"]),
                                 "neurons per seed": ", ".join(map(str, d["neurons_per_seed"])), "_numbers": d})
    return Table("Systems over training seeds", ["size", "protocol", "metric", "system", "estimate", *INTERVALS,
                                                 "per seed", "neurons per seed"], rows,
                 "x100. Estimate: the mean over seeds of each model's mean of per-layer means. " + INTERVALS_NOTE)


def differences_table(collected: Collected, sizes: list[str], systems: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for metric in METRICS:
            for size in sizes:
                for a, b in PAIRS:
                    if a not in systems or b not in systems:
                        continue
                    d = collected.compare(("trained", size, a, protocol, metric), ("trained", size, b, protocol, metric),
                                          "mean", n_boot, seed)
                    if d is None:
                        continue
                    rows.append({"size": size, "protocol": protocol, "metric": metric,
                                 "comparison": f"{LABEL[a]} - {LABEL[b]}", "difference": d["estimate"],
                                 **_intervals(d), "_numbers": d})
    return Table("Differences between systems", ["size", "protocol", "metric", "comparison", "difference", *INTERVALS],
                 rows, "x100; the two systems are resampled independently. " + INTERVALS_NOTE)


def variance_table(collected: Collected, sizes: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for size in sizes:
            if _n_layers(collected, size, protocol) < 2:
                continue
            a, b = (("trained", size, s, protocol, "correlation") for s in ("crate", "gpt"))
            raw, d = (collected.compare(a, b, statistic, n_boot, seed) for statistic in ("var", "var_corrected"))
            if raw is None or d is None:
                continue
            rows.append({"size": size, "protocol": protocol, "CRATE var": raw["a"]["estimate"],
                         "GPT var": raw["b"]["estimate"], "CRATE var corrected": d["a"]["estimate"],
                         "GPT var corrected": d["b"]["estimate"], "CRATE - GPT (corrected)": d["estimate"],
                         **_intervals(d), "_numbers": {"raw": raw, "corrected": d}})
    return Table("Spread across layers", ["size", "protocol", "CRATE var", "GPT var", "CRATE var corrected",
                                          "GPT var corrected", "CRATE - GPT (corrected)", *INTERVALS], rows,
                 "var: the population variance of a model's x100 per-layer means ((x100)^2, the paper's statistic), "
                 "averaged over seeds. Neuron sampling adds (L - 1) / L^2 * sum of the layers' squared standard errors "
                 "to it, which differs between systems of different widths: 'corrected' subtracts that, and the "
                 "differences and the verdicts use it. " + INTERVALS_NOTE)


def controls_table(collected: Collected, sizes: list[str], systems: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for size in sizes:
            for system in systems:
                d = collected.compare(("trained", size, system, protocol, "correlation"),
                                      ("control", size, system, protocol, "correlation"), "mean", n_boot, seed)
                if d is None:
                    continue
                rows.append({"size": size, "protocol": protocol, "system": LABEL[system],
                             "random init": d["b"]["estimate"], "random init 95% CI": fmt_ci(*d["b"]["ci95_seeds"]),
                             "trained": d["a"]["estimate"], "trained - random init": d["estimate"],
                             "seed-aware 95% CI": fmt_ci(*d["ci95_seeds"]), "_numbers": d})  # t intervals
    return Table("Random-initialisation controls", ["size", "protocol", "system", "random init", "random init 95% CI",
                                                    "trained", "trained - random init", "seed-aware 95% CI"], rows,
                 "Correlation x100 of a seeded sample of each untrained model's neurons (one random init per training "
                 "seed), against the trained models: what the protocol finds without learning. Seed-aware intervals "
                 "(Student's t / Welch's over seeds).")


def measures_table(collected: Collected, sizes: list[str], systems: list[str]) -> Table:
    rows = []
    for size in sizes:
        for system in systems:
            per_seed = collected.measures.get((size, system)) or []
            row: dict[str, Any] = {"size": size, "system": LABEL[system]}
            for m in MEASURES:
                vals = [layers[k][m] for layers in per_seed for k in layers if m in layers[k]]
                row[m] = float(np.mean(vals)) if vals else math.nan
            rows.append(row)
    return Table("Explanation-free measures", ["size", "system", *MEASURES], rows,
                 "Means over seeds and layers of crate.eval.record.measures' per-layer values (activations alone, no scorer).")


def val_loss_table(out: Path, units: list[Any]) -> Table:
    from crate.eval.workflows.study import run_dir

    rows = []
    for size in _sizes(units):
        for arch in ("crate", "gpt"):
            losses = []
            for u in (u for u in units if u.size == size):
                run = run_dir(out, u.seed, size, arch)
                tr = load_train_run(run, run / "metrics.csv") if (run / "metrics.csv").is_file() else None
                if tr is not None:
                    losses.append(tr.final)
            params = next(u.params[arch] for u in units if u.size == size)
            rows.append({"size": size, "arch": LABEL[arch], "parameters": f"{params:,}",
                         "final val loss (mean)": float(np.mean(losses)) if losses else math.nan,
                         "per seed": ", ".join(f"{v:.3f}" for v in losses)})
    return Table("Validation loss", ["size", "arch", "parameters", "final val loss (mean)", "per seed"], rows)


def llm_table(collected: Collected, sizes: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for size in sizes:
        for system in ("crate", "gpt"):
            runs = collected.get("llm", size, system, "TaR")
            if not runs:
                continue
            d = describe(runs, n_boot, seed)
            rows.append({"size": size, "system": LABEL[system], "neurons (all layers)": d["neurons_per_seed"][0],
                         "correlation x100": d["estimate"], "95% CI (neurons)": fmt_ci(*d["ci95_seed0"])})
    return Table("Embedded LLM (SmolLM2-135M), first seed", ["size", "system", "neurons (all layers)", "correlation x100",
                                                            "95% CI (neurons)"], rows,
                 "A seeded sample per layer through the real LLM path (TaR): too few neurons, one seed, and a 135M "
                 "explainer, so no verdict is read from it.")


# --- plots -------------------------------------------------------------------------------------------------
def plot_depth(systems_rows: list[dict[str, Any]], protocol: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rows = [r for r in systems_rows if r["protocol"] == protocol and r["metric"] == "correlation"]
    labels = list(dict.fromkeys(r["system"] for r in rows))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["system"] == label]
        x = np.array([sizes.index(r["size"]) for r in mine]) + (i - (len(labels) - 1) / 2) * 0.12
        d = [r["_numbers"] for r in mine]
        m = np.array([v["estimate"] for v in d])
        color = COLORS.get({v: k for k, v in LABEL.items()}[label])

        def err(c: np.ndarray, key: str, d: list[dict[str, Any]] = d) -> np.ndarray:
            return np.array([[e - v[key][0] for e, v in zip(c, d)], [v[key][1] - e for e, v in zip(c, d)]])

        ax.errorbar(x, m, yerr=np.nan_to_num(err(m, "ci95_seeds")), fmt="o-", color=color, elinewidth=1.2, capsize=3,
                    label=f"{label} (seed-aware)")
        m0 = np.array([v["estimate_seed0"] for v in d])
        ax.errorbar(x + 0.05, m0, yerr=np.nan_to_num(err(m0, "ci95_seed0")), fmt="s", ms=3, color=color, elinewidth=4,
                    alpha=0.45)
        for xi, v in zip(x, d):
            ax.scatter([xi - 0.04] * len(v["per_seed"]), v["per_seed"], s=8, color=color, alpha=0.5, marker="x")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("depth")
    ax.set_ylabel("score (correlation x100)")
    ax.set_title(f"{protocol}: mean over seeds, seed-aware 95% CI (t); seed 0 alone with its neurons' CI (thick); "
                 f"each seed (x)", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the report --------------------------------------------------------------------------------------------
def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items() if k != "_numbers"} for r in rows]


def _numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k != "boots"}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    return [{**_public([r])[0], "numbers": clean(r.get("_numbers"))} for r in rows]


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, {platform.system()}"


def write_study_report(out: Path, opts: Any, units: list[Any], timings: dict[str, Any],
                       command: str | None = None) -> Path:
    """Read every scored folder of the study and write the report; returns <out>/index.md."""
    import crate

    collected = Collected(out, opts, units)
    sizes = _sizes(units)
    systems = ["crate", "gpt", *(["gpt-sae"] if opts.sae else [])]
    n_boot, seed = opts.n_boot, opts.interpret_seed
    (out / "tables").mkdir(exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    n_layers = {s: _n_layers(collected, s, collected.protocols[0]) for s in sizes}
    verdicts = Table("Verdicts", ["claim", "protocol", "paper", "here", "difference", "seed-aware 95% CI", "verdict",
                                  "two-level bootstrap 95% CI", "seed 0 alone", "seed 0 95% CI (neurons)",
                                  "verdict from seed 0 alone", "seeds"],
                     verdict_rows(collected, claims(sizes, collected.protocols, opts.sae, n_layers), n_boot, seed),
                     "One row per claim of the paper these sizes can test, its direction from the paper's numbers. "
                     "holds / reversed: the seed-aware 95% interval of the difference (Welch's t over the seeds; x100, "
                     "for the variance (x100)^2, noise-corrected) lies on the claimed / the other side of 0; not "
                     "resolved: it holds 0. The last columns read the claim as a one-model study would: seed 0 alone, "
                     "an interval over its neurons. " + ("CRATE's dictionary is widened to GPT's parameter count "
                     "(--match params); the paper compares at equal width (h = 4d)." if opts.match == "params" else
                     "Equal width (h = 4d for both), as the paper."))
    tables = {"verdicts": verdicts,
              "systems": systems_table(collected, sizes, systems, n_boot, seed),
              "differences": differences_table(collected, sizes, systems, n_boot, seed),
              "layer_variance": variance_table(collected, sizes, n_boot, seed),
              "controls": controls_table(collected, sizes, systems, n_boot, seed),
              "measures": measures_table(collected, sizes, systems),
              "val_loss": val_loss_table(out, units),
              "llm_sample": llm_table(collected, sizes, n_boot, seed)}
    for stem, table in tables.items():
        shown = Table(table.title, table.columns, _public(table.rows), table.note)
        shown.write(out / "tables", stem)
    plots = [plot_depth(tables["systems"].rows, p, out / "plots" / f"score_vs_depth_{p}.png").name
             for p in collected.protocols]
    wall, jobs = float(timings.get("wall", 0.0)), " or ".join(map(str, timings.get("jobs", [1])))
    per_run = timings.get("runs", {})
    seeds = sorted({u.seed for u in units})
    settings = {"sizes": sizes, "seeds": len(seeds), "train_seeds": [1337 + s for s in seeds], "steps": opts.steps,
                "context": opts.context, "vocab_size": opts.vocab_size, "match": opts.match, "sae": opts.sae,
                "protocols": collected.protocols, "neurons": opts.neurons or "all",
                "control_neurons": "all" if opts.control_neurons is None else opts.control_neurons,
                "llm_neurons": opts.llm_neurons, "n_tokens": opts.n_tokens, "interpret_seed": opts.interpret_seed,
                "n_boot": n_boot, "overrides": list(opts.overrides)}
    summary = {"settings": settings, "machine": machine(), "crate_version": crate.__version__, "command": command,
               "seconds": {"wall": wall, "jobs": jobs, "per_run": {u.name: per_run.get(u.name) for u in units}},
               "parameters": {u.size: u.params for u in units if u.seed == seeds[0]},
               "tables": {stem: _numbers(t.rows) for stem, t in tables.items()}, "inputs": collected.inputs}
    (out / "study.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")

    md = ["# crate-lm study: the paper's claim at CPU scale", ""]
    md.append(f"`{command or 'crate study'}` on {machine()}: {wall / 60:.1f} min of wall time with {jobs} runs at once "
              f"(summed over the invocations that computed something; per run in `timings.json`).")
    md += ["", f"Settings: {json.dumps(settings)}", ""]
    md += ["Parameters: " + "; ".join(f"{u.size} CRATE {u.params['crate']:,} (n_hidden {u.n_hidden['crate']}) vs GPT "
                                      f"{u.params['gpt']:,}" for u in units if u.seed == seeds[0]), ""]
    for stem in ("verdicts", "systems", "differences", "layer_variance", "controls", "measures", "val_loss", "llm_sample"):
        t = tables[stem]
        if not t.rows:
            continue
        rows = t.rows if stem != "systems" else [r for r in t.rows if r["metric"] == "correlation"]
        md += [f"## {t.title}", "", t.note, "", Table(t.title, t.columns, _public(rows)).to_markdown()]
        if stem == "systems":
            md += ["Detection and fuzzing: [tables/systems.md](tables/systems.md).", ""]
        if stem == "verdicts":
            md += [f"![score against depth, {p}](plots/{name})" for p, name in zip(collected.protocols, plots)] + [""]
        md += [f"Files: [tables/{stem}.md](tables/{stem}.md), [tables/{stem}.csv](tables/{stem}.csv)", ""]
    md += ["## How to read the intervals", "", __doc__.split("\n\n")[2].replace("\n", " "), ""]
    (out / "index.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(tables["verdicts"].title)
    print(Table("", [c for c in verdicts.columns if c != "seeds"], _public(verdicts.rows)).to_markdown())
    return out / "index.md"


__all__ = ["write_study_report", "claims", "verdict_rows", "describe", "model_runs", "Collected"]
