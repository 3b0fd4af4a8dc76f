"""The study's report: per size, protocol and metric, each system's score over its training seeds with two
intervals, the differences between systems, the spread across layers, controls, measures, and a verdict per claim.

    <out>/index.md                        everything below, verdicts first
    <out>/tables/verdicts.{md,csv,tex}    one row per claim of the paper at these sizes: holds / reversed / equivalent /
                                          not resolved (Holm over the table, TOST with a margin)
    <out>/tables/matched_loss.*           each seed's CRATE and GPT at the validation loss both reach (grid checkpoints)
    <out>/tables/validity.{md,csv,tex}    is the scorer valid? planted units through each scorer, systems' flags
    <out>/tables/agreement.{md,csv,tex}   the stats scorer against SmolLM2 on the same units (first seed)
    <out>/tables/systems.{md,csv,tex}     CRATE, GPT, GPT-SAE: estimate, seed-aware, bootstrap and seed-0 95% intervals
    <out>/tables/differences.{md,csv,tex} CRATE - GPT, GPT-SAE - GPT, CRATE - GPT-SAE, with both intervals
    <out>/tables/layer_variance.*         the population variance of the per-layer means, CRATE against GPT
    <out>/tables/controls.*, measures.*, val_loss.*, llm_sample.*
    <out>/plots/score_vs_depth_<protocol>.png   score against depth for every system, both intervals
    <out>/plots/score_vs_loss_<protocol>.png    score against validation loss along training, every seed
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

from crate.eval.report.plots import plot_depth
from crate.eval.report.study_agreement import agreement_table
from crate.eval.report.study_claims import verdicts_table
from crate.eval.report.study_curves import matched_table, plot_curves, read_curves
from crate.eval.report.study_layout import grid_size, grid_steps
from crate.eval.report.study_scores import Collected, unit_sizes
from crate.eval.report.study_validity import validity_table
from crate.eval.report.study_tables import (
    controls_table, differences_table, llm_table, measures_table, systems_table, val_loss_table, variance_table,
)
from crate.eval.report.tables import Table


def _public(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the tables show them: without the numbers behind them, arrays as lists."""
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items() if k != "_numbers"} for r in rows]


def _numbers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as study.json holds them: with the numbers behind them, less the bootstrap draws, NaN as null."""
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
    """The machine the study ran on, in words (cores, CPU model and the instruction set torch used, Python, OS)."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}; torch {torch.backends.cpu.get_cpu_capability()}), "
            f"Python {platform.python_version()}, {platform.system()}")


def write_study_report(out: Path, opts: Any, units: list[Any], timings: dict[str, Any],
                       command: str | None = None) -> Path:
    """Read every scored folder of the study and write the report; returns <out>/index.md."""
    collected = Collected(out, opts, units)
    sizes = unit_sizes(units)
    n_boot, seed = opts.n_boot, opts.interpret_seed
    (out / "tables").mkdir(exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    curves = read_curves(out, units, grid_steps(opts.steps, opts.grid), collected.protocols)
    tables = {"verdicts": verdicts_table(collected, sizes, opts.sae, opts.match, n_boot, seed, curves, opts.margin),
              "matched_loss": matched_table(curves, sizes, collected.protocols),
              "validity": validity_table(collected, sizes),
              "agreement": agreement_table(collected, sizes),
              "systems": systems_table(collected, sizes, collected.systems, n_boot, seed),
              "differences": differences_table(collected, sizes, collected.systems, n_boot, seed),
              "layer_variance": variance_table(collected, sizes, n_boot, seed),
              "controls": controls_table(collected, sizes, collected.systems, n_boot, seed),
              "measures": measures_table(collected, sizes, collected.systems),
              "val_loss": val_loss_table(out, units),
              "llm_sample": llm_table(collected, sizes, n_boot, seed)}
    for stem, table in tables.items():
        shown = Table(table.title, table.columns, _public(table.rows), table.note)
        shown.write(out / "tables", stem)
    plots = [plot_depth(tables["systems"].rows, p, out / "plots" / f"score_vs_depth_{p}.png").name
             for p in collected.protocols]
    if curves:
        plots += [plot_curves(curves, sizes, p, out / "plots" / f"score_vs_loss_{p}.png").name
                  for p in collected.protocols]
    settings = {**_settings(opts, units, collected.protocols),
                "token_offsets": {f"seed{i['seed']}": i["token_offset"] for i in collected.inputs if i["kind"] == "trained"}}
    _write_summary(out, units, timings, command, settings, tables, collected.inputs)
    _write_index(out, units, timings, command, settings, tables, plots)
    verdicts = tables["verdicts"]
    print(verdicts.title)
    print(Table("", [c for c in verdicts.columns if c != "seeds"], _public(verdicts.rows)).to_markdown())
    return out / "index.md"


def _seconds(timings: dict[str, Any]) -> tuple[float, str]:
    """The study's wall time and the numbers of runs it ran at once, from timings.json."""
    return float(timings.get("wall", 0.0)), " or ".join(map(str, timings.get("jobs", [1])))


def _settings(opts: Any, units: list[Any], protocols: list[str]) -> dict[str, Any]:
    seeds = sorted({u.seed for u in units})
    return {"sizes": unit_sizes(units), "seeds": len(seeds), "train_seeds": [1337 + s for s in seeds],
            "steps": opts.steps, "context": opts.context, "vocab_size": opts.vocab_size, "match": opts.match,
            "sae": opts.sae, "protocols": protocols, "neurons": opts.neurons or "all",
            "control_neurons": "all" if opts.control_neurons is None else opts.control_neurons,
            "llm_neurons": opts.llm_neurons, "n_tokens": opts.n_tokens, "interpret_seed": opts.interpret_seed,
            "n_boot": opts.n_boot, "overrides": list(opts.overrides), "grid": grid_size(opts.steps, opts.grid),
            "curve_neurons": opts.curve_neurons, "margin": opts.margin}


def _write_summary(out: Path, units: list[Any], timings: dict[str, Any], command: str | None,
                   settings: dict[str, Any], tables: dict[str, Table], inputs: list[dict[str, Any]]) -> None:
    """<out>/study.json: the numbers, the settings, the machine and each input's provenance key."""
    import crate

    wall, jobs = _seconds(timings)
    per_run = timings.get("runs", {})
    first_seed = min(u.seed for u in units)
    summary = {"settings": settings, "machine": machine(), "crate_version": crate.__version__, "command": command,
               "seconds": {"wall": wall, "jobs": jobs, "per_run": {u.name: per_run.get(u.name) for u in units}},
               "parameters": {u.size: u.params for u in units if u.seed == first_seed},
               "tables": {stem: _numbers(t.rows) for stem, t in tables.items()}, "inputs": inputs}
    (out / "study.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")


def _write_index(out: Path, units: list[Any], timings: dict[str, Any], command: str | None,
                 settings: dict[str, Any], tables: dict[str, Table], plots: list[str]) -> None:
    """<out>/index.md: every table with rows, verdicts first, the plots (file names) after the verdicts."""
    wall, jobs = _seconds(timings)
    first_seed = min(u.seed for u in units)
    md = ["# crate-lm study: the paper's claim at CPU scale", ""]
    md.append(f"`{command or 'crate study'}` on {machine()}: {wall / 60:.1f} min of wall time with {jobs} runs at once "
              f"(summed over the invocations that computed something; per run in `timings.json`).")
    md += ["", f"Settings: {json.dumps(settings)}", ""]
    md += ["Parameters: " + "; ".join(f"{u.size} CRATE {u.params['crate']:,} (n_hidden {u.n_hidden['crate']}) vs GPT "
                                      f"{u.params['gpt']:,}" for u in units if u.seed == first_seed), ""]
    for stem in ("verdicts", "matched_loss", "validity", "agreement", "systems", "differences", "layer_variance", "controls",
                 "measures", "val_loss", "llm_sample"):
        t = tables[stem]
        if not t.rows:
            continue
        rows = t.rows if stem != "systems" else [r for r in t.rows if r["metric"] == "correlation"]
        md += [f"## {t.title}", "", t.note, "", Table(t.title, t.columns, _public(rows)).to_markdown()]
        if stem == "systems":
            md += ["Detection and fuzzing: [tables/systems.md](tables/systems.md).", ""]
        if stem == "verdicts":
            md += [f"![{name[:-4].replace('_', ' ')}](plots/{name})" for name in plots] + [""]
        md += [f"Files: [tables/{stem}.md](tables/{stem}.md), [tables/{stem}.csv](tables/{stem}.csv)", ""]
    md += ["## How to read the intervals", "", __doc__.split("\n\n")[2].replace("\n", " "), ""]
    (out / "index.md").write_text("\n".join(md) + "\n", encoding="utf-8")
