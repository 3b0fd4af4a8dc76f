"""The study's tables (`crate study`), built from its collected scores: each system over training seeds, the
differences between systems, the spread across layers, controls, measures, validation loss and the LLM sample,
each with the study's intervals side by side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from crate.eval.report.paper import PROTOCOL_LABELS, SYSTEM_LABELS
from crate.eval.report.results import load_train_run
from crate.eval.report.study_layout import run_dir
from crate.eval.report.study_scores import SCORE_METRICS, Collected, describe_system, unit_sizes, width_ratio
from crate.eval.report.tables import Table, fmt_ci

PAIRS = (("crate", "gpt"), ("gpt-sae", "gpt"), ("crate", "gpt-sae"))
MEASURES = ("l0_fraction", "dead", "always_on", "token_top10_share_median", "top_random_ratio_median", "kurtosis_median")


def _intervals(d: dict[str, Any]) -> dict[str, Any]:
    """The columns every table shares, from a describe_system() or seed_compare() result."""
    return {"seed-aware 95% CI": fmt_ci(*d["ci95_seeds"]), "two-level bootstrap 95% CI": fmt_ci(*d["ci95_bootstrap"]),
            "seed 0 alone": d["estimate_seed0"], "seed 0 95% CI (neurons)": fmt_ci(*d["ci95_seed0"]),
            "width ratio": width_ratio(d["ci95_seeds"], d["ci95_seed0"])}


INTERVALS = ["seed-aware 95% CI", "two-level bootstrap 95% CI", "seed 0 alone", "seed 0 95% CI (neurons)", "width ratio"]
INTERVALS_NOTE = ("Seed-aware: Student's t over the per-seed values (Welch's for a difference). Two-level bootstrap: "
                  "seeds, then neurons within each drawn seed (too narrow with few seeds). Seed 0 alone: the first "
                  "trained model, neurons resampled, as a one-model study reports it. Width ratio: the seed-aware "
                  "interval's width over seed 0's.")


def systems_table(collected: Collected, sizes: list[str], systems: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for metric in SCORE_METRICS:
            for size in sizes:
                for system in systems:
                    runs = collected.get("trained", size, system, protocol, metric)
                    if not runs:
                        continue
                    d = describe_system(runs, n_boot, seed)
                    rows.append({"size": size, "protocol": protocol, "metric": metric, "system": SYSTEM_LABELS[system],
                                 "estimate": d["estimate"], **_intervals(d),
                                 "per seed": ", ".join(f"{v:.2f}" for v in d["per_seed"]),
                                 "neurons per seed": ", ".join(map(str, d["neurons_per_seed"])), "_numbers": d})
    return Table("Systems over training seeds", ["size", "protocol", "metric", "system", "estimate", *INTERVALS,
                                                 "per seed", "neurons per seed"], rows,
                 "x100. Estimate: the mean over seeds of each model's mean of per-layer means. " + INTERVALS_NOTE)


def differences_table(collected: Collected, sizes: list[str], systems: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for metric in SCORE_METRICS:
            for size in sizes:
                for a, b in PAIRS:
                    if a not in systems or b not in systems:
                        continue
                    d = collected.compare(("trained", size, a, protocol, metric), ("trained", size, b, protocol, metric),
                                          "mean", n_boot, seed)
                    if d is None:
                        continue
                    rows.append({"size": size, "protocol": protocol, "metric": metric,
                                 "comparison": f"{SYSTEM_LABELS[a]} - {SYSTEM_LABELS[b]}", "difference": d["estimate"],
                                 **_intervals(d), "_numbers": d})
    return Table("Differences between systems", ["size", "protocol", "metric", "comparison", "difference", *INTERVALS],
                 rows, "x100; the two systems are resampled independently. " + INTERVALS_NOTE)


def variance_table(collected: Collected, sizes: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for protocol in collected.protocols:
        for size in sizes:
            if collected.n_layers(size, protocol) < 2:
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
                rows.append({"size": size, "protocol": protocol, "system": SYSTEM_LABELS[system],
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
            row: dict[str, Any] = {"size": size, "system": SYSTEM_LABELS[system]}
            for m in MEASURES:
                vals = [layers[k][m] for layers in per_seed for k in layers if m in layers[k]]
                row[m] = float(np.mean(vals)) if vals else math.nan
            rows.append(row)
    return Table("Explanation-free measures", ["size", "system", *MEASURES], rows,
                 "Means over seeds and layers of crate.eval.record.measures' per-layer values (activations alone, no scorer).")


def val_loss_table(out: Path, units: list[Any]) -> Table:
    rows = []
    for size in unit_sizes(units):
        for arch in ("crate", "gpt"):
            losses = []
            for u in (u for u in units if u.size == size):
                run = run_dir(out, u.seed, size, arch)
                tr = load_train_run(run, run / "metrics.csv") if (run / "metrics.csv").is_file() else None
                if tr is not None:
                    losses.append(tr.final)
            params = next(u.params[arch] for u in units if u.size == size)
            rows.append({"size": size, "arch": SYSTEM_LABELS[arch], "parameters": f"{params:,}",
                         "final val loss (mean)": float(np.mean(losses)) if losses else math.nan,
                         "per seed": ", ".join(f"{v:.3f}" for v in losses)})
    return Table("Validation loss", ["size", "arch", "parameters", "final val loss (mean)", "per seed"], rows)


def llm_table(collected: Collected, sizes: list[str], n_boot: int, seed: int) -> Table:
    rows = []
    for size in sizes:
        for system in ("crate", "gpt"):
            runs = collected.get("llm", size, system, PROTOCOL_LABELS["tar"])
            if not runs:
                continue
            d = describe_system(runs, n_boot, seed)
            rows.append({"size": size, "system": SYSTEM_LABELS[system], "neurons (all layers)": d["neurons_per_seed"][0],
                         "correlation x100": d["estimate"], "95% CI (neurons)": fmt_ci(*d["ci95_seed0"])})
    return Table("Embedded LLM (SmolLM2-135M), first seed", ["size", "system", "neurons (all layers)", "correlation x100",
                                                            "95% CI (neurons)"], rows,
                 "A seeded sample per layer through the real LLM path (TaR): too few neurons, one seed, and a 135M "
                 "explainer, so no verdict is read from it.")

